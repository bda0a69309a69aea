"""One normalisation settings object and one latest-per-id rule (issue 19, item 2).

Why: the settings were built in three places and "the latest record of an id" folded twice; a
difference between the copies would make the skip, the log and ``step1x-batch errors`` disagree
about which rows are done. These tests pin the single routes to what the copies did.
"""

from __future__ import annotations

import dataclasses
import pickle

import pyarrow as pa
import pytest

from step1x_batch.job.config import parse_config
from step1x_batch.job.skip import row_keys
from step1x_batch.job.stages import normalize_settings
from step1x_batch.models.base import EditParams
from step1x_batch.rows import state as rowstate
from step1x_batch.rows.digest import manifest_row_digests, settings_digest_key
from step1x_batch.rows.manifest import NormalizeSettings, normalize_batch

_TS = pa.timestamp("us", tz="UTC")


def _config(**sampling):
    return parse_config({"input": {"manifest": "/m/manifest.parquet"}, "output": {"uri": "/o"},
                         "model": {"family": "null"}, "sampling": sampling})


def _rows() -> pa.Table:
    return pa.table({"id": ["a", None, " b "], "image_uri": ["x.png", "y.png", "z.png"],
                     "instruction": ["go", "stop", "turn"], "seed": [None, "3", None], "tag": [1, 2, 3]})


def test_normalize_settings_is_the_config_builder():
    cfg = _config(seed_base=11)
    settings = normalize_settings(cfg)
    assert type(settings) is NormalizeSettings
    assert settings.manifest_uri == cfg.input.manifest and settings.seed_base == 11
    assert settings.model_id and settings.max_images >= 1
    assert normalize_settings(cfg, "/n/other.csv").manifest_uri == "/n/other.csv"
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed_base = 1  # type: ignore[misc]


def test_settings_travel_to_workers_unchanged():
    settings = NormalizeSettings(manifest_uri="s3://b/sets/m.parquet", defaults=EditParams(),
                                 seed_base=2, model_id="m", image_format="jpg",
                                 max_instruction_chars=0, image_quality=80, max_images=2)
    again = pickle.loads(pickle.dumps(settings))
    assert again == settings and settings_digest_key(again) == settings_digest_key(settings)
    assert normalize_batch(_rows(), again).equals(normalize_batch(_rows(), settings))
    assert (settings.output_format, settings.output_extension, settings.base) == ("jpeg", "jpg", "s3://b/sets")


def test_the_skip_joins_keys_are_the_normalised_ids():
    settings = normalize_settings(_config())
    raw = _rows()
    assert row_keys(raw, settings).to_pylist() == normalize_batch(raw, settings).column("id").to_pylist()
    assert len(manifest_row_digests(raw, settings)) == raw.num_rows


def test_an_unknown_output_format_is_refused_with_the_settings():
    with pytest.raises(ValueError):
        NormalizeSettings(manifest_uri="/m/x.parquet", defaults=EditParams(), seed_base=0,
                          model_id="m", image_format="bmp-ish", max_instruction_chars=0)


def _records() -> pa.Table:
    # a: latest at t=5, tie with a later row wins; b: t=1 beats t=0; c: only a missing time;
    # d: a missing time is older than any time
    return pa.table({
        "id": ["a", "b", "a", "c", "b", "a", "d", "d"],
        "finished_at": pa.array([5, 1, 5, None, 0, 3, 2, None], _TS),
        "status": ["ok", "error", "error", "ok", "ok", "ok", "error", "ok"],
        "fingerprint": ["f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8"],
    })


def test_latest_per_id_keeps_the_deciding_record_in_record_order():
    latest = rowstate.latest_per_id(_records())
    assert latest.column_names == _records().column_names  # every column kept
    assert latest.to_pydict()["id"] == ["b", "a", "c", "d"]  # in the order the records came
    assert dict(zip(latest.column("id").to_pylist(), latest.column("fingerprint").to_pylist())) == {
        "a": "f3", "b": "f2", "c": "f4", "d": "f7"}
    assert rowstate.latest_per_id(_records().slice(0, 0)).num_rows == 0


def test_latest_per_id_is_the_folds_deciding_record():
    records = _records()
    folded = rowstate.fold([rowstate.records_as_state(records)])
    deciding = dict(zip(folded.column("id").to_pylist(), folded.column("fingerprint").to_pylist()))
    latest = rowstate.latest_per_id(records)
    assert dict(zip(latest.column("id").to_pylist(), latest.column("fingerprint").to_pylist())) == deciding
