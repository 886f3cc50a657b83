"""Name -> builder registry, so configs and the CLI pick datasets by name without if-chains."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from miles.data.base import DatasetSplits

__all__ = ["available_datasets", "build_dataset", "dataset_builder", "register_dataset"]

Builder = Callable[..., DatasetSplits]
B = TypeVar("B", bound=Builder)

_REGISTRY: dict[str, Builder] = {}


def register_dataset(name: str) -> Callable[[B], B]:
    """Decorator registering ``builder(**kwargs) -> DatasetSplits`` under ``name``.

    Raises:
        ValueError: ``name`` is empty or already registered (silently replacing a dataset would
            make results depend on import order).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}")

    def decorator(builder: B) -> B:
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} is already registered (by {_REGISTRY[name]!r})")
        _REGISTRY[name] = builder
        return builder

    return decorator


def available_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(_REGISTRY)


def dataset_builder(name: str) -> Builder:
    """The builder registered as ``name`` (e.g. to read its signature or its module).

    Raises:
        ValueError: ``name`` is not registered; the message lists the available names.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; available: {', '.join(available_datasets()) or '(none)'}"
        ) from None


def build_dataset(name: str, **kwargs: Any) -> DatasetSplits:
    """Build the registered dataset ``name`` with the builder's keyword arguments.

    Raises:
        ValueError: ``name`` is not registered; the message lists the available names.
    """
    return dataset_builder(name)(**kwargs)
