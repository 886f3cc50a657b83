"""Throughput of our Trainer against a bare PyTorch loop, and what MILES and validation cost.

For each case, in one process, alternating (run r: bare then trainer when r is even, trainer then
bare when odd), ``--repeats`` times after ``--warmup`` untimed runs of each:

* **trainer / bare**: training samples per second of ``Trainer.fit`` (joint+aux, in memory: no
  checkpoint files) and of a bare loop on the same model, data, batch size, optimizer, precision
  and device: a ``DataLoader`` with ``collate_multimodal``, forward, the sum of the head losses,
  backward, step, and one validation pass per epoch counting each head's correct predictions on
  the device (no per-batch ``.item()``: the fastest loop a user would write). Both include
  their per-epoch validation; the trainer's fit also includes its setup.
* **MILES / joint+aux**: the trainer's epoch time (train + validate + the strategy's decision,
  summed over the history) with MILES and with joint+aux, alternating.
* **validation fraction**: the share of the trainer's epoch time spent in ``Trainer.evaluate``.

Reported: the median of the runs, every run (spread), the ratio of the medians, the median of
the ratios within each alternating pair (which cancels drift in the machine's speed over the
benchmark) and, on CUDA, the peak GPU memory of each loop. The JSON (``--out``) holds all of it
with the machine's description. Cases:

* ``fsdd-mnist``: the demo's real, offline data and model (CPU).
* ``<dataset>`` for each ``configs/paper/<dataset>_concat.yaml``: the config's own encoders,
  optimizer and batch size over a synthetic cache (random arrays with the dataset's names and
  dtypes, written by the real ``prepare`` driver) at ``--size reduced`` (sides cut to
  ``--side``; MM-IMDb with a small BERT) or ``--size full`` (the paper's input sizes, BERT-base).

    python benchmarks/throughput.py --cases fsdd-mnist --out benchmarks/results/throughput
    python benchmarks/throughput.py --cases cremad,smnist,luma,mmimdb --size reduced
    python benchmarks/throughput.py --cases cremad --size full --device cuda --precision bf16-mixed

Timing claims belong here, never in unit tests; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.miniature writes the synthetic caches

from tests.miniature import BUILD_OVERRIDES, MiniPreparer, default_preparer  # noqa: E402

from miles.data import DatasetSplits, build_dataset, collate_multimodal  # noqa: E402
from miles.data.prepare import ArraySpec, RawItem, prepare  # noqa: E402
from miles.models import JointFusionModel, head_losses  # noqa: E402
from miles.strategies import build_strategy  # noqa: E402
from miles.training import Trainer, TrainerConfig, loaders  # noqa: E402
from miles.training.precision import Precision  # noqa: E402
from miles.training.trainer import OPTIMIZERS  # noqa: E402

PAPER = ("cremad", "smnist", "luma", "mmimdb")


@dataclass(frozen=True)
class Case:
    """What one case trains: data, model settings and the trainer's configuration."""

    name: str
    data: DatasetSplits
    fusion: str
    latent_dim: int
    trainer: TrainerConfig


# -- cases ------------------------------------------------------------------------------------


class SyntheticPreparer(MiniPreparer):
    """The miniature caches of the tests, with ``n`` samples and sides cut to ``side`` (``None``:
    the paper's full input sizes)."""

    def __init__(self, real: Any, *, n_train: int, n_eval: int, side: int | None) -> None:
        super().__init__(real)
        specs = real.specs()
        if side is not None:
            specs = {
                m: ArraySpec(tuple(min(d, side) for d in s.shape), s.dtype)
                for m, s in specs.items()
            }
        self._specs = specs
        self.n_train, self.n_eval, self.side = n_train, n_eval, side

    def options(self) -> dict[str, Any]:
        return {"synthetic": True, "side": self.side, "n": [self.n_train, self.n_eval]}

    def scan(self, raw: Path) -> list[RawItem]:
        base = super().scan(raw)
        n = self.n_train + 2 * self.n_eval
        return [
            RawItem(f"{base[i % len(base)].key}_{i:06d}", base[i % len(base)].label, {})
            for i in range(n)
        ]

    def split(self, items: Any) -> dict[str, list[int]]:
        t, e = self.n_train, self.n_eval
        return {
            "train": list(range(t)),
            "val": list(range(t, t + e)),
            "test": list(range(t + e, t + 2 * e)),
        }


def fsdd_case(args: argparse.Namespace, folder: Path) -> Case:
    trainer = TrainerConfig(
        epochs=args.epochs,
        device=args.device,
        precision=args.precision,
        loader=args.loader,
        progress=False,
    )
    return Case("fsdd-mnist", build_dataset("fsdd-mnist"), "concat", 64, trainer)


def paper_case(name: str, args: argparse.Namespace, folder: Path) -> Case:
    config = yaml.safe_load((ROOT / "configs" / "paper" / f"{name}_concat.yaml").read_text())
    side = args.side if args.size == "reduced" else None
    preparer = SyntheticPreparer(
        default_preparer(name, folder), n_train=args.samples, n_eval=args.samples // 4, side=side
    )
    prepare(preparer, folder, folder / "cache", progress=False)
    params = {**config["dataset_params"], "root": str(folder / "cache"), "check": False}
    if args.size == "reduced":
        params.update(BUILD_OVERRIDES.get(name, {}))
    data = build_dataset(name, **params)
    settings = {
        **config["trainer"],
        "epochs": args.epochs,
        "device": args.device,
        "precision": args.precision,
        "progress": False,
        "num_workers": args.num_workers,
        "loader": args.loader,
    }
    return Case(name, data, config["fusion"], config["latent_dim"], TrainerConfig(**settings))


# -- the two loops ----------------------------------------------------------------------------


def build_model(case: Case) -> JointFusionModel:
    torch.manual_seed(case.trainer.seed)
    return JointFusionModel(
        case.data.build_encoders(case.latent_dim), case.data.num_classes, case.fusion
    )


def bare_loop(case: Case) -> dict[str, float]:
    """The hand-written reference: same model, data, optimizer, precision, device."""
    cfg, data = case.trainer, case.data
    device = torch.device(cfg.device)
    model = build_model(case).to(device)
    channels_last = device.type == "cuda" and any(
        isinstance(m, torch.nn.Conv2d) for m in model.modules()
    )
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    optimizer = OPTIMIZERS[cfg.optimizer](groups, cfg)
    precision = Precision(cfg.precision, device)
    pin = device.type == "cuda"
    generator = torch.Generator().manual_seed(cfg.seed)

    def loader(split: Any, train: bool) -> Any:
        return torch.utils.data.DataLoader(
            split,
            batch_size=cfg.batch_size if train else cfg.eval_batch_size,
            shuffle=train,
            generator=generator if train else None,
            collate_fn=collate_multimodal,
            num_workers=cfg.num_workers,
            pin_memory=pin,
        )

    def to_device(batch: dict[str, Any]) -> tuple[dict[str, Any], Any, torch.Tensor]:
        memory = torch.channels_last if channels_last else torch.preserve_format
        inputs = {
            m: x.to(
                device,
                non_blocking=True,
                memory_format=memory if x.dim() == 4 else torch.preserve_format,
            )
            for m, x in batch["inputs"].items()
        }
        return inputs, batch["lengths"] or None, batch["target"].to(device, non_blocking=True)

    train_loader, val_loader = loader(data.train, True), loader(data.val, False)
    start = time.perf_counter()
    correct = torch.zeros(1 + len(data.modalities), device=device)
    for _ in range(cfg.epochs):
        model.train()
        for batch in train_loader:
            inputs, lengths, target = to_device(batch)
            with precision.autocast():
                output = model(inputs, lengths)
                loss = sum(head_losses(output, target, multilabel=data.multilabel).values())
            optimizer.zero_grad(set_to_none=True)
            precision.backward(loss, optimizer)  # type: ignore[arg-type]
            precision.step(optimizer)
        model.eval()
        with torch.no_grad():
            for batch in val_loader:
                inputs, lengths, target = to_device(batch)
                with precision.autocast():
                    output = model(inputs, lengths)
                logits = [output.fused, *output.unimodal.values()]
                correct += torch.stack([_hits(x, target, data.multilabel) for x in logits])
    correct.tolist()  # the one read
    return {"wall_s": time.perf_counter() - start}


def _hits(logits: torch.Tensor, target: torch.Tensor, multilabel: bool) -> torch.Tensor:
    if multilabel:
        return ((logits > 0) == (target > 0.5)).float().sum()
    return (logits.argmax(dim=1) == target).float().sum()


def trainer_loop(case: Case, strategy: str) -> dict[str, float]:
    """``Trainer.fit`` in memory; the time spent in ``evaluate`` is measured on the side."""
    loaders._TABLES.clear()  # every fit pays for its own in-memory batches, as a fresh run does
    model = build_model(case)
    trainer = Trainer(
        model,
        build_strategy(strategy),
        case.trainer,
        metric=case.data.metric,
        multilabel=case.data.multilabel,
        collate_fn=collate_multimodal,
    )
    spent = [0.0]
    evaluate = trainer.evaluate

    def timed(loader: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return evaluate(loader, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t0

    trainer.evaluate = timed  # type: ignore[method-assign]
    start = time.perf_counter()
    result = trainer.fit(case.data.train, case.data.val)
    wall = time.perf_counter() - start
    epochs_s = sum(row["time_s"] for row in result.history)
    return {"wall_s": wall, "epochs_s": epochs_s, "eval_s": spent[0]}


# -- measurement ------------------------------------------------------------------------------


@contextlib.contextmanager
def peak_memory(device: torch.device, into: list[float]) -> Iterator[None]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        into.append(torch.cuda.max_memory_allocated(device) / 2**20)


def alternate(
    pair: tuple[Callable[[], dict[str, float]], Callable[[], dict[str, float]]],
    repeats: int,
    warmup: int,
    device: torch.device,
) -> tuple[list[dict[str, float]], list[dict[str, float]], list[list[float]]]:
    """``repeats`` timed runs of each of the two, alternating which goes first."""
    for _ in range(warmup):
        pair[0]()
        pair[1]()
    runs: tuple[list[dict[str, float]], list[dict[str, float]]] = ([], [])
    memory: list[list[float]] = [[], []]
    for r in range(repeats):
        for which in (0, 1) if r % 2 == 0 else (1, 0):
            with peak_memory(device, memory[which]):
                runs[which].append(pair[which]())
    return runs[0], runs[1], memory


def measure(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(case.trainer.device)
    samples = len(case.data.train) * case.trainer.epochs  # type: ignore[arg-type]
    bare, trainer, memory = alternate(
        (lambda: bare_loop(case), lambda: trainer_loop(case, "joint+aux")),
        args.repeats,
        args.warmup,
        device,
    )
    miles, joint_aux, _ = alternate(
        (lambda: trainer_loop(case, "miles"), lambda: trainer_loop(case, "joint+aux")),
        args.repeats,
        args.warmup,
        device,
    )
    bare_sps = [samples / r["wall_s"] for r in bare]
    trainer_sps = [samples / r["wall_s"] for r in trainer]
    miles_epoch = [r["epochs_s"] / case.trainer.epochs for r in miles]
    aux_epoch = [r["epochs_s"] / case.trainer.epochs for r in joint_aux]
    fractions = [r["eval_s"] / r["epochs_s"] for r in trainer + joint_aux + miles]
    # Ratios within each alternating pair: slow drift of the machine's speed (other tenants,
    # frequency scaling) moves both members of a pair alike and cancels here, not in the medians.
    trainer_pairs = [t / b for t, b in zip(trainer_sps, bare_sps, strict=True)]
    miles_pairs = [m / a for m, a in zip(miles_epoch, aux_epoch, strict=True)]
    out: dict[str, Any] = {
        "train_samples": len(case.data.train),  # type: ignore[arg-type]
        "val_samples": len(case.data.val),  # type: ignore[arg-type]
        "trainer": {**asdict(case.trainer), "fusion": case.fusion, "latent_dim": case.latent_dim},
        "loader": type(
            loaders.build_loader(
                case.data.train,
                batch_size=case.trainer.batch_size,
                collate_fn=collate_multimodal,
                num_workers=case.trainer.num_workers,
                mode=case.trainer.loader,
            )
        ).__name__,
        "bare_samples_per_s": bare_sps,
        "trainer_samples_per_s": trainer_sps,
        "trainer_over_bare": statistics.median(trainer_sps) / statistics.median(bare_sps),
        "trainer_over_bare_pairs": trainer_pairs,
        "trainer_over_bare_paired": statistics.median(trainer_pairs),
        "miles_epoch_s": miles_epoch,
        "joint_aux_epoch_s": aux_epoch,
        "miles_over_joint_aux": statistics.median(miles_epoch) / statistics.median(aux_epoch),
        "miles_over_joint_aux_pairs": miles_pairs,
        "miles_over_joint_aux_paired": statistics.median(miles_pairs),
        "validation_fraction": statistics.median(fractions),
        "validation_fraction_all": fractions,
    }
    if device.type == "cuda":
        out["peak_memory_mb"] = {"bare": max(memory[0]), "trainer": max(memory[1])}
    return out


def machine(args: argparse.Namespace) -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
        info["cuda"] = torch.version.cuda
    return info


def paired(result: dict[str, Any], name: str) -> str:
    """The median of the per-pair ratios, with their range."""
    pairs = result[f"{name}_pairs"]
    return f"{result[f'{name}_paired']:.3f} ({min(pairs):.3f}-{max(pairs):.3f})"


def table(results: dict[str, Any]) -> str:
    lines = [
        "| case | loader | bare samples/s | trainer samples/s | trainer / bare | "
        "trainer / bare, median of pairs | MILES / joint+aux | MILES / joint+aux, median of "
        "pairs | validation share | peak GPU MB (bare / trainer) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        memory = r.get("peak_memory_mb")
        mem = f"{memory['bare']:.0f} / {memory['trainer']:.0f}" if memory else "-"
        lines.append(
            f"| {name} | {r['loader']} | {statistics.median(r['bare_samples_per_s']):.1f} | "
            f"{statistics.median(r['trainer_samples_per_s']):.1f} | "
            f"{r['trainer_over_bare']:.3f} | {paired(r, 'trainer_over_bare')} | "
            f"{r['miles_over_joint_aux']:.3f} | {paired(r, 'miles_over_joint_aux')} | "
            f"{r['validation_fraction']:.1%} | {mem} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", default="fsdd-mnist", help="fsdd-mnist and/or " + ",".join(PAPER)
    )
    parser.add_argument("--size", choices=("reduced", "full"), default="reduced")
    parser.add_argument("--side", type=int, default=32, help="reduced size: the largest side")
    parser.add_argument("--samples", type=int, default=256, help="paper cases: training samples")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each timed fit")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each loop")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each loop first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32", choices=("32", "bf16-mixed", "16-mixed"))
    parser.add_argument(
        "--num-workers", type=int, default=0, help="paper cases: DataLoader workers"
    )
    parser.add_argument(
        "--loader",
        choices=("auto", "dataloader"),
        default="auto",
        help="the trainer's loader (dataloader: the same batching as the bare loop)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="write throughput.json here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="miles-throughput-") as tmp:
        for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
            folder = Path(tmp, name)
            folder.mkdir()
            if name == "fsdd-mnist":
                case = fsdd_case(args, folder)
            elif name in PAPER:
                case = paper_case(name, args, folder)
            else:
                parser.error(f"unknown case {name!r}; choose from fsdd-mnist, {', '.join(PAPER)}")
            print(
                f"{name}: {len(case.data.train)} training samples, {args.epochs} epochs x "  # type: ignore[arg-type]
                f"{args.repeats} runs per loop ...",
                flush=True,
            )
            results[name] = measure(case, args)
    payload = {
        "machine": machine(args),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "cases": results,
    }
    print(table(results))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "throughput.json"
        path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
