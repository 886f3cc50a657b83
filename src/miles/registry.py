"""Name -> object registries, one implementation for strategies, datasets, preparers and fusions.

Components are picked by name from configs and the command line, never through ``if name == ...``
chains: each kind keeps a :class:`Registry` that a decorator fills. Registering a name twice is an
error (silently replacing a component would make results depend on import order), and an unknown
name lists the registered ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from miles.validation import check_str

__all__ = ["Registry"]

T = TypeVar("T")
C = TypeVar("C")


class Registry(Generic[T]):
    """Named components of one ``kind`` (``"strategy"``, ``"dataset"``, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[C], C]:
        """Decorator adding its target under ``name``; the target is returned unchanged."""
        check_str(f"{self.kind} name", name)

        def decorate(obj: C) -> C:
            if name in self._items:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered (by {self._items[name]!r})"
                )
            self._items[name] = obj  # type: ignore[assignment]
            return obj

        return decorate

    def get(self, name: str) -> T:
        """The component registered as ``name``; an unknown name lists the registered ones."""
        check_str(self.kind, name)
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {self.names()}") from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
