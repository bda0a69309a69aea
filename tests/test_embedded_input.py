"""Images inside the manifest, as the hub ships them: Parquet written by ``datasets`` with Image
features (a single column and a list column, one corrupt bytes value, one null), mapped onto the
row contract with ``input.columns``, through the whole job on a real local Ray with each family's
tiny model. The embedded image is the same work as the same file behind a URI: same pixels out.
"""

from __future__ import annotations

import io
import json
from collections import Counter

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from step1x_batch import errors
from step1x_batch.io.images import decode_image
from step1x_batch.io.storage import read_bytes
from step1x_batch.job.config import parse_config
from step1x_batch.job.preflight import PreflightError, check_job
from step1x_batch.rows.log import read_logs
from step1x_batch.rows.manifest import normalize_batch, read_manifest_table
from step1x_batch.rows.sources import IMAGE_BYTES, MANIFEST_PROBLEM, adapt_table, embedded_uri, stored_input_uri


def _png(seed: int, w: int = 64, h: int = 48) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


# --- the adapter, on its own --------------------------------------------------------------------


def test_struct_binary_and_list_columns_become_uris_and_bytes():
    a, b = _png(1), _png(2)
    table = pa.table({
        "key": ["r1", "r2", "r3"],
        "text": ["x", "y", "z"],
        "raw": pa.array([{"bytes": a, "path": "a.png"}, {"bytes": None, "path": "sub/b.png"}, None], _IMAGE),
        "thumb": pa.array([{"bytes": b, "path": "t.png"}, None, None], _IMAGE),
    })
    out = adapt_table(table, {"id": "key", "image": "raw", "instruction": "text"})
    rows = out.to_pylist()
    assert [r["id"] for r in rows] == ["r1", "r2", "r3"] and rows[0]["instruction"] == "x"
    assert rows[0]["image_uri"] == embedded_uri(a) and rows[0][IMAGE_BYTES] == [a]
    assert rows[1]["image_uri"] == "sub/b.png" and rows[1][IMAGE_BYTES] is None  # a path alone is a URI
    assert rows[2]["image_uri"] is None and rows[2][MANIFEST_PROBLEM] == "image column 'raw' is null"
    # another image column is kept as a reference, never as bytes
    assert rows[0]["thumb"] == {"path": "t.png", "sha256": embedded_uri(b).rsplit("/", 1)[1]}
    assert "raw" not in out.column_names

    listed = pa.table({"imgs": pa.array([[a, b], []], pa.list_(pa.binary())), "instruction": ["x", "y"]})
    rows = adapt_table(listed, {"image": "imgs"}).to_pylist()
    assert rows[0]["image_uris"] == [embedded_uri(a), embedded_uri(b)] and rows[0][IMAGE_BYTES] == [a, b]
    assert rows[1][MANIFEST_PROBLEM] == "image column 'imgs' is an empty list"
    # several single columns, one image each, in the map's order
    two = pa.table({"p": [a], "q": [b], "instruction": ["x"]})
    assert adapt_table(two, {"image": ["q", "p"]}).column("image_uris").to_pylist() == [[embedded_uri(b), embedded_uri(a)]]


def test_contract_manifest_unchanged_and_unknown_column_refused():
    plain = pa.table({"image_uri": ["a.png"], "instruction": ["x"]})
    assert adapt_table(plain, {}).equals(plain)
    with pytest.raises(ValueError, match="'nope'"):  # pre-flight's form
        adapt_table(plain, {"image": "nope"}, strict=True)
    # in a job: every row of a file that lacks the column is a problem row naming it, no crash
    lacking = adapt_table(plain, {"image": "nope"})
    assert lacking.column(MANIFEST_PROBLEM).to_pylist() == [
        "input.columns names column(s) ['nope'] that the manifest does not have (it has ['image_uri', 'instruction'])"]
    # a lone `image` column of bytes (a hub dataset's usual name) is the image without a map
    hub = pa.table({"image": pa.array([{"bytes": _png(3), "path": None}], _IMAGE), "instruction": ["x"]})
    assert adapt_table(hub).column("image_uri").to_pylist() == [embedded_uri(_png(3))]
    # a struct that is no Image feature (it has other fields) is an ordinary extra column
    meta = plain.append_column("meta", pa.array([{"path": "x", "size": 3}]))
    assert adapt_table(meta).equals(meta)


def test_identity_is_the_bytes_hash_not_the_name():
    """The same picture under another name is the same row; a changed picture is new work."""
    from step1x_batch.models.base import EditParams
    from step1x_batch.rows.manifest import NormalizeSettings

    settings = NormalizeSettings(manifest_uri="/m/x.parquet", defaults=EditParams(), seed_base=0,
                                 model_id="m", image_format="png", max_instruction_chars=0)

    def normalised(data: bytes, path: str) -> dict:
        table = pa.table({"img": pa.array([{"bytes": data, "path": path}], _IMAGE), "instruction": ["x"]})
        return normalize_batch(adapt_table(table, {"image": "img"}), settings).to_pylist()[0]

    first, renamed, changed = normalised(_png(1), "a.png"), normalised(_png(1), "b.png"), normalised(_png(2), "a.png")
    assert (first["id"], first["fingerprint"]) == (renamed["id"], renamed["fingerprint"])
    assert first["fingerprint"] != changed["fingerprint"] and first["id"] != changed["id"]
    assert first[IMAGE_BYTES] == [_png(1)] and "img" not in (first["extra"] or "")  # bytes never in extra


# --- through the job -----------------------------------------------------------------------------


def _hub_manifest(path, rows: list[dict], features: datasets.Features) -> str:
    datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features).to_parquet(str(path))
    assert pq.read_schema(str(path)).metadata[b"huggingface"]  # written as the hub writes it
    return str(path)


def _config(manifest: str, out: str, model: dict, run_id: str, columns: dict, **sampling) -> dict:
    return {
        "input": {"manifest": manifest, "columns": columns},
        "output": {"uri": out},
        "model": model,
        "sampling": {"num_steps": 2, "size_level": 64, **sampling},
        "resources": {"edit_batch_size": 4, "io_batch_size": 3},
        "runtime": {"progress_bars": False, "max_error_fraction": 0.6, "run_id": run_id},
    }


def _run(raw: dict):
    from step1x_batch.job.runner import run_job

    cfg = parse_config(raw)
    return run_job(cfg, check_job(cfg))


def _records(out: str) -> dict[str, dict]:
    recs = read_logs(out).to_pylist()
    assert len(recs) == len({r["id"] for r in recs}), "one record per row"
    return {r["id"]: r for r in recs}


def test_step1x_on_a_hub_parquet_with_image_structs(ray_local, tmp_path):
    from step1x_batch.models.step1x import tiny

    weights = tiny.make_tiny_weights(str(tmp_path / "weights"), seed=0)
    features = datasets.Features({"key": datasets.Value("string"), "instruction": datasets.Value("string"),
                                  "task_type": datasets.Value("string"), "input_image_raw": datasets.Image()})
    good = [_png(i) for i in range(3)]
    rows = [{"key": f"k{i}", "instruction": "make it blue", "task_type": "color_alter",
             "input_image_raw": {"bytes": good[i], "path": f"{i}.png"}} for i in range(3)]
    rows.append({"key": "corrupt", "instruction": "x", "task_type": "t",
                 "input_image_raw": {"bytes": good[0][:16] + b"\xff" * 8 + good[0][24:], "path": None}})
    rows.append({"key": "null", "instruction": "x", "task_type": "t", "input_image_raw": None})
    manifest = _hub_manifest(tmp_path / "bench.parquet", rows, features)
    # the same first picture behind a URI: the job must read the same pixels from either
    (tmp_path / "k0.png").write_bytes(good[0])
    pq.write_table(pa.table({"id": ["k0"], "image_uri": [str(tmp_path / "k0.png")], "instruction": ["make it blue"]}),
                   tmp_path / "uri.parquet")
    model = {"family": "step1x", "weights": str(weights), "dtype": "float32", "device": "cpu", "max_batch_size": 2,
             "cache_dir": str(tmp_path / "cache")}
    columns = {"id": "key", "image": "input_image_raw"}
    out = str(tmp_path / "out")

    summary = _run(_config(manifest, out, model, "first", columns))
    assert summary.by_status == {"ok": 3, "error": 2}
    recs = _records(out)
    assert {k: r["error_type"] for k, r in recs.items() if r["status"] == "error"} == {
        "corrupt": errors.CORRUPT_IMAGE, "null": errors.INVALID_ROW}
    assert "image column 'input_image_raw' is null" in recs["null"]["error_message"]
    # the log names the kept copy of the input (not the bytes), and the copy is the input's bytes
    assert recs["k0"]["image_uri"] == stored_input_uri(embedded_uri(good[0]), out)
    assert read_bytes(recs["k0"]["image_uri"]) == good[0]
    assert json.loads(recs["k0"]["extra"]) == {"task_type": "color_alter"}  # no image column, no bytes

    again = _run(_config(manifest, out, model, "second", columns))
    assert again.rows_processed == 0 and again.rows_skipped == 5  # same fingerprints: nothing redone
    # the fingerprints the log holds are the ones a fresh read and normalisation gives (any process)
    from step1x_batch.job.stages import normalize_settings

    table = read_manifest_table(manifest, edit_rows=True, columns=columns)
    fresh = normalize_batch(table, normalize_settings(parse_config(_config(manifest, out, model, "x", columns))))
    assert dict(zip(fresh.column("id").to_pylist(), fresh.column("fingerprint").to_pylist())) == {
        k: r["fingerprint"] for k, r in recs.items()}

    by_uri = str(tmp_path / "by-uri")
    _run(_config(str(tmp_path / "uri.parquet"), by_uri, model, "uri", {}))
    uri_rec = _records(by_uri)["k0"]
    assert read_bytes(uri_rec["output_uri"]) == read_bytes(recs["k0"]["output_uri"])
    assert uri_rec["fingerprint"] != recs["k0"]["fingerprint"]  # its identity is the URI, not the bytes


def test_preflight_names_a_mapped_column_the_dataset_lacks(tmp_path):
    features = datasets.Features({"key": datasets.Value("string"), "instruction": datasets.Value("string"),
                                  "img": datasets.Image()})
    manifest = _hub_manifest(tmp_path / "m.parquet", [{"key": "a", "instruction": "x",
                                                       "img": {"bytes": _png(0), "path": None}}], features)
    cfg = parse_config(_config(manifest, str(tmp_path / "out"), {"family": "null"}, "r", {"image": "input_image_raw"}))
    with pytest.raises(PreflightError, match="input.columns: .*'input_image_raw'"):
        check_job(cfg)
    ok = parse_config(_config(manifest, str(tmp_path / "out"), {"family": "null"}, "r", {"id": "key", "image": "img"}))
    assert "image_uri" in check_job(ok).manifest_columns
    table = read_manifest_table(manifest, edit_rows=True, columns={"id": "key", "image": "img"})
    assert table.column("image_uri").to_pylist() == [embedded_uri(_png(0))]
    # a folder whose second file lacks a mapped column is refused before the run, naming the file
    folder = tmp_path / "folder"
    folder.mkdir()
    (tmp_path / "m.parquet").rename(folder / "a.parquet")
    pq.write_table(pa.table({"key": ["b"], "img": pa.array([{"bytes": _png(1), "path": None}], _IMAGE)}),
                   folder / "b.parquet")
    mixed = parse_config(_config(str(folder), str(tmp_path / "out"), {"family": "null"}, "r",
                                 {"id": "key", "image": "img", "instruction": "instruction"}))
    with pytest.raises(PreflightError, match=r"b\.parquet has no column\(s\) \['instruction'\]"):
        check_job(mixed)


def test_duplicate_check_reads_images_a_batch_at_a_time(tmp_path):
    """Two rows with one key but different pictures are refused; the same row twice is not."""
    from step1x_batch.job import preflight

    rows = [{"key": "a", "instruction": "x", "img": {"bytes": _png(0), "path": None}},
            {"key": "a", "instruction": "x", "img": {"bytes": _png(1), "path": None}}]
    features = datasets.Features({"key": datasets.Value("string"), "instruction": datasets.Value("string"),
                                  "img": datasets.Image()})
    manifest = _hub_manifest(tmp_path / "dup.parquet", rows, features)
    table = preflight._duplicate_columns(manifest, None, full=True, columns={"id": "key", "image": "img"})
    assert IMAGE_BYTES not in table.column_names
    assert table.column("image_uri").to_pylist() == [embedded_uri(_png(0)), embedded_uri(_png(1))]
    cfg = parse_config(_config(manifest, str(tmp_path / "out"), {"family": "null"}, "r", {"id": "key", "image": "img"}))
    with pytest.raises(PreflightError, match="may not share an id"):
        check_job(cfg)
    same = _hub_manifest(tmp_path / "same.parquet", [rows[0], rows[0]], features)
    assert check_job(parse_config(_config(same, str(tmp_path / "o2"), {"family": "null"}, "r",
                                          {"id": "key", "image": "img"}))).manifest_rows == 2


@pytest.mark.slow
def test_qwen_image_edit_on_a_list_of_images_column(ray_local, tmp_path):
    from step1x_batch.models.qwen_image_edit.tiny import make_tiny_weights

    weights = make_tiny_weights(tmp_path / "qwen", seed=0)
    features = datasets.Features({"id": datasets.Value("string"), "prompt": datasets.Value("string"),
                                  "refs": datasets.List(datasets.Image())})
    a, b, c = _png(1), _png(2, 48, 64), _png(3)
    rows = [
        {"id": "two", "prompt": "put them together", "refs": [{"bytes": a, "path": "a.png"}, {"bytes": b, "path": None}]},
        {"id": "one", "prompt": "make it red", "refs": [{"bytes": c, "path": None}]},
        {"id": "bad-second", "prompt": "x", "refs": [{"bytes": a, "path": None}, {"bytes": b"not an image", "path": None}]},
        {"id": "null", "prompt": "x", "refs": None},
    ]
    manifest = _hub_manifest(tmp_path / "refs.parquet", rows, features)
    model = {"family": "qwen-image-edit", "weights": str(weights), "dtype": "float32", "device": "cpu",
             "max_batch_size": 2, "cache_dir": str(tmp_path / "cache"),
             "options": {"reference_area": 48 * 48, "vl_area": 56 * 56}}
    out = str(tmp_path / "out")
    columns = {"image": "refs", "instruction": "prompt"}
    summary = _run(_config(manifest, out, model, "qwen", columns, size_level=96))
    assert summary.by_status == {"ok": 2, "error": 2}
    recs = _records(out)
    assert recs["bad-second"]["error_type"] == errors.UNSUPPORTED_FORMAT  # bytes that are no image format
    assert recs["bad-second"]["error_message"].startswith("image 2 of 2 (embedded://sha256/")
    assert recs["null"]["error_type"] == errors.INVALID_ROW
    assert recs["two"]["image_uris"] == [stored_input_uri(embedded_uri(x), out) for x in (a, b)]
    assert decode_image(read_bytes(recs["two"]["output_uri"]), 10**6).std() > 1
    again = _run(_config(manifest, out, model, "qwen-again", columns, size_level=96))
    assert again.rows_processed == 0 and again.rows_skipped == 4
    assert Counter(r["status"] for r in read_logs(out).to_pylist()) == {"ok": 2, "error": 2}
