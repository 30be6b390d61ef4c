"""The documentation cannot drift from the code: the config reference lists every dataclass
field with its default and nothing else, every command and `--set` key in the docs' commands
exists, the MkDocs site builds with `--strict`, and the docs speak of the product, not of the
work that made it."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from mltrain.__main__ import COMMANDS
from mltrain.config import Config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]


def render(value: Any) -> str:
    """A default as the reference writes it: YAML flow style, in the order the code sets it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {render(v)}" for k, v in value.items()) + "}"
    return str(value)


def config_fields(obj: Any = None, prefix: str = "") -> dict[str, str]:
    """Every leaf key of the config dataclasses (`train.optimizer`, ...) and its default."""
    obj = Config() if obj is None else obj
    keys: dict[str, str] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys.update(config_fields(value, f"{prefix}{f.name}."))
        else:
            keys[prefix + f.name] = render(value)
    return keys


def reference_rows() -> dict[str, str]:
    """`key -> default` from the table under docs/config.md's "## Every key"."""
    section = (DOCS / "config.md").read_text().split("## Every key\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        key, default = cells[0].strip("`"), cells[1]
        assert key not in rows, f"docs/config.md lists {key} twice"
        assert re.fullmatch(r"`[^`]*`", default), f"{key}: default {default!r} is not one code span"
        rows[key] = default.strip("`")
    return rows


def test_config_reference_matches_the_dataclasses():
    fields, rows = config_fields(), reference_rows()
    missing = [k for k in fields if k not in rows]
    assert not missing, "docs/config.md misses keys; add rows:\n" + "\n".join(
        f"| `{k}` | `{fields[k]}` | ... |" for k in missing
    )
    extra = sorted(set(rows) - set(fields))
    assert not extra, f"docs/config.md lists keys the config does not have: {extra}"
    wrong = {k: (rows[k], fields[k]) for k in fields if rows[k] != fields[k]}
    assert not wrong, f"docs/config.md defaults differ from the code (docs, code): {wrong}"


def test_render_writes_yaml_that_reads_back():
    from mltrain.config import _Loader

    for key, text in config_fields().items():
        value = Config()
        for part in key.split("."):
            value = getattr(value, part)
        assert yaml.load(text, Loader=_Loader) == value, key


# --- commands in the docs ---------------------------------------------------------------------

FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)
INLINE = re.compile(r"`([^`]+)`")  # a span may wrap onto the next line of its paragraph


def command_text(path: Path) -> str:
    """Fenced blocks and inline code spans of a page (one span a line), continuation lines
    joined."""
    text = path.read_text()
    blocks = FENCE.findall(text)
    spans = [" ".join(s.split()) for s in INLINE.findall(FENCE.sub("", text)) if "\n\n" not in s]
    return "\n".join(blocks + spans).replace("\\\n", " ")


def mapping_fields(cls: type = Config, prefix: str = "") -> set[str]:
    """Keys whose value is a mapping (`train.optimizer`, `export.index_args`): `--set` may
    reach inside them (`train.optimizer.args.lr`)."""
    keys: set[str] = set()
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys |= mapping_fields(hint, f"{prefix}{name}.")
        elif "dict" in str(hint):
            keys.add(prefix + name)
    return keys


def _key_exists(key: str, fields: dict[str, str]) -> bool:
    """A config key, or a key inside a mapping-valued one (`train.optimizer.args.lr`)."""
    parts, mappings = key.split("."), mapping_fields()
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in fields:
            return n == len(parts) or head in mappings
    return False


def test_docs_commands_name_real_commands_and_config_keys():
    fields = config_fields()
    bad = []
    for page in PAGES:
        text = command_text(page)
        name = page.relative_to(ROOT)
        for cmd in re.findall(r"(?:python -m |^|[\s;&|(])mltrain ([a-z][\w-]*)", text, re.M):
            if cmd not in COMMANDS:
                bad.append(f"{name}: unknown command `mltrain {cmd}`")
        for module in re.findall(r"python -m (mltrain\.[\w.]+)", text):
            if importlib.util.find_spec(module) is None:
                bad.append(f"{name}: no module {module}")
        for script in re.findall(r"python ((?:benchmarks/)?[\w/]+\.py)", text):
            if not (ROOT / script).is_file():
                bad.append(f"{name}: no script {script}")
        for key in re.findall(r"--(?:eval-)?set\s+[\"']?([a-z_][\w.]*)=", text):
            if not _key_exists(key, fields):
                bad.append(f"{name}: --set {key} is no config key")
    assert not bad, "\n".join(bad)


RUN = re.compile(
    r"python (train\.py|evaluate\.py|-m mltrain (?:train|evaluate|export|compare)) [^\n`]*"
)


def test_documented_runs_load_their_config():
    """Every documented `train` / `evaluate` / `export` / `compare` command with a `--config`
    loads that file with its `--set` overrides as the command would, so a shipped config that
    changes cannot leave the docs' commands failing."""
    from mltrain.config import check_inference_overrides, load_config
    from mltrain.errors import ConfigError

    bad, checked = [], 0
    for page in PAGES:
        for line in command_text(page).splitlines():
            for match in RUN.finditer(line):
                args = shlex.split(match.group(0), comments=True)
                if "--config" not in args or "..." in match.group(0):
                    continue
                config = args[args.index("--config") + 1]
                if Path(config).stem.isupper():  # a placeholder: CFG, configs/CONFIG.yaml
                    continue
                # `--set "$VAR"`: a value the page defines in its own text (a long augment list)
                sets = [args[i + 1] for i, a in enumerate(args[:-1])
                        if a == "--set" and not args[i + 1].startswith("$")]
                try:
                    load_config(ROOT / config, sets)
                    if "train" not in match.group(1):
                        check_inference_overrides(sets, match.group(1))
                except ConfigError as e:
                    bad.append(f"{page.relative_to(ROOT)}: {match.group(0)}\n  {e}")
                checked += 1
    assert checked >= 20, checked
    assert not bad, "\n".join(bad)


ARGUMENT = re.compile(r"add_argument\(\s*\"(--[\w-]+)\"")


def test_documented_benchmark_flags_exist():
    """A benchmark's documented flags are ones its argparse declares (benchmarks change their
    flags; the commands that produced the docs' figures must still run)."""
    bad, checked = [], 0
    for page in PAGES:
        text = command_text(page)
        for script, rest in re.findall(r"python (benchmarks/\w+\.py)([^\n]*)", text):
            if not (ROOT / script).is_file():
                continue  # the script check above names it
            declared = set(ARGUMENT.findall((ROOT / script).read_text()))
            for flag in re.findall(r"(?:^|\s)(--[a-z][\w-]*)", rest.split("#")[0]):
                checked += 1
                if flag not in declared:
                    bad.append(f"{page.relative_to(ROOT)}: {script} has no {flag}")
    assert checked >= 5, checked
    assert not bad, "\n".join(bad)


def test_key_check_tells_real_keys_from_typos():
    fields = config_fields()
    assert _key_exists("train.optimizer.args.lr", fields)
    assert _key_exists("model.pooling.args.p", fields)
    assert _key_exists("eval.tsne", fields)
    assert not _key_exists("eval.tnse", fields)
    assert not _key_exists("eval.tsne.args", fields)
    assert _key_exists("train.miner.args.epsilon", fields)  # a mapping or null
    assert not _key_exists("model.image_size.x", fields)  # an int or null
    assert not _key_exists("train", fields)


# --- the site -----------------------------------------------------------------------------


def test_mkdocs_builds_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "config" / "index.html").is_file()


def test_nav_names_every_page():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def files(entries):
        for entry in entries:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            yield from files(value) if isinstance(value, list) else [value]

    listed = set(files(nav["nav"]))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert not listed - pages, f"nav names missing pages: {sorted(listed - pages)}"
    assert not pages - listed, f"pages left out of the nav: {sorted(pages - listed)}"


# --- history words --------------------------------------------------------------------------

HISTORY = re.compile(r"session [0-9]|\btrials?\b|issue [0-9]+", re.I)
SCANNED = ["README.md", "docs", "mltrain", "tests", "configs", "benchmarks"]


def test_no_history_words():
    """Docs, code and tests describe the product: what it does and what was measured, never the
    sessions or user studies that led there (`grep -rniE` of the pattern finds nothing)."""
    hits = []
    for top in SCANNED:
        path = ROOT / top
        for f in [path] if path.is_file() else sorted(path.rglob("*")):
            if not f.is_file() or "__pycache__" in f.parts:
                continue
            try:
                text = f.read_text()
            except UnicodeDecodeError:  # images and other binary files
                continue
            for n, line in enumerate(text.splitlines(), 1):
                if HISTORY.search(line):
                    hits.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_history_pattern_catches_what_it_should():
    """The pattern is the one `grep -iE` runs over the same folders; the words are assembled
    here so that this file passes its own scan."""
    caught = ["Sess" + "ion 8 trained", "a tri" + "al's typo", "Tri" + "als", "iss" + "ue 14"]
    for text in caught:
        assert HISTORY.search(text), text
    for text in ["a session of work", "industrial", "trialled", "the issue is"]:
        assert not HISTORY.search(text), text
