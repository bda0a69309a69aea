"""The editor interface: the null editor and pluggable editor factories."""

import numpy as np
import pytest

from step1x_batch.editor import EditorSpec, EditRow, NullEditor, load_editor


class Inverting:
    """A plug-in editor: ``kind: tests.test_editor:Inverting``."""

    def __init__(self, spec: EditorSpec):
        self.model_id = spec.model_id or "inverting"

    def edit_rows(self, rows):
        return NullEditor(self.model_id).edit_rows(
            [EditRow(255 - r.image, r.instruction, r.seed, r.params) for r in rows]
        )


def test_null_editor_returns_input():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    (out,) = load_editor(EditorSpec(kind="null")).edit_rows([EditRow(img, "x", 7)])
    assert out.image is img and (out.width, out.height, out.seed) == (3, 2, 7) and out.error_type is None


def test_factory_kind_loads_a_plugin():
    editor = load_editor(EditorSpec(kind="tests.test_editor:Inverting", model_id="inv-1"))
    img = np.zeros((4, 4, 3), np.uint8)
    (out,) = editor.edit_rows([EditRow(img, "x", 1)])
    assert editor.model_id == "inv-1" and (out.image == 255).all()


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown editor kind"):
        load_editor(EditorSpec(kind="nope"))
