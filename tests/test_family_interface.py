"""The model-family interface: the registry, plug-in families, Prepared rows, batching by key."""

import numpy as np
import pytest

from step1x_batch.models import FAMILIES, family_class, load_family
from step1x_batch.models.base import (
    EditOutput,
    EditRequest,
    ModelFamily,
    ModelSpec,
    Prepared,
    edit_prepared,
)


class NotAFamily:
    pass


def test_codes_a_model_reports_are_registered_row_error_codes():
    from step1x_batch.errors import CODES, RowError
    from step1x_batch.models.base import MODEL_ERROR_CODES

    assert MODEL_ERROR_CODES <= CODES
    for code in MODEL_ERROR_CODES:
        assert RowError(code, "m").code == code


def test_registry_and_plugins():
    assert set(FAMILIES) >= {"step1x", "qwen-image-edit", "null"}
    assert family_class("null").name == "null"
    plugin = family_class("job_plugins:MeanOfInputs")
    assert issubclass(plugin, ModelFamily) and plugin.name == "mean-of-inputs"
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        family_class("nope")
    with pytest.raises(ValueError, match="cannot import"):
        family_class("no_such_module:Thing")
    with pytest.raises(ValueError, match="not a ModelFamily"):
        family_class("test_family_interface:NotAFamily")


def test_null_family_returns_the_first_input():
    family = load_family(ModelSpec("null"))
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    row = family.preparer(None)(EditRequest([img], "x", 7))
    (out,) = family.load(None, "cpu").edit([Prepared.from_bytes(row.to_bytes())])
    assert np.array_equal(out.image, img) and (row.width, row.height) == (3, 2)
    assert family.model_id() == "null" and load_family(ModelSpec("null", model_id="n2")).model_id() == "n2"


def test_prepared_round_trips_through_bytes_without_pickle():
    row = Prepared("k|1", 5, 4, {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "b": np.zeros((0, 2), np.float32),
                               "c": np.full((4, 5, 3), 7, np.uint8)}, {"seed": 2**62, "text": "é"})
    data = row.to_bytes()
    assert b"pickle" not in data and data[8:9] == b"{"  # safetensors framing: a JSON header
    back = Prepared.from_bytes(data)
    assert (back.key, back.width, back.height, back.meta) == (row.key, 5, 4, row.meta)
    for k, v in row.arrays.items():
        assert back.arrays[k].dtype == v.dtype and np.array_equal(back.arrays[k], v)


class Recorder:
    """An engine that records its batches and returns each row's key length as pixels."""

    def __init__(self, extra: int = 0):
        self.batches: list[list[str]] = []
        self.extra = extra

    def edit(self, rows):
        self.batches.append([r.meta["name"] for r in rows])
        return [EditOutput(np.zeros((1, 1, 3), np.uint8) + len(r.key)) for r in rows] + [EditOutput(None)] * self.extra


def _rows(spec: str) -> list[Prepared]:
    return [Prepared(key, 1, 1, {}, {"name": f"{key}{i}"}) for i, key in enumerate(spec)]


def test_edit_prepared_batches_by_key_keeps_order_and_caps_the_batch():
    engine = Recorder()
    rows = _rows("aabab" "aaa")
    outs = edit_prepared(engine, rows, max_batch_size=3)
    assert engine.batches == [["a0", "a1", "a3"], ["a5", "a6", "a7"], ["b2", "b4"]]
    assert [o.batch_size for o in outs] == [3, 3, 2, 3, 2, 3, 3, 3]
    assert all(o.edit_ms >= 0 for o in outs)
    with pytest.raises(RuntimeError, match="returned 3 outputs for 2 rows"):
        edit_prepared(Recorder(extra=1), _rows("bb"), max_batch_size=4)
