"""The architecture the tree promises, checked on the source: no import cycles, a pure core, stages in order.

Every `import` statement counts, including the ones inside functions (a lazy import hides a cycle from Python, not
from this test).
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("lancet_core", "tasks", "flows")
# pipeline order: a stage may import the shared plumbing and earlier stages, never a later one
STAGES = ("data", "index", "recall", "correct", "evaluate", "demo")
# gguf: turns a GGUF file into the HF model directory every stage starts from (a model_io concern, split out for its
# size); no stage consumes GGUF, so it sits beside model_io rather than in one.
PLUMBING = {"errors", "manifest", "formats", "model_io", "chat", "generation", "gguf", "threads"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of everything `path` imports (modules, or module.attribute for `from m import x`)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {i for i in _imports(m, p) if i in mods and i != m} for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, f"import cycles: {cycles}"


def test_cycle_detector_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_lazy_imports_count():
    src = "def f():\n    from lancet_core.index import store\n"
    p = ROOT / "tests" / "core" / "_tmp_arch_probe.py"
    try:
        p.write_text(src)
        assert "lancet_core.index.store" in _imports("tests.core._tmp_arch_probe", p)
    finally:
        p.unlink()


@pytest.mark.parametrize("forbidden", ["prefect", "mlflow"])
def test_core_imports_neither_prefect_nor_mlflow(forbidden):
    bad = sorted(
        f"{m} imports {i}"
        for m, p in _modules().items()
        if m.startswith("lancet_core")
        for i in _imports(m, p)
        if i == forbidden or i.startswith(forbidden + ".")
    )
    assert not bad, bad


def test_only_tracking_imports_mlflow():
    users = sorted(
        m for m, p in _modules().items() if any(i == "mlflow" or i.startswith("mlflow.") for i in _imports(m, p))
    )
    assert users == ["tasks.tracking"]


def _stage(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "lancet_core" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in STAGES else "plumbing"


def test_stages_import_only_plumbing_and_earlier_stages():
    bad = []
    for m, deps in _graph().items():
        src = _stage(m)
        if src is None:
            continue
        for d in deps:
            dst = _stage(d)
            if dst is None or dst == src or dst == "plumbing":
                continue
            if src == "plumbing" or STAGES.index(dst) > STAGES.index(src):
                bad.append(f"{m} → {d}")
    assert not bad, "a stage imports a later stage (or plumbing imports a stage): " + ", ".join(sorted(bad))


def test_plumbing_is_what_the_core_docstring_says():
    top = {p.stem for p in (ROOT / "lancet_core").glob("*.py")} - {"__init__"}
    assert top == PLUMBING
    subpackages = {p.parent.name for p in (ROOT / "lancet_core").glob("*/__init__.py")}
    assert subpackages == set(STAGES)


def test_every_module_has_a_docstring():
    missing = [m for m, p in _modules().items() if ast.get_docstring(ast.parse(p.read_text())) is None and p.stat().st_size]
    assert not missing, missing


def test_task_and_flow_modules_use_stage_names():
    tasks = {p.stem for p in (ROOT / "tasks").glob("*.py")} - {"__init__", "cache", "tracking"}
    assert tasks <= set(STAGES), tasks - set(STAGES)
    tests = {p.name for p in (ROOT / "tests" / "core").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert tests == set(STAGES)


def test_nothing_points_outside_the_repo():
    """`../shared/` exists on the developers' machines only; the repo must stand on its own."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hits = [
        f
        for f in files
        if f != "tests/core/test_architecture.py"
        and (ROOT / f).is_file()
        and any(s in (ROOT / f).read_text(errors="ignore") for s in ("shared/DESIGN", "../shared"))
    ]
    assert not hits, hits
