"""YAML for configs and ``KEY=VALUE`` options: YAML 1.2 numbers, no duplicate keys.

PyYAML follows YAML 1.1, whose float pattern needs a dot: ``lr: 1e-3`` comes back as the string
``"1e-3"``, which a config then rejects. The loader here resolves floats the YAML 1.2 way
(``1e-3``, ``1E3``, ``.5``, ``-.inf``, ``.nan``), and refuses a mapping with a key twice instead
of silently keeping the last value.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigLoader", "apply_overrides", "load_config_file", "load_yaml", "parse_scalar"]

_FLOAT_12 = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)?\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 floats and duplicate keys refused."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key].line + 1})", mark
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


# our own copy of the resolver table, so yaml.SafeLoader itself is left as it is
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def load_yaml(text: str, *, source: str = "<text>") -> Any:
    """Parse YAML with :class:`ConfigLoader`; a syntax error is a ``ValueError`` naming
    ``source`` and the line."""
    try:
        return yaml.load(text, Loader=ConfigLoader)  # ConfigLoader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{source}{where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: {' '.join(str(exc).split())}") from None


def parse_scalar(text: str) -> Any:
    """A command-line value read as a YAML scalar: ``60`` -> 60, ``1e-3`` -> 0.001,
    ``null`` -> None, ``[a, b]`` -> a list, anything else -> the text."""
    return load_yaml(text, source=repr(text)) if text.strip() else text


def load_config_file(path: Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; missing, empty or non-mapping files are refused.

    Raises:
        FileNotFoundError: no such file.
        ValueError: invalid YAML, a duplicate key, an empty file or mapping, or not a mapping.
    """
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    raw = load_yaml(path.read_text(encoding="utf-8"), source=str(path))
    if raw is None:
        raise ValueError(
            f"config file {path} is empty; write at least the dataset and strategy (see the "
            "README's example)"
        )
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a mapping, got {type(raw).__name__}")
    if not raw:  # `{}` would silently run every default (a full experiment)
        raise ValueError(
            f"config file {path} sets nothing; write at least the dataset and strategy (see the "
            "README's example)"
        )
    return raw


def apply_overrides(raw: dict[str, Any], overrides: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """Set ``key.sub=value`` overrides in a nested mapping (missing mappings are created).

    ``overrides`` are ``(dotted key, value)`` pairs. Setting below a value that is not a mapping
    is a ``ValueError`` naming the key.
    """
    for dotted, value in overrides:
        *parents, last = dotted.split(".")
        if not last or any(not p for p in parents):
            raise ValueError(f"--set {dotted}: empty key part")
        node = raw
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parents[: i + 1])
                raise ValueError(
                    f"--set {dotted}: {where} is {child!r}, not a mapping to set a key in"
                )
            node = child
        node[last] = value
    return raw
