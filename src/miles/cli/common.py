"""What every ``miles`` command shares: parent parsers, argument types, errors, the base config.

Options that several commands take are declared once here, as *parent parsers* built per command
(so each command can show its own defaults without touching another's): :func:`data_options`,
:func:`fusion_option`, :func:`seeds_option`, :func:`training_options`, :func:`engine_options`,
:func:`output_options`, :func:`global_options`. Argument types fail the way argparse expects
(``ArgumentTypeError``), so a bad value is a one-line usage error.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from miles.studies.study import Study
    from miles.training.experiment import ExperimentConfig

__all__ = [
    "HelpFormatter",
    "Parser",
    "UserError",
    "base_config",
    "csv_list",
    "data_options",
    "echo_for",
    "engine_options",
    "engine_settings",
    "floats",
    "fusion_option",
    "global_options",
    "key_value",
    "key_values",
    "method_optimizer_option",
    "method_optimizers",
    "methods",
    "non_negative_int",
    "output_options",
    "positive_int",
    "refuse_torchrun",
    "run_study_command",
    "seeds_option",
    "show",
    "training_options",
    "unimodal_sweep_options",
]


class UserError(Exception):
    """A mistake in what the user asked for: shown as one line, exit status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default (but not ``None`` or an off flag), keeps descriptions as
    written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, []) or not action.option_strings:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line: ``miles <cmd>: error: <message>``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _parent() -> Parser:
    return Parser(add_help=False, formatter_class=HelpFormatter)


# -- argument types -------------------------------------------------------------------------------


def _checked(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Turn a ``ValueError``/``TypeError`` of ``check`` into argparse's usage error."""

    def parse(value: Any) -> Any:
        try:
            return check(value)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _int_at_least(low: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what.replace(" ", "_")
    return parse


#: an integer >= 1 (argparse type)
positive_int = _int_at_least(1, "a positive integer")
#: an integer >= 0 (argparse type)
non_negative_int = _int_at_least(0, "an integer >= 0")


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as a YAML scalar: ``max_train=60`` -> ``("max_train", 60)``.

    Dashes in KEY become underscores, so ``--dataset-option min-video-coverage=null`` reaches
    the ``min_video_coverage`` parameter. Dots are kept (``--set trainer.lr=1e-3``).
    """
    from miles.cli.yamlio import parse_scalar

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), parse_scalar(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def csv_list(text: str) -> list[str]:
    """``a,b,c`` -> ``["a", "b", "c"]`` (at least one item)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def floats(text: str) -> list[float]:
    """``3e-4,1e-3`` -> ``[0.0003, 0.001]``."""
    try:
        return [float(t) for t in csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def fusions(text: str) -> list[str]:
    """Comma-separated fusion names, checked against the available fusions."""
    from miles.studies.checks import check_fusions

    return _checked(check_fusions)(csv_list(text))


def fusion(text: str) -> str:
    """One fusion name, checked against the available fusions."""
    from miles.studies.checks import check_fusions

    return _checked(check_fusions)([text])[0]


def method_optimizers(text: str) -> dict[str, dict[str, Any]]:
    """``ogm=authors,ogm-ge=sgd:weight_decay=1e-4`` -> per-method optimizer settings."""
    from miles.studies.optimizers import parse_method_optimizers

    return _checked(parse_method_optimizers)(text)


def unimodal_sweep_options(p: argparse.ArgumentParser) -> None:
    """``--sweep-lrs``, ``--sweep-epochs``, ``--sweep-cache``: the unimodal LR tuning MSLR's
    per-modality rates come from (compare, sweep)."""
    p.add_argument(
        "--sweep-lrs",
        type=floats,
        default="3e-4,1e-3,3e-3",
        help="unimodal learning rates tried for MSLR's per-modality rates",
    )
    p.add_argument(
        "--sweep-epochs", type=positive_int, default=5, help="epochs of each unimodal LR trial"
    )
    p.add_argument(
        "--sweep-cache", help="folder caching the unimodal LR sweep (default: in the output folder)"
    )


def method_optimizer_option(p: argparse.ArgumentParser) -> None:
    """``--method-optimizer``: per-method optimizer settings (compare, sweep)."""
    p.add_argument(
        "--method-optimizer",
        dest="method_optimizers",
        type=method_optimizers,
        default={},
        metavar="METHOD=SPEC,...",
        help="train some methods with other optimizer settings: SPEC is 'authors' (the settings "
        "the method's authors use, e.g. OGM's SGD with momentum 0.9 and weight decay 1e-4), "
        "'sgd' or 'adam', optionally followed by ':lr=X', ':momentum=X', ':weight_decay=X'; "
        "e.g. ogm=authors,ogm-ge=authors",
    )


def methods(text: str) -> list[str]:
    """``all`` (every method of the comparison) or comma-separated registered strategy names."""
    from miles.studies.checks import check_methods
    from miles.studies.compare import ALL_METHODS

    items = csv_list(text)
    return _checked(check_methods)(list(ALL_METHODS) if items == ["all"] else items)


# -- parent parsers -------------------------------------------------------------------------------


def global_options(*, suppress: bool) -> Parser:
    """``--debug`` and ``--plugin``, accepted before or after the command name."""
    p = _parent()
    default: Any = argparse.SUPPRESS if suppress else None
    p.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="show the full traceback of an error instead of one line",
    )
    p.add_argument(
        "--plugin",
        action="append",
        metavar="MODULE",
        default=default,
        help="import MODULE (or a .py file) first, so its register_strategy / register_dataset "
        "calls take effect (repeatable)",
    )
    return p


def data_options(dataset: str = "fsdd-mnist") -> Parser:
    """``--dataset`` and ``--dataset-option KEY=VALUE``."""
    p = _parent()
    p.add_argument("--dataset", default=dataset, help="a registered dataset (see `miles list`)")
    key_values(p, "--dataset-option", "a dataset parameter", "max_train=60")
    return p


def key_values(p: argparse.ArgumentParser, flag: str, what: str, example: str) -> None:
    """A repeatable ``FLAG KEY=VALUE`` option (VALUE read as YAML) collected as a list of
    ``(key, value)`` pairs."""
    p.add_argument(
        flag,
        action="append",
        type=key_value,
        default=[],
        metavar="KEY=VALUE",
        help=f"{what}, VALUE read as YAML (repeatable), e.g. {example}",
    )


def fusion_option(default: str, *, many: bool) -> Parser:
    """``--fusion``: one fusion, or (``many``) a comma-separated list."""
    p = _parent()
    what = "comma-separated fusions" if many else "the fusion"
    p.add_argument(
        "--fusion",
        default=default,
        type=fusions if many else fusion,
        help=f"{what} (see `miles list`)",
    )
    return p


def seeds_option(default: int = 3) -> Parser:
    """``--seeds N``: seeds 0..N-1."""
    p = _parent()
    p.add_argument("--seeds", type=positive_int, default=default, help="use seeds 0..N-1")
    return p


def training_options(
    *,
    epochs: int,
    lr: float | None = 1e-3,
    batch_size: int = 64,
    latent_dim: int = 64,
    optimizer: str = "adam",
) -> Parser:
    """The training budget every run of a command shares, and where it runs.

    ``lr=None`` leaves ``--lr`` out (a sweep searches it).
    """
    p = _parent()
    p.add_argument("--epochs", type=positive_int, default=epochs, help="epochs per run")
    if lr is not None:
        p.add_argument("--lr", type=float, default=lr, help="base learning rate")
    p.add_argument("--batch-size", type=positive_int, default=batch_size, help="training batch")
    p.add_argument(
        "--latent-dim", type=positive_int, default=latent_dim, help="latent size per encoder"
    )
    p.add_argument("--optimizer", default=optimizer, help="adam, adamw or sgd")
    p.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)"
    )
    return p


#: engine options: argparse destination -> TrainerConfig field (given ones override the config)
ENGINE_FIELDS = {
    "device": "device",
    "precision": "precision",
    "grad_clip_norm": "grad_clip_norm",
    "schedule": "schedule",
    "warmup_epochs": "warmup_epochs",
    "warmup_steps": "warmup_steps",
    "num_workers": "num_workers",
    "pin_memory": "pin_memory",
    "loader": "loader",
    "compile": "compile",
    "logger": "loggers",
    "backend": "backend",
    "find_unused_parameters": "find_unused_parameters",
}


def engine_options(*, device: str | None = "cpu", distributed: bool = False) -> Parser:
    """Where and how runs train: device, precision, clipping, base schedule, loading, logging;
    with ``distributed``, the options of a data-parallel run under ``torchrun``.

    Options left out keep the config's value (``device=None``: no default device either).
    """
    from miles.training.distributed import BACKENDS
    from miles.training.loaders import LOADERS
    from miles.training.precision import PRECISIONS
    from miles.training.schedules import SCHEDULES

    p = _parent()
    p.add_argument(
        "--device",
        default=device,
        help="torch device, e.g. cuda or cuda:1 (under torchrun, cuda is each process's GPU)",
    )
    p.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        help="32 (default), bf16-mixed, or 16-mixed (float16 with a gradient scaler)",
    )
    p.add_argument("--grad-clip-norm", type=float, metavar="NORM", help="clip the gradient norm")
    p.add_argument("--schedule", choices=list(SCHEDULES), help="base LR schedule (per batch)")
    p.add_argument("--warmup-epochs", type=non_negative_int, help="linear LR warm-up, in epochs")
    p.add_argument("--warmup-steps", type=non_negative_int, help="linear LR warm-up, in batches")
    p.add_argument("--num-workers", type=non_negative_int, help="DataLoader worker processes")
    _switch(p, "--pin-memory", "pinned host memory for the batches (CUDA only; on by default)")
    p.add_argument(
        "--loader",
        choices=list(LOADERS),
        help="auto (default): in-memory datasets indexed as tensors, else a DataLoader",
    )
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument(
        "--logger",
        type=csv_list,
        metavar="NAMES",
        help="also log each epoch to: csv, tensorboard, wandb (comma-separated; into --out)",
    )
    if distributed:
        p.add_argument(
            "--backend",
            choices=list(BACKENDS),
            help="torch.distributed backend under torchrun (auto: nccl on CUDA, else gloo)",
        )
        _switch(
            p,
            "--find-unused-parameters",
            "DDP's find_unused_parameters (default: when the method may leave some unused)",
        )
    return p


def _switch(p: argparse.ArgumentParser, flag: str, help: str) -> None:
    """``--flag`` / ``--no-flag``, ``None`` when neither is given (the config decides)."""
    p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)


def engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainerConfig fields given by :func:`engine_options` (the others are left out)."""
    return {
        field: getattr(args, dest)
        for dest, field in ENGINE_FIELDS.items()
        if getattr(args, dest, None) is not None
    }


def refuse_torchrun(command: str) -> None:
    """Stop a study command started by ``torchrun``: every rank would run, and write, the whole
    study."""
    from miles.training.distributed import launched_world_size

    if launched_world_size() > 1:
        raise UserError(
            f"miles {command} trains many runs, each in one process: under torchrun every rank "
            "would run and write the whole study. Run one training on several processes with "
            "`torchrun ... -m miles train`, and spread a study over machines with `miles sweep` "
            "workers sharing one --storage"
        )


def output_options(out: str | None) -> Parser:
    """``--out`` (``None``: required) and ``--quiet``."""
    p = _parent()
    if out is None:
        p.add_argument("--out", required=True, help="output folder")
    else:
        p.add_argument("--out", default=out, help="output folder")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="print only the results: no progress bars, no per-run or per-epoch lines",
    )
    return p


# -- from arguments to configs --------------------------------------------------------------------


def base_config(args: argparse.Namespace, **fixed: Any) -> ExperimentConfig:
    """The base experiment of a study from the shared options (``fixed`` wins: e.g. the demo's
    dataset)."""
    from miles.training.experiment import ExperimentConfig
    from miles.training.trainer import TrainerConfig

    fields: dict[str, Any] = {
        "dataset": getattr(args, "dataset", None),
        "dataset_params": dict(getattr(args, "dataset_option", []) or []),
        "latent_dim": args.latent_dim,
    }
    if isinstance(getattr(args, "fusion", None), str):
        fields["fusion"] = args.fusion
    fields = {k: v for k, v in fields.items() if v is not None} | fixed
    trainer = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": args.optimizer,
        "progress": getattr(args, "progress_bars", False) and not getattr(args, "quiet", False),
        **engine_settings(args),
    }
    if getattr(args, "lr", None) is not None:
        trainer["lr"] = args.lr
    if getattr(args, "seed", None) is not None:
        trainer["seed"] = args.seed
    return ExperimentConfig(**fields, trainer=TrainerConfig(**trainer))


def run_study_command(
    args: argparse.Namespace, study: type[Study[Any]], *, copy: Sequence[str] = (), **fields: Any
) -> int:
    """Run a study from a command's arguments: its config is ``base_config(args)``, ``--out``,
    the arguments named in ``copy`` (same name in the config), ``--seeds N`` as seeds 0..N-1,
    a list of ``--fusion`` as ``fusions``, and ``fields``. Progress lines unless ``--quiet``,
    the report always."""
    from miles.studies.study import run_study

    refuse_torchrun(getattr(getattr(args, "_command", None), "name", study.kind))
    fields |= {name: getattr(args, name) for name in copy}
    if hasattr(args, "seeds"):
        fields.setdefault("seeds", list(range(args.seeds)))
    if isinstance(getattr(args, "fusion", None), list):
        fields.setdefault("fusions", args.fusion)
    config = study.config_type(base=base_config(args), out_dir=args.out, **fields)
    run_study(study, config, echo=echo_for(args), show=show)
    return 0


def echo_for(args: argparse.Namespace) -> Callable[[str], None]:
    """Where progress lines go: stdout, or nowhere with ``--quiet``."""
    if getattr(args, "quiet", False):
        return lambda _line: None
    return lambda line: print(line, flush=True)


def show(text: str) -> None:
    """Print a result (always, even with ``--quiet``)."""
    print(text, flush=True)
