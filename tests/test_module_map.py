"""The module map in docs/architecture.md names every module of the package and nothing else, so
the map a newcomer reads cannot drift from the code (the way open-metric-learning tests its
docs)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mltrain.__main__ import COMMANDS

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


# The layers, lowest first; modules directly in mltrain/ are the base. The entry point
# `python -m mltrain` (mltrain/__main__.py, every command by name) sits above everything.
LAYERS = ["data", "model", "inference", "retrieval", "evaluation", "train", "commands"]
SHIMS = {"mltrain.__main__"}


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


def _modules() -> dict[str, ast.Module]:
    return {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): ast.parse(
            p.read_text()
        )
        for p in sorted((ROOT / "mltrain").rglob("*.py"))
    }


def _imports(tree: ast.Module, known: set[str]) -> set[str]:
    """Package modules `tree` imports anywhere (deferred imports inside functions included: a
    circle through them is still a circle a reader has to untangle)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known}
    return out


def test_no_import_circle():
    trees = _modules()
    graph = {m: _imports(t, set(trees)) - {m} for m, t in trees.items()}
    # A package's __init__ importing its own modules is how packages re-export: not a circle.
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    circles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                circles.append(" -> ".join(path[path.index(t):] + [m, t]) if t in path
                               else f"{m} -> {t}")  # fmt: skip
            elif t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not circles, circles


def test_argparse_only_in_commands():
    users = [m for m, t in _modules().items() if "argparse" in _imports_any(t)
             and not m.startswith("mltrain.commands")]  # fmt: skip
    assert not users, f"argparse outside mltrain/commands/: {users}"


def _imports_any(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_modules_stay_small():
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines())
             for p in (ROOT / "mltrain").rglob("*.py")}  # fmt: skip
    large = {p: n for p, n in sizes.items() if n >= 500}
    assert not large, f"modules of 500 lines or more (split them by job): {large}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_commands_help_answers_before_torch_faiss_or_timm_import(command):
    """`-h` (and a mistyped flag) should answer at once: torch, timm and Faiss take 2-6 s to
    import, so each command imports them only after its arguments are checked."""
    code = ("import sys\nfrom mltrain.__main__ import main\n"
            f"try:\n    main([{command!r}, '-h'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'faiss', 'timm') if m in sys.modules), "
            "file=sys.stderr)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=ROOT)  # fmt: skip
    assert done.stdout.startswith("usage:") and done.stderr.splitlines()[-1] == "[]"
