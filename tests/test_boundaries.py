"""Module boundaries that deployment depends on.

GPU machines may lack Ray, so the model packages must import without it; model packages import
nothing from the job side (only the foundation, ``errors``); the Ray stages know models only through
the family interface; the layers of docs/architecture.md import only downwards; and no module of the
package imports itself back through others (a test walks every import statement).
"""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "step1x_batch"

MODEL_MODULES = [
    "step1x_batch.models",
    "step1x_batch.models.base",
    "step1x_batch.models.loading",
    "step1x_batch.models.null",
    "step1x_batch.models.qwen_vl.encoder",
    "step1x_batch.models.qwen_vl.processor",
    "step1x_batch.models.qwen_vl.rope",
    "step1x_batch.models.qwen_vl.tiny",
    "step1x_batch.models.step1x",
    "step1x_batch.models.step1x.family",
    "step1x_batch.models.step1x.pipeline",
    "step1x_batch.models.step1x.prepare",
    "step1x_batch.models.step1x.sampling",
    "step1x_batch.models.step1x.tiny",
    "step1x_batch.models.step1x.conditioner",
    "step1x_batch.models.qwen_image_edit",
]


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)


def test_model_packages_import_without_ray_and_nothing_from_the_job_side():
    proc = run(f"""
        import sys
        sys.modules["ray"] = None  # any "import ray" now raises ImportError
        import importlib, pkgutil
        import step1x_batch.models as models
        names = {MODEL_MODULES!r}
        names += [m.name for m in pkgutil.walk_packages(models.__path__, "step1x_batch.models.")]
        for name in names:
            importlib.import_module(name)
        job_side = sorted(m for m in sys.modules if m.startswith("step1x_batch.")
                          and not m.startswith("step1x_batch.models") and m != "step1x_batch.errors")
        print("job side:", ",".join(job_side))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "job side:"


def test_the_judge_imports_without_ray():
    """A GPU machine judging with the transformers engine (or gpu_check's judge check) has no Ray."""
    proc = run("""
        import sys
        sys.modules["ray"] = None
        import importlib, pkgutil
        import step1x_batch.judge as judge
        for m in pkgutil.walk_packages(judge.__path__, "step1x_batch.judge."):
            importlib.import_module(m.name)
        print(sorted(m for m in sys.modules if m.startswith("step1x_batch.job") or m.startswith("step1x_batch.recipes")))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_ray_side_imports_no_model_internals():
    proc = run("""
        import sys, importlib
        for name in ["step1x_batch.job.stages", "step1x_batch.job.runner", "step1x_batch.job.config",
                     "step1x_batch.rows.manifest", "step1x_batch.recipes.synthesize", "step1x_batch.recipes.catalog"]:
            importlib.import_module(name)
        leaked = sorted(m for m in sys.modules if m.startswith("step1x_batch.models")
                        and m not in ("step1x_batch.models", "step1x_batch.models.base",
                                      "step1x_batch.models.determinism"))
        print(",".join(leaked))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every ``import`` / ``from ... import`` statement in the package (at any depth, type-checking
    ones included), as edges between the package's own modules."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule; `from mod import name` the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    assert "step1x_batch.models.base" in graph["step1x_batch.job.stages"]  # edges are really read
    assert "step1x_batch.models.step1x.conditioner" in graph["step1x_batch.models.step1x.prepare"]


def test_no_import_cycles_in_the_package():
    assert cycles(import_graph()) == []


# The layers of docs/architecture.md, lowest first: a module imports only its own layer or lower.
LAYERS = ["errors", "models", "io", "rows", "judge", "job", "recipes", "cli"]


def layer_of(module: str) -> int:
    """A module's layer: its first name under the package (``cli`` and ``demo`` are the top)."""
    parts = module.split(".")
    if len(parts) == 1:  # the package's own __init__
        return 0
    top = parts[1]
    return LAYERS.index(top) if top in LAYERS else LAYERS.index("cli")


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def test_the_layer_check_sees_an_upward_import():
    assert upward_imports({"step1x_batch.rows.log": {"step1x_batch.job.lease"}}) == [
        ("step1x_batch.rows.log", "step1x_batch.job.lease")]
    assert upward_imports({"step1x_batch.job.lease": {"step1x_batch.rows.log"}}) == []
    assert layer_of("step1x_batch.demo") == layer_of("step1x_batch.cli") == len(LAYERS) - 1
    assert layer_of("step1x_batch.models.step1x.dit") == 1


def test_every_import_goes_to_the_same_layer_or_a_lower_one():
    graph = import_graph()
    assert {layer_of(m) for m in graph} == set(range(len(LAYERS)))  # every layer has modules
    assert upward_imports(graph) == []
