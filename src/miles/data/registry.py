"""Name -> builder registry, so configs and the CLI pick datasets by name without if-chains."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from miles.data.base import DatasetSplits
from miles.registry import Registry

__all__ = ["available_datasets", "build_dataset", "dataset_builder", "register_dataset"]

Builder = Callable[..., DatasetSplits]
B = TypeVar("B", bound=Builder)

_DATASETS: Registry[Builder] = Registry("dataset")


def register_dataset(name: str) -> Callable[[B], B]:
    """Decorator registering ``builder(**kwargs) -> DatasetSplits`` under ``name``.

    Raises:
        ValueError: ``name`` is empty or already registered (silently replacing a dataset would
            make results depend on import order).
    """
    return _DATASETS.register(name)


def available_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return _DATASETS.names()


def dataset_builder(name: str) -> Builder:
    """The builder registered as ``name`` (e.g. to read its signature or its module).

    Raises:
        ValueError: ``name`` is not registered; the message lists the available names.
    """
    return _DATASETS.get(name)


def build_dataset(name: str, **kwargs: Any) -> DatasetSplits:
    """Build the registered dataset ``name`` with the builder's keyword arguments.

    Raises:
        ValueError: ``name`` is not registered; the message lists the available names.
    """
    return dataset_builder(name)(**kwargs)
