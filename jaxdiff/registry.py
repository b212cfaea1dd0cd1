"""What every registry entry is: a choice that owns its config fields, defaults and checks.

A registry is a `dict[str, Entry]` beside the code it chooses between (`PROCESSES`,
`PARAMETERISATIONS`, `LOSS_TYPES`, `VARIANCE_TYPES`, `WEIGHTINGS`, `NETWORKS`, `DATASETS`,
`OPTIMIZERS`, `OBJECTIVES`). Each entry declares the fields it reads (`fields`: the dotted path
from the config's root and its default) and the rules of its settings (`check`, run on a
`Checker` when the entry is selected, including the combinations with the other selected
entries that mean nothing). `jaxdiff.config` builds `default_config` from the fields and
`validate` runs the checks; `lookup` is how every function that takes a name refuses an unknown
one. This module imports nothing of the library, so any registry can use it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import ml_collections


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


MISSING = object()


class Checker:
    """Collects "config.<field> = <value>: <what is allowed>" lines about one config."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.errors: list[str] = []

    def get(self, path: str) -> Any:
        node: Any = self.config
        for part in path.split("."):
            if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
                return MISSING
            node = node[part]
        return node

    def fail(self, path: str, allowed: str) -> None:
        value = self.get(path)
        shown = "<missing>" if value is MISSING else repr(value)
        self.errors.append(f"config.{path} = {shown}: {allowed}")

    def check(self, path: str, ok: Callable[[Any], bool], allowed: str) -> bool:
        """Records an error unless `ok(value)`; returns whether the value passed."""
        value = self.get(path)
        if value is MISSING:
            return False  # reported once, as a missing key
        if ok(value):
            return True
        self.fail(path, allowed)
        return False

    def one_of(self, path: str, choices: tuple[str, ...]) -> bool:
        return self.check(path, lambda v: v in choices, f"must be one of {choices}")

    def integer(self, path: str, low: int) -> bool:
        return self.check(path, lambda v: is_int(v) and v >= low, f"must be an integer >= {low}")

    def number(self, path: str, low: float, high: float, *, low_open: bool = False,
               high_open: bool = True) -> bool:
        def ok(v: Any) -> bool:
            if not is_number(v):
                return False
            above = v > low if low_open else v >= low
            below = v < high if high_open else v <= high
            return above and below

        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        return self.check(path, ok, f"must be a number in {left}{low}, {high}{right}")

    def positive(self, path: str) -> bool:
        return self.number(path, 0.0, math.inf, low_open=True)

    def boolean(self, path: str) -> bool:
        return self.check(path, lambda v: isinstance(v, bool), "must be True or False")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Entry:
    """What every registry entry has: the config fields it reads, as {"section.field": default}
    (a field several entries read is declared by each, with one default), and the checks of
    them (`check(checker)`, run by `config.validate` when the entry is selected)."""

    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    check: Callable[[Checker], None] | None = None


E = TypeVar("E")


def lookup(registry: Mapping[str, E], name: Any, what: str) -> E:
    """`registry[name]`; a ValueError naming `what`, the name and the choices if there is none."""
    if not isinstance(name, str) or name not in registry:
        raise ValueError(f"unknown {what} {name!r}; expected one of {tuple(registry)}")
    return registry[name]


def names(registry: Mapping[str, Any], which: Callable[[Any], bool]) -> str:
    """The names of the entries for which `which(entry)`, as "'a', 'b' or 'c'"."""
    chosen = [repr(k) for k, v in registry.items() if which(v)]
    return chosen[0] if len(chosen) == 1 else f"{', '.join(chosen[:-1])} or {chosen[-1]}"


def value(config: ml_collections.ConfigDict, path: str) -> Any:
    """The field at dotted `path` of `config`."""
    node: Any = config
    for part in path.split("."):
        node = node[part]
    return node
