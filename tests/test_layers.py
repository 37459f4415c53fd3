"""The package's layers, read from its imports: a module imports only its own layer or those below,
sibling packages of one layer stay independent, no two modules import each other (directly or round
a loop), and the project's own modules are imported at the top of a file, except by the CLI, whose
commands load their flows on demand so that `tessera --help` and the preflight stay fast."""
import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tessera"
# Bottom to top. Top-level modules (cli, submit, status, fetch_models) form the top layer.
LAYERS = (("config",), ("core",), ("models",), ("filters", "eval", "training"), ("pipelines",), ("flows",),
          ("demo",), ("<top>",))
LAZY_ALLOWED = {"tessera.cli"}


def room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "<root>"
    return parts[1] if (PACKAGE / parts[1]).is_dir() else "<top>"


def level(module: str) -> int:
    r = room(module)
    if r == "<root>":
        return -1
    return next(i for i, names in enumerate(LAYERS) if r in names)


def imports_of(module: str, source: str, is_package: bool = False) -> list[tuple[str, bool]]:
    """(imported project module, imported inside a function) for every import in `source`."""
    tree = ast.parse(source)
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names if a.name.startswith("tessera"))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = module.split(".") if is_package else module.split(".")[:-1]
                    base = ".".join(pkg[:len(pkg) - child.level + 1] + ([child.module] if child.module else []))
                if base.startswith("tessera"):
                    for a in child.names:  # `from tessera.pipelines import score` imports a module
                        name = f"{base}.{a.name}"
                        found.append((name if name in MODULES else base, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def package_sources() -> dict[str, tuple[str, bool]]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path.read_text(), is_package)
    return out


MODULES = set(package_sources())


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    problems, graph = [], {}
    for module, (source, is_package) in sorted(sources.items()):
        graph[module] = set()
        for target, lazy in imports_of(module, source, is_package):
            if target == module or target not in sources:
                continue
            graph[module].add(target)
            if level(target) > level(module):
                problems.append(f"{module} imports {target}, a layer above it")
            elif level(target) == level(module) and room(target) != room(module) and level(module) >= 0 \
                    and room(module) != "<top>":
                problems.append(f"{module} imports {target}, an independent sibling")
            if lazy and module not in LAZY_ALLOWED:
                problems.append(f"{module} imports {target} inside a function")
    # Packages import their submodules (tessera.filters re-exports its filters); a cycle among
    # modules is a loop of imports between files.
    files = {m: {t for t in ts if not m.startswith(t + ".") and not t.startswith(m + ".")} for m, ts in graph.items()}
    try:
        graphlib.TopologicalSorter(files).prepare()
    except graphlib.CycleError as e:
        problems.append(f"import cycle: {' -> '.join(e.args[1])}")
    return problems


def test_the_package_keeps_its_layers():
    assert violations(package_sources()) == []


def test_the_check_fails_on_an_upward_import_a_cycle_and_a_lazy_import():
    sources = package_sources()
    broken = dict(sources)
    source, is_package = sources["tessera.core.store"]
    broken["tessera.core.store"] = (source + "\nfrom tessera.pipelines import score\n", is_package)
    assert "tessera.core.store imports tessera.pipelines.score, a layer above it" in violations(broken)

    broken = dict(sources)
    source, is_package = sources["tessera.core.funnel"]
    broken["tessera.core.funnel"] = (source + "\nimport tessera.core.lineage\n", is_package)
    source, is_package = sources["tessera.core.lineage"]
    broken["tessera.core.lineage"] = (source + "\nimport tessera.core.funnel\n", is_package)
    assert any(p.startswith("import cycle") for p in violations(broken))

    broken = dict(sources)
    source, is_package = sources["tessera.pipelines.score"]
    broken["tessera.pipelines.score"] = (source + "\ndef f():\n    from tessera.core import lineage\n", is_package)
    assert "tessera.pipelines.score imports tessera.core.lineage inside a function" in violations(broken)


@pytest.mark.parametrize("folder", ["pipelines", "core", "models", "training", "demo"])
def test_no_folder_holds_more_than_35_percent_of_the_code(folder):
    lines = {p: len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    share = sum(n for p, n in lines.items() if p.relative_to(PACKAGE).parts[0] == folder) / sum(lines.values())
    assert share <= 0.35, f"tessera/{folder}/ holds {share:.0%} of the code"


def test_every_data_stage_is_declared_with_its_work_and_result():
    from tessera.config import load_config
    from tessera.core.funnel import StageResult
    from tessera.pipelines.stages import data_stages

    cfg = load_config(PACKAGE.parent / "configs" / "demo.yaml", [])
    steps = data_stages(cfg)
    assert [s.name for s in steps] == ["download", "score", "select", "caption", "tokenize"]
    for step in steps:
        assert callable(step.work) and issubclass(step.result, StageResult) and step.outputs
    assert steps[-1].marker_folders(cfg.tokenize.resolutions) == [f"tokens/{r}" for r in cfg.tokenize.resolutions]
    assert data_stages(load_config(PACKAGE.parent / "configs" / "demo.yaml", ["caption.enabled=false"]))[3].name == "tokenize"
