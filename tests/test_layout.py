"""The layout's promises (DESIGN.md, "Layout"): the tree there is the tree in git, imports never
run back up the data flow and make no loops, no package file passes 500 lines, only the model
adapters name a model's module paths, and nothing points at files outside the repository."""

from __future__ import annotations

import ast
import re
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "scaling_attn_compile"
MAX_LINES = 500

# Each part of the package and its floor: a part imports only parts on lower floors (and itself).
# The data flow runs down: offline -> plan; compile -> ops -> kernels; everything on contract.
FLOORS = {
    "errors": 0, "testing": 0,
    "contract": 1,
    "kernels": 2, "models": 2, "args": 2,
    "ops": 3,
    "plan": 4,
    "compile": 5, "offline": 5,
    "tiny": 6,
    "quality": 7, "cli_pipeline": 7,
    "cli_fast": 8,  # fast --objective video: runs quality.measure's attention, called by cli
    "cli": 9,
    "__init__": 10,
}

# Wan's module paths and the attribute paths to them. Only models/ may name them (tiny/, which
# builds and trains its own Wan models, asks the adapter too).
WAN_PATHS = re.compile(r"attn1|attn2|attn<k>|patch_embedding|timesteps_proj|proj_out|"
                       r"condition_embedder|blocks\.<|\.blocks\b|\\Wrope|\.rope\b")
WAN_ALLOWED = (f"{PKG}/models/",)


def tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs a git checkout (git ls-files)")
    return [p for p in out.splitlines() if (ROOT / p).exists()]


def layout_tree() -> list[tuple[str, str]]:
    """``(folder path, the rest of its line)`` for each line of DESIGN.md's layout tree."""
    text = (ROOT / "DESIGN.md").read_text()
    assert text.lstrip().startswith("# "), "DESIGN.md must open with its title"
    head = text.index("\n## ") + 1
    assert text.startswith("## Layout", head), "the layout must be DESIGN.md's first section"
    block = text[head:].split("```", 2)[1]
    rows, stack = [], []
    for line in block.strip("\n").splitlines():
        m = re.match(r"^([│├└─ ]*)([\w.-]+/)\s+(.*)$", line)
        assert m, f"DESIGN.md layout line is not 'folder/  what lives there': {line!r}"
        depth = len(m.group(1)) // 4
        stack[depth:] = [m.group(2)]
        rows.append(("".join(stack).rstrip("/"), m.group(3)))
    return rows


def test_design_tree_matches_git_ls_files():
    files = tracked()
    folders = {str(Path(p).parent) for p in files} - {"."}
    rows = layout_tree()
    listed = [path for path, _ in rows]
    assert len(listed) == len(set(listed)), f"a folder is listed twice: {listed}"
    # Every folder with tracked files is in the tree (a folder that only holds folders may be).
    assert sorted(folders - set(listed)) == [], "folders missing from DESIGN.md's layout"
    parents = {str(p) for f in folders for p in Path(f).parents} - {"."}
    assert sorted(set(listed) - folders - parents) == [], "DESIGN.md lists folders git does not have"
    # In the package, each folder's line names exactly its own .py files.
    for path, rest in rows:
        if not path.startswith(PKG):
            continue
        have = {Path(p).name for p in files if str(Path(p).parent) == path and p.endswith(".py")}
        named = set(re.findall(r"[\w]+\.py\b", rest))
        if path == PKG or have - {"__init__.py"}:
            assert named == have - ({"__init__.py"} if path != PKG else set()), (
                f"DESIGN.md's line for {path}/ names {sorted(named)}, git has {sorted(have)}")


def test_no_package_file_over_500_lines():
    long = {p: n for p in tracked() if p.startswith(PKG + "/") and p.endswith(".py")
            and (n := len((ROOT / p).read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these (over {MAX_LINES} lines)"


def imports_of(path: str) -> set[str]:
    """The package modules a file imports (dotted, under the package), lazy imports included."""
    rel = Path(path).relative_to(PKG).with_suffix("").parts
    pkg = list(rel[:-1])
    out = set()
    for n in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(n, ast.ImportFrom):
            if n.level:
                base = pkg[: len(pkg) - (n.level - 1)]
                mod = base + (n.module.split(".") if n.module else [])
            elif (n.module or "").split(".")[0] == PKG:
                mod = n.module.split(".")[1:]
            else:
                continue
            for a in n.names:
                sub = ROOT / PKG / Path(*mod, a.name)
                out.add(".".join(mod + [a.name]) if sub.with_suffix(".py").exists()
                        or sub.is_dir() else ".".join(mod))
        elif isinstance(n, ast.Import):
            out |= {a.name.split(".", 1)[1] for a in n.names if a.name.startswith(PKG + ".")}
    return {m for m in out if m}


def package_graph() -> dict[str, set[str]]:
    graph = {}
    for p in tracked():
        if p.startswith(PKG + "/") and p.endswith(".py"):
            mod = ".".join(Path(p).relative_to(PKG).with_suffix("").parts)
            graph[mod.removesuffix(".__init__")] = imports_of(p)
    return graph


def part(mod: str) -> str:
    return mod.split(".")[0]


def test_imports_run_down_the_floors():
    up = []
    for mod, deps in package_graph().items():
        assert part(mod) in FLOORS, f"{mod}: a new part of the package needs a floor in FLOORS"
        for d in deps:
            if part(d) != part(mod) and FLOORS[part(d)] >= FLOORS[part(mod)]:
                up.append(f"{mod} -> {d}")
    assert up == [], "imports that run back up (or sideways) the data flow"


def test_kernels_import_only_the_contract():
    graph = package_graph()
    outside = {f"{m} -> {d}" for m, deps in graph.items() if part(m) == "kernels"
               for d in deps if part(d) not in ("kernels", "contract")}
    assert outside == set()


def test_no_import_loops():
    graph = package_graph()
    # Importing a package runs its __init__: an edge to "a.b" is an edge to "a" too.
    edges = defaultdict(set)
    for m, deps in graph.items():
        for d in deps:
            edges[m].add(d)
    state, loops = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(edges[m]):
            if d not in graph or d == m:
                continue
            if state.get(d) == "open":
                loops.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert loops == []


def test_only_model_adapters_name_wan_module_paths():
    hits = []
    for p in tracked():
        if not p.endswith(".py") or not (p.startswith(PKG + "/") or p.startswith("benchmarks/")):
            continue
        if p.startswith(WAN_ALLOWED):
            continue
        for i, line in enumerate((ROOT / p).read_text().splitlines(), 1):
            if WAN_PATHS.search(line):
                hits.append(f"{p}:{i}: {line.strip()}")
    assert hits == [], "ask models/wan.py instead of naming Wan's modules"


def test_nothing_points_outside_the_repository():
    bad = []
    for p in tracked():
        if not re.search(r"\.(py|md|sh|toml)$", p) or p.startswith("benchmarks/results/") or (
                p == "tests/test_layout.py"):
            continue
        for i, line in enumerate((ROOT / p).read_text().splitlines(), 1):
            if "../shared" in line or re.search(r"(?<![\w/])research/\w+\.md", line):
                bad.append(f"{p}:{i}")
    assert bad == [], "users do not have these files"
