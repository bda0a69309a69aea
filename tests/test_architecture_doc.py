"""The design lives in the repository and stays true to the package: docs/architecture.md names
every module, its picture is regenerated from the folders, and the code cites it (issue 19)."""

import importlib.util
import re
from pathlib import Path

from test_boundaries import LAYERS

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def _drawing():
    spec = importlib.util.spec_from_file_location("architecture_svg", ROOT / "docs" / "architecture_svg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_picture_is_the_one_the_package_draws():
    drawing = _drawing()
    assert (ROOT / "docs" / "architecture.svg").read_text() == drawing.render(), (
        "docs/architecture.svg is stale: run python docs/architecture_svg.py")
    assert [name for name, _ in drawing.LAYERS] == LAYERS  # the picture's layers are the enforced ones
    assert "architecture.svg" in DOC.read_text()


def test_the_picture_reads_the_folders():
    drawing = _drawing()
    assert "stages.py" in drawing.layer_modules("job") and "state.py" in drawing.layer_modules("rows")
    assert "step1x/" in drawing.layer_modules("models")
    assert "lease.py" in drawing.render()


def test_every_module_is_named_in_the_architecture_page():
    text = DOC.read_text()
    for layer in ("io", "rows", "judge", "job", "recipes"):
        for path in sorted((ROOT / "step1x_batch" / layer).glob("*.py")):
            if path.name != "__init__.py":
                assert f"`{path.name}`" in text or f"`{layer}/{path.name}`" in text, f"{layer}/{path.name}"
    for layer in LAYERS:
        assert re.search(rf"^\| `{layer}(/|\.py)", text, re.M), f"layer {layer} missing from the table"


def test_the_code_cites_the_architecture_page_not_the_old_sketch():
    citing = [p for p in (ROOT / "step1x_batch").rglob("*.py") if "DESIGN.md" in p.read_text()]
    assert citing == []
    assert any("docs/architecture.md" in p.read_text() for p in (ROOT / "step1x_batch").rglob("*.py"))


def test_the_readme_layout_table_names_every_folder():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout"):]
    package = ROOT / "step1x_batch"
    folders = sorted(p.parent.relative_to(ROOT).as_posix() for p in package.rglob("__init__.py") if p.parent != package)
    assert "step1x_batch/job" in folders and "step1x_batch/models/step1x" in folders
    for folder in folders:
        assert f"| `{folder}/`" in table, f"README's layout table lacks {folder}/"
    assert "docs/architecture.md" in table
