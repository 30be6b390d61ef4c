"""The README's module map names every module of the package and nothing else, so the map a
newcomer reads cannot drift from the code (the way open-metric-learning tests its docs)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _map_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Development\n", 1)[1]
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
    assert not modules - named, f"README module map misses {sorted(modules - named)}"
    assert not named - modules, f"README module map names missing {sorted(named - modules)}"
