"""The module map in docs/architecture.md names every module of the package and nothing else, so
the map a newcomer reads cannot drift from the code (the way open-metric-learning tests its
docs)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _map_block() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Module map\n", 1)[1]
    return section.split("```\n", 2)[1]


def _named() -> set[str]:
    """Paths the map names; a folder line (`mltrain/data/`) names its `__init__.py`."""
    named = set()
    for token in re.findall(r"mltrain/[\w/]*(?:\.py|/)", _map_block()):
        named.add(token + "__init__.py" if token.endswith("/") else token)
    return named


def test_module_map_names_every_module():
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "mltrain").rglob("*.py")}
    named = _named()
    assert not modules - named, f"docs/architecture.md misses {sorted(modules - named)}"
    assert not named - modules, f"docs/architecture.md names missing {sorted(named - modules)}"


# The layers, lowest first; modules directly in mltrain/ are the base. The entry shims
# (`python -m mltrain`, `python -m mltrain.search`, `python -m mltrain.compare`) sit above
# everything.
LAYERS = ["data", "model", "inference", "retrieval", "evaluation", "train", "commands"]
SHIMS = {"mltrain.search", "mltrain.compare", "mltrain.__main__"}


def _layer(module: str) -> int:
    if module in SHIMS:
        return len(LAYERS) + 1
    parts = module.split(".")
    return LAYERS.index(parts[1]) + 1 if len(parts) > 1 and parts[1] in LAYERS else 0


def test_no_module_imports_a_later_layer():
    upward = []
    for path in sorted((ROOT / "mltrain").rglob("*.py")):
        me = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            if not (module or "").startswith("mltrain"):
                continue
            names = [f"mltrain.{a.name}" for a in node.names] if module == "mltrain" else []
            for target in names or [module]:
                if _layer(target) > _layer(me):
                    upward.append(f"{me} -> {target}")
    assert not upward, upward
