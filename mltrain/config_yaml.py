"""Strict YAML: YAML 1.2 scalars, repeated keys refused, bounded file size and depth; and the
`--set key=value` overrides applied on top. Knows nothing of the config's keys."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from mltrain.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: `1e-4` is a float and only true/false are booleans
    (YAML 1.1 would read `amp: off` as False)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    """A mapping that names a key twice is refused: YAML would keep the last silently."""
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            repeated = key in seen
        except TypeError:  # a list or mapping as a key: PyYAML itself refuses it below
            continue
        if repeated:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one section", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class TooDeep(yaml.YAMLError):
    """YAML nested deeper than Python's recursion allows: PyYAML builds nodes recursively, so
    20,000 `[` would be a RecursionError; no config comes close."""

    def __str__(self) -> str:
        return "nested too deeply (a config has a few levels of sections)"


def yaml_value(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise TooDeep() from None


def clipped(text: str, limit: int = 100) -> str:
    """`text` as messages echo it: a value pasted by mistake (a million characters) is cut,
    with its length said, so that the error stays one readable line."""
    return text if len(text) <= limit else f"{text[: limit - 30]}... ({len(text):,} characters)"


def override_key(text: str) -> str:
    """The dotted key of a `--set key=value` override, as written."""
    return text.split("=", 1)[0].strip()


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML, so `1e-3`, `true`, `[1, 2]` work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set train.epochs=3")
    key, raw = override_key(text), text.split("=", 1)[1]
    try:
        value = yaml_value(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        if raw.strip()[:1] in "{[":  # meant as a mapping or list: a plain string would mislead
            problem = str(getattr(e, "problem", "") or e).splitlines()[0]
            raise ConfigError(
                f"--set {key}: {clipped(raw.strip())!r} is not valid YAML ({problem}); check its "
                "brackets and quotes"
            ) from None
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: '{k}' is not a section")
        node[keys[-1]] = value
    return data



MAX_CONFIG_BYTES = 2**20  # a config is a few KB; more is another file given by mistake


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.yaml"))[:5]
        raise ConfigError(
            f"--config {path} is a folder; pass one YAML file in it"
            + (f", e.g. {path / found[0]} (it holds {', '.join(found)})" if found else "")
        )
    if not path.exists():
        guesses = [q for q in (Path("configs") / f"{path.stem}.yaml", path.with_suffix(".yaml"))
                   if q != path and q.is_file()]  # fmt: skip
        hint = f"did you mean {guesses[0]}?" if guesses else "see configs/ for examples"
        raise ConfigError(f"config file {path} does not exist; {hint}")
    if not path.is_file():  # a FIFO or device would hang the read
        raise ConfigError(f"config file {path} is not a regular file; pass a YAML file")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        most = MAX_CONFIG_BYTES // 2**20
        raise ConfigError(f"config file {path} holds {size:,} bytes, more than a config ({most} "
                          "MiB at most); pass a YAML config")  # fmt: skip
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start:,} is "
                          f"{e.object[e.start]:#04x}); pass a YAML config") from None  # fmt: skip
    try:
        data = yaml_value(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data
