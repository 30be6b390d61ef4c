"""Typed configs: strict YAML loading and `--set key=value` overrides.

Every key is checked against the dataclasses of `mltrain.config_schema`: an unknown key or a
wrong type is a `ConfigError` naming the key and the file, never a silently ignored setting.
This module builds and loads configs; every config name is importable from here.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from mltrain.config_checks import (  # noqa: F401 - re-exported
    NAME_MAX_CHARS,
    WORKER_MEMORY,
    WORKERS_PER_CORE,
    is_number,
    machine_cores,
    machine_memory,
    max_loader_workers,
    validate,
)
from mltrain.config_schema import (  # noqa: F401 - re-exported
    AT_K,
    BEST_METRICS,
    CHOICES,
    LOWER_IS_BETTER,
    RANGES,
    Bound,
    Config,
    DataConfig,
    EvalConfig,
    ExportConfig,
    ModelConfig,
    Spec,
    TrainConfig,
    best_metric_k,
    spec,
    to_dict,
)
from mltrain.config_yaml import (  # noqa: F401 - re-exported
    MAX_CONFIG_BYTES,
    TooDeep,
    _Loader,
    apply_overrides,
    clipped,
    override_key,
    parse_override,
    read_yaml,
    yaml_value,
)
from mltrain.errors import ConfigError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            hint = f"; write one item as a list: [{value}]" if isinstance(value, (str, int)) else ""
            raise ConfigError(f"{key}: expected a list, got {value!r}{hint}")
        (item,) = typing.get_args(tp)
        if item is str:  # `exclude_classes: [10]`: YAML reads a class named 10 as a number
            value = [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                     for v in value]  # fmt: skip
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict and key.endswith("_args"):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is dict or tp is dict:
        return _check_spec(value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is Any or isinstance(value, tp):
        return value
    hint = f"; quote it ('{value}') to use it as text" if tp is str and is_number(value) else ""
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}{hint}")


def _check_spec(value: Any, key: str) -> Spec:
    if isinstance(value, str):  # shorthand: `loss: TripletMarginLoss`
        value = {"name": value}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise ConfigError(f"{key}: expected {{name: ..., args: {{...}}}}, got {value!r}")
    unknown = set(value) - {"name", "args"}
    if unknown:
        raise ConfigError(f"{key}: unknown keys {sorted(unknown)}; a component has name and args")
    args = value.get("args") or {}
    if not isinstance(args, dict):
        raise ConfigError(f"{key}.args: expected a mapping, got {args!r}")
    return {"name": value["name"], "args": dict(args)}


def _from_dict(cls: type, data: dict, prefix: str) -> Any:
    """`cls` from `data`, whose keys `from_dict` has checked (`_unknown_keys`)."""
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**values)


def from_dict(data: dict, source: str = "<dict>", overrides: list[str] | None = None) -> Config:
    """Build a validated `Config`; errors name `source` (the file), the `--set` overrides
    that wrote the key at fault (all of them when none names it) and the key. Several unknown
    keys are named at once, each with its closest valid key, so typos are fixed in one go."""
    try:
        _check_keys(_unknown_keys(Config, data or {}, ""))
        return validate(_from_dict(Config, data or {}, ""))
    except ConfigError as e:
        raise ConfigError(f"{with_sets(source, overrides, e)}: {e}") from None


def _unknown_keys(cls: type, data: Any, prefix: str) -> list[tuple[str, list[str]]]:
    """Every key of `data` that `cls` (a config dataclass) lacks, nested sections included:
    (dotted key, the valid keys of its section)."""
    if not isinstance(data, dict):
        return []  # not a section: `_coerce` says so
    names = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    out = []
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            out.append((key, names))
        elif dataclasses.is_dataclass(hints[k]):
            out += _unknown_keys(hints[k], v, key)
    return out


def _check_keys(unknown: list[tuple[str, list[str]]]) -> None:
    """One unknown key with its section's valid keys; several at once, each with its closest
    valid key, so that typos are fixed in one go."""
    if len(unknown) == 1:
        key, names = unknown[0]
        raise ConfigError(f"unknown key '{key}'; valid keys here: {', '.join(names)}")
    if unknown:
        guesses = [(key, difflib.get_close_matches(key.rpartition(".")[2], names, n=1))
                   for key, names in unknown]  # fmt: skip
        raise ConfigError("unknown keys " + ", ".join(
            f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")
            for key, close in guesses))  # fmt: skip


def with_sets(source: str, overrides: list[str] | None, error: ConfigError) -> str:
    """`source` and the overrides behind `error`: those that wrote its key (or a key above or
    below it), so that a mistake in one `--set` among ten names that one; all of them where
    the key at fault is not known or none wrote it."""
    if not overrides:
        return source
    faults = [error.key] if error.key else _fault_keys(str(error))
    named = [o for o in overrides
             if any(_under(k, f) or _under(f, k) for k in _set_keys(o) for f in faults)]
    return f"{source} with --set {' '.join(map(clipped, named or overrides))}"


def _fault_keys(message: str) -> list[str]:
    """The dotted keys a validation message is about: "unknown key(s) 'K', ..." (the quoted
    keys before any hint) or a leading "K: "."""
    if message.startswith("unknown key"):
        return re.findall(r"(?:^unknown keys? |, )'([^']+)'", message)
    found = re.match(r"([A-Za-z_][\w.]*): ", message)
    return [found.group(1)] if found else []



# export, compare) refuse these in --set instead of silently ignoring them.
TRAINING_ONLY = ("train", "data.augment", "data.class_augment", "model.frozen_stages",
                 "model.trainable_stages", "model.freeze_bn", "model.bn_stats")
READ_BY_INFERENCE = ("train.device", "train.channels_last")
INFERENCE_TWIN = {"train.amp": "eval.amp", "train.batch_size": "eval.batch_size"}


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def _set_keys(item: str) -> list[str]:
    """The dotted keys one `--set` writes: its own, or each leaf of a mapping it sets
    (`--set 'data={augment: []}'` writes data.augment)."""
    path, value = parse_override(item)

    def leaves(prefix: str, v: Any) -> list[str]:
        if not isinstance(v, dict) or not v:
            return [prefix]
        return [k for name, sub in v.items() for k in leaves(f"{prefix}.{name}", sub)]

    return leaves(".".join(path), value)


def _training_only(key: str) -> bool:
    return key not in READ_BY_INFERENCE and any(_under(key, k) for k in TRAINING_ONLY)


def is_training_only(key: str) -> bool:
    """Whether only training reads the dotted `key` (an embedding never depends on it)."""
    return _training_only(key)


def check_inference_overrides(overrides: list[str], command: str) -> None:
    """A `--set` that `command` would ignore is a one-line error, naming the key it meant."""
    for item in overrides:
        ignored = [k for k in _set_keys(item) if _training_only(k)]
        if not ignored:
            continue
        key = override_key(item) if _training_only(override_key(item)) else ignored[0]
        twin = INFERENCE_TWIN.get(key)
        where = f"set {twin} instead" if twin else "it takes effect in train.py"
        raise ConfigError(f"--set {key}: only training reads it, so {command} would ignore it; "
                          f"{where}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply `--set` overrides.

    The run name defaults to the file's stem so runs land in `experiments/<config name>/`.
    """
    data = read_yaml(path) if path else {}
    if path and "name" not in data:
        data["name"] = Path(path).stem
    source = str(path) if path else "defaults"
    if not overrides:
        return from_dict(data, source)
    # overrides apply on top of the filled-in defaults, so `--set train.optimizer.args.lr=..`
    # works when the file leaves the optimizer out
    data = apply_overrides(to_dict(from_dict(data, source)), overrides)
    return from_dict(data, source, overrides)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
