"""The prepare driver: cache layout, checksums, resumption, bad files, and the Dataset over it."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from miles.data.prepare import (
    ArraySpec,
    DecodeError,
    Preparer,
    RawDataError,
    RawItem,
    prepare,
    verify,
)
from miles.data.prepared import PreparedDataset, prepared_splits


class TextPreparer(Preparer):
    """Raw layout ``raw/<label>_<id>.txt`` holding 4 numbers; ``scale`` is an option."""

    name = "text-toy"

    def __init__(self, scale: float = 1.0, fail_at: int | None = None) -> None:
        self.scale = scale
        self.fail_at = fail_at
        self.calls = 0

    def options(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def specs(self) -> dict[str, ArraySpec]:
        return {"vec": ArraySpec((4,), "float32"), "twice": ArraySpec((2, 4), "float32")}

    def label_spec(self) -> ArraySpec:
        return ArraySpec((), "int64")

    def scan(self, raw: Path) -> list[RawItem]:
        items = []
        for path in sorted(raw.glob("*.txt")):
            label, _, _ = path.stem.partition("_")
            if not label.isdigit():
                raise RawDataError(path, "file name must start with '<label>_'")
            items.append(RawItem(path.stem, int(label), {"vec": path, "twice": path}))
        return items

    def process(self, item: RawItem) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt  # the user pressed Ctrl-C
        text = Path(item.files["vec"]).read_text().split()
        if len(text) != 4:
            raise RawDataError(item.files["vec"], f"expected 4 numbers, found {len(text)}")
        vec = np.asarray([float(t) for t in text], dtype=np.float32) * self.scale
        return {"vec": vec, "twice": np.stack([vec, 2 * vec])}

    def split(self, items: Sequence[RawItem]) -> dict[str, list[int]]:
        n = len(items)
        return {"train": list(range(0, n - 4)), "val": [n - 4, n - 3], "test": [n - 2, n - 1]}


def _raw(tmp_path: Path, n: int = 40, bad: int | None = None) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(n):
        values = "1 2" if i == bad else f"{i} {i + 1} {i + 2} {i + 3}"
        (raw / f"{i % 3}_{i:03d}.txt").write_text(values)
    return raw


def test_prepare_writes_a_verifiable_cache(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    manifest = prepare(TextPreparer(scale=0.5), raw, tmp_path / "out", progress=False, chunk=8)
    assert manifest["sizes"] == {"train": 36, "val": 2, "test": 2}
    assert manifest["options"] == {"scale": 0.5} and manifest["skipped"] == {}
    assert verify(tmp_path / "out")["n_samples"] == 40
    ds = PreparedDataset(tmp_path / "out", "val")
    item = ds[1]  # the 38th file in sorted order
    key = manifest["keys"][37]
    expected = np.asarray([float(v) for v in (raw / f"{key}.txt").read_text().split()]) * 0.5
    torch.testing.assert_close(item["inputs"]["vec"], torch.tensor(expected, dtype=torch.float32))
    assert item["inputs"]["twice"].shape == (2, 4)
    assert int(item["target"]) == int(key[0])
    assert isinstance(np.load(tmp_path / "out" / "vec.npy", mmap_mode="r"), np.memmap)
    # tampering is caught
    arr = np.load(tmp_path / "out" / "vec.npy")
    arr[0, 0] += 1
    np.save(tmp_path / "out" / "vec.npy", arr)
    with pytest.raises(RawDataError, match=r"vec\.npy: checksum differs"):
        verify(tmp_path / "out")


def test_interrupted_prepare_resumes_where_it_stopped(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        prepare(TextPreparer(fail_at=21), raw, tmp_path / "out", progress=False, chunk=8)
    progress = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert progress["done"] == 16  # two committed chunks
    again = TextPreparer()
    prepare(again, raw, tmp_path / "out", progress=False, chunk=8)
    assert again.calls == 40 - 16  # only the rest was decoded
    prepare(TextPreparer(), raw, tmp_path / "ref", progress=False, chunk=8)
    for name in ("vec.npy", "twice.npy", "labels.npy", "splits.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    # finished: a re-run decodes nothing; other options are refused, not mixed in
    done = TextPreparer()
    prepare(done, raw, tmp_path / "out", progress=False)
    assert done.calls == 0
    with pytest.raises(ValueError, match="other settings"):
        prepare(TextPreparer(scale=2.0), raw, tmp_path / "out", progress=False)


def test_bad_file_stops_with_its_name_or_is_skipped_when_asked(tmp_path: Path) -> None:
    raw = _raw(tmp_path, bad=5)
    with pytest.raises(RawDataError, match=r"2_005\.txt: expected 4 numbers, found 2"):
        prepare(TextPreparer(), raw, tmp_path / "strict", progress=False)
    manifest = prepare(TextPreparer(), raw, tmp_path / "lenient", skip_bad=True, progress=False)
    assert list(manifest["skipped"]) == ["2_005"]
    assert manifest["sizes"]["train"] == 35  # the bad sample left the split, not silently zeroed
    ds = PreparedDataset(tmp_path / "lenient", "train")
    assert all(ds[i]["inputs"]["vec"].abs().sum() > 0 for i in range(len(ds)))


def test_layout_errors_and_reader_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(TextPreparer(), tmp_path / "nope", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RawDataError, match="no samples"):
        prepare(TextPreparer(), tmp_path / "empty", tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="miles prepare"):
        PreparedDataset(tmp_path / "empty", "train")
    raw = _raw(tmp_path)
    prepare(TextPreparer(), raw, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="not in the cache"):
        PreparedDataset(tmp_path / "out", "train", modalities=["audio"])
    splits = prepared_splits(
        tmp_path / "out",
        num_classes=3,
        multilabel=False,
        metric="accuracy",
        build_encoders=lambda d: {},
        modalities=["vec"],
        check=True,
    )
    assert splits.modalities == ("vec",) and splits.info["sizes"]["train"] == 36


def test_resume_refuses_a_changed_raw_copy_but_allows_skip_bad(tmp_path: Path) -> None:
    raw = _raw(tmp_path, bad=30)
    with pytest.raises(RawDataError, match="0_030"):
        prepare(TextPreparer(), raw, tmp_path / "out", progress=False, chunk=8)
    committed = json.loads((tmp_path / "out" / "progress.json").read_text())["done"]
    assert committed > 0
    # the documented recovery: the same command with skip_bad continues the unfinished cache
    resumed = TextPreparer()
    manifest = prepare(resumed, raw, tmp_path / "out", skip_bad=True, progress=False, chunk=8)
    assert list(manifest["skipped"]) == ["0_030"] and resumed.calls == 40 - committed
    # an unfinished cache over a raw copy whose samples changed is refused
    raw2 = tmp_path / "raw2"
    raw2.mkdir()
    for i in range(40):
        (raw2 / f"{(i + 1) % 3}_{i:03d}.txt").write_text("1 2 3 4" if i != 9 else "1 2")
    with pytest.raises(RawDataError):
        prepare(TextPreparer(), raw2, tmp_path / "out2", progress=False, chunk=8)
    assert (tmp_path / "out2" / "progress.json").is_file()
    (raw2 / "1_009.txt").unlink()
    (raw2 / "2_009.txt").write_text("1 2 3 4")  # relabelled: same count, other samples
    with pytest.raises(ValueError, match="changed since"):
        prepare(TextPreparer(), raw2, tmp_path / "out2", progress=False, chunk=8)


class _WrongDtype(TextPreparer):
    def process(self, item: RawItem) -> dict[str, np.ndarray]:
        out = super().process(item)
        return {**out, "vec": out["vec"].astype(np.float64)}


class _BadSplit(TextPreparer):
    def split(self, items: Sequence[RawItem]) -> dict[str, list[int]]:
        return {"train": [0, 1], "val": [1], "test": [2]}


def test_dtype_and_split_are_checked(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    with pytest.raises(RawDataError, match="decoded to float64"):
        prepare(_WrongDtype(), raw, tmp_path / "a", progress=False)
    bad = _BadSplit()
    with pytest.raises(ValueError, match="shared indices"):
        prepare(bad, raw, tmp_path / "b", progress=False)
    assert bad.calls == 0  # refused before any decoding


class _Recording(TextPreparer):
    """Records which process decoded each sample (a file per pid), and can fail in a way the
    preparer does not anticipate (a reader bug) or decode slowly."""

    def __init__(
        self, pids: Path, crash_on: str | None = None, delay: float = 0.0, **kw: Any
    ) -> None:
        super().__init__(**kw)
        self.pids, self.crash_on, self.delay = pids, crash_on, delay

    def process(self, item: RawItem) -> dict[str, np.ndarray]:
        self.pids.mkdir(exist_ok=True)
        (self.pids / str(os.getpid())).touch()
        if item.key == self.crash_on:
            return {"vec": np.zeros(4, np.float32) / 0, "twice": np.zeros((2, 4))}[1]  # KeyError
        time.sleep(self.delay)
        return super().process(item)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on 2 cores
def test_workers_decode_in_other_processes_into_the_same_cache(tmp_path: Path) -> None:
    raw = _raw(tmp_path, bad=13)
    caches = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        pids = tmp_path / f"pids{workers}"
        prepare(
            _Recording(pids, scale=0.5),
            raw,
            out,
            skip_bad=True,
            progress=False,
            chunk=8,
            workers=workers,
        )
        decoders = {int(p.name) for p in pids.iterdir()}
        assert (
            decoders == {os.getpid()} if workers == 1 else len(decoders - {os.getpid()}) == workers
        )
        caches[workers] = _files(out)
    assert set(caches[1]) == {"vec.npy", "twice.npy", "labels.npy", "splits.json", "manifest.json"}
    assert caches[2] == caches[1] and caches[3] == caches[1]  # byte for byte, manifest included
    assert list(json.loads(caches[2]["manifest.json"])["skipped"]) == ["1_013"]


def test_worker_errors_name_the_sample_and_its_file(tmp_path: Path) -> None:
    raw = _raw(tmp_path, bad=13)
    order = sorted(p.stem for p in raw.glob("*.txt"))  # the samples' rows
    with pytest.raises(RawDataError, match=r"1_013\.txt: expected 4 numbers, found 2"):
        prepare(TextPreparer(), raw, tmp_path / "strict", progress=False, chunk=8, workers=2)
    committed = json.loads((tmp_path / "strict" / "progress.json").read_text())["done"]
    assert committed == order.index("1_013") // 8 * 8  # every chunk before the bad sample's
    # an error the preparer did not anticipate (never skipped: it may be a bug): the sample, its
    # files, the worker's traceback
    with pytest.raises(DecodeError, match=r"sample '2_020' \(vec: .*2_020\.txt.*KeyError") as err:
        prepare(
            _Recording(tmp_path / "pids", crash_on="2_020"),
            raw,
            tmp_path / "bug",
            skip_bad=True,
            progress=False,
            chunk=8,
            workers=2,
        )
    assert "in process" in err.value.worker_traceback  # where it happened, in the worker
    assert "in process" in str(err.value.__cause__)
    committed = json.loads((tmp_path / "bug" / "progress.json").read_text())["done"]
    assert committed == order.index("2_020") // 8 * 8
    with pytest.raises(ValueError, match="workers"):
        prepare(TextPreparer(), raw, tmp_path / "w0", progress=False, workers=0)


def test_ctrl_c_during_parallel_decoding_stops_the_workers_and_resumes(tmp_path: Path) -> None:
    """SIGINT while workers decode: KeyboardInterrupt in the caller, the workers are gone, the
    committed chunks stay, and a resume (with another number of workers) gives the same cache."""
    raw = _raw(tmp_path)
    out = tmp_path / "out"
    progress = out / "progress.json"

    def interrupt_after_first_chunk() -> None:
        deadline = time.monotonic() + 60
        while not progress.is_file() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does to the main process

    # Ctrl-C raises KeyboardInterrupt, even when the tests run as a background job (which
    # starts with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    pinger = threading.Thread(target=interrupt_after_first_chunk)
    pinger.start()
    slow = _Recording(tmp_path / "pids", delay=0.05)
    try:
        with pytest.raises(KeyboardInterrupt) as interrupted:
            prepare(slow, raw, out, progress=False, chunk=8, workers=2)
    finally:
        pinger.join()
        signal.signal(signal.SIGINT, previous)
    # no decoding worker left behind, even while the caller still holds the traceback
    assert interrupted.tb is not None and multiprocessing.active_children() == []
    done = json.loads(progress.read_text())["done"]
    assert 8 <= done < 40 and done % 8 == 0
    resumed = _Recording(tmp_path / "pids-resumed")
    prepare(resumed, raw, out, progress=False, chunk=8, workers=1)
    assert resumed.calls == 40 - done
    prepare(TextPreparer(), raw, tmp_path / "ref", progress=False, chunk=8)
    assert _files(out) == _files(tmp_path / "ref")
