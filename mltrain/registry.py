"""Explicit registries: one dict from name to constructor per component kind."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from mltrain.errors import ConfigError


class Registry:
    """Maps names to constructors; `build({name, args})` makes a component.

    Unknown names are a `ConfigError` that lists every valid name, so a typo in a config
    never reaches a library's own traceback.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, fn: Callable[..., Any] | None = None):
        """Register `fn` under `name`; usable as a decorator when `fn` is omitted."""

        def add(f: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = f
            return f

        return add(fn) if fn is not None else add

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._items:
            valid = ", ".join(self.names())
            raise ConfigError(f"unknown {self.kind} '{name}'{self._close(name)}; valid names: "
                              f"{valid}")  # fmt: skip
        return self._items[name]

    def _close(self, name: str) -> str:
        """' (did you mean X?)' for a near miss such as TripletMarginLos, any case."""
        lower = {n.lower(): n for n in self._items}
        close = difflib.get_close_matches(str(name).lower(), list(lower), n=2, cutoff=0.8)
        return f" (did you mean {' or '.join(lower[c] for c in close)}?)" if close else ""

    def arguments(self, name: str) -> list[str]:
        """The keyword arguments component `name` takes, read from its signature (none where
        it has no readable one), so error messages cannot drift from the code."""
        return _parameters(self.get(name))

    def build(self, spec: Mapping[str, Any], **extra: Any) -> Any:
        """Build from `{name, args}`; `extra` keyword arguments fill what the config leaves out."""
        fn = self.get(spec["name"])
        args = {**extra, **dict(spec.get("args") or {})}
        try:
            return fn(**args)
        except TypeError as e:
            given = sorted(spec.get("args") or {})  # the user's, not what the code filled in
            offer = self.takes(spec["name"], extra)
            raise ConfigError(f"{self.kind} '{spec['name']}': bad args {given}: {e}{offer}") from e

    def takes(self, name: str, filled: Mapping[str, Any]) -> str:
        """`; it takes a, b`: the arguments of `name` a config may set (not those the code
        fills in), for an error message; empty when there are none."""
        takes = [p for p in self.arguments(name) if p not in filled]
        return f"; it takes {', '.join(takes)}" if takes else ""


def _parameters(fn: Callable[..., Any]) -> list[str]:
    """The keyword arguments `fn` names (none where it has no readable signature)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in keyword and p.name != "self"]
