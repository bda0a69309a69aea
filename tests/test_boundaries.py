"""Module boundaries that deployment depends on.

GPU machines may lack Ray, so the model package must import without it; the Ray stages may know
only the editor interface, never model internals.
"""

import subprocess
import sys
import textwrap

MODEL_MODULES = [
    "step1x_batch.editor",
    "step1x_batch.sampling",
    "step1x_batch.models.step1x.pipeline",
    "step1x_batch.models.step1x.tiny",
    "step1x_batch.models.step1x.conditioner",
    "step1x_batch.models.step1x.tiny_qwen",
]


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)


def test_model_package_imports_without_ray():
    proc = run(f"""
        import sys
        sys.modules["ray"] = None  # any "import ray" now raises ImportError
        import importlib
        for name in {MODEL_MODULES!r}:
            importlib.import_module(name)
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_ray_side_imports_no_model_internals():
    proc = run("""
        import sys, importlib
        for name in ["step1x_batch.stages", "step1x_batch.runner", "step1x_batch.config"]:
            importlib.import_module(name)
        leaked = sorted(m for m in sys.modules if m.startswith("step1x_batch.models"))
        print(",".join(leaked))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
