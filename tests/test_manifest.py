"""Manifest discovery, reading and normalisation (ids, seeds, defaults, fingerprints, row errors)."""

from __future__ import annotations

import gzip
import io
import json
import os
from dataclasses import replace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from step1x_batch import errors
from step1x_batch.rows.manifest import (
    NORMALIZED_COLUMNS,
    NORMALIZED_SCHEMA,
    SEED_LIMIT,
    NormalizeSettings,
    csv_convert_options,
    derive_seed,
    extra_columns,
    fingerprint,
    manifest_base,
    manifest_files,
    manifest_format,
    normalize_batch,
    read_manifest_table,
    resolve_image_uri,
)
from step1x_batch.models.base import EditParams
from step1x_batch.io.storage import write_bytes

DEFAULTS = EditParams(num_steps=28, guidance_scale=6.0, size_level=1024, negative_prompt="")
MANIFEST = "s3://bkt/sets/one/manifest.parquet"


def norm_arrow(batch, **kw) -> pa.Table:
    args = dict(manifest_uri=MANIFEST, defaults=DEFAULTS, seed_base=0, model_id="m1",
                image_format="png", max_instruction_chars=100)
    args.update(kw)
    if isinstance(batch, pd.DataFrame):
        batch = pa.Table.from_pandas(batch, preserve_index=False)
    return normalize_batch(batch, NormalizeSettings(**args))


def norm(batch, **kw) -> pd.DataFrame:
    """normalize_batch's Arrow result as a DataFrame, for reading in tests."""
    return norm_arrow(batch, **kw).to_pandas()


def rows_table(n: int = 12) -> pa.Table:
    return pa.table({
        "image_uri": [f"img/{i % 5}.png" for i in range(n)],
        "instruction": [f"make it {'red' if i % 2 else 'blue'} {i % 3}" for i in range(n)],
        "seed": [i if i % 4 == 0 else None for i in range(n)],
        "num_steps": [None if i % 3 else 10 for i in range(n)],
        "tag": [f"t{i}" for i in range(n)],
    })


# --- files ---------------------------------------------------------------------------------------


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def test_manifest_format():
    assert manifest_format("a/b.parquet") == "parquet"
    assert manifest_format("s3://b/m.PQ") == "parquet"
    assert manifest_format("m.jsonl") == manifest_format("m.ndjson") == "json"
    assert manifest_format("m.jsonl.gz") == "json"
    assert manifest_format("m.csv") == manifest_format("m.csv.zst") == "csv"
    with pytest.raises(ValueError, match="manifest format"):
        manifest_format("m.txt")


def test_manifest_files_local(tmp_path):
    folder = tmp_path / "m"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.parquet", "a.parquet", "sub/c.parquet", "_SUCCESS", ".hidden.parquet",
                 "_tmp/x.parquet", "notes.txt"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    expected = [str(folder / "a.parquet"), str(folder / "b.parquet"), str(folder / "sub/c.parquet")]
    assert manifest_files(str(folder)) == expected
    assert manifest_files(str(folder) + "/") == expected
    assert manifest_files(f"file://{folder}") == expected
    assert manifest_files(str(folder / "*.parquet")) == expected[:2]
    assert manifest_files(str(folder / "b.parquet")) == [str(folder / "b.parquet")]
    with pytest.raises(FileNotFoundError, match="No manifest"):
        manifest_files(str(tmp_path / "absent.parquet"))
    with pytest.raises(FileNotFoundError):
        manifest_files(str(folder / "*.csv"))
    with pytest.raises(ValueError):
        manifest_files(str(folder / "notes.txt"))
    (folder / "d.csv").write_text("image_uri,instruction\n")
    with pytest.raises(ValueError, match="mixes formats"):
        manifest_files(str(folder))


def test_manifest_files_and_table_on_s3(s3_bucket, storage_options):
    t1 = pa.table({"image_uri": ["a.png"], "instruction": ["x"]})
    t2 = pa.table({"image_uri": ["b.png"], "instruction": ["y"], "seed": [3]})
    write_bytes(f"{s3_bucket}/m/part-1.parquet", _parquet_bytes(t2), storage_options)
    write_bytes(f"{s3_bucket}/m/part-0.parquet", _parquet_bytes(t1), storage_options)
    write_bytes(f"{s3_bucket}/m/_SUCCESS", b"", storage_options)
    files = manifest_files(f"{s3_bucket}/m", storage_options)
    assert files == [f"{s3_bucket}/m/part-0.parquet", f"{s3_bucket}/m/part-1.parquet"]
    assert manifest_files(f"{s3_bucket}/m/*.parquet", storage_options) == files
    table = read_manifest_table(f"{s3_bucket}/m", storage_options)
    assert table.column("image_uri").to_pylist() == ["a.png", "b.png"]
    assert table.column("seed").to_pylist() == [None, 3]


def test_read_jsonl_gz_and_csv_keeps_text_ids(tmp_path):
    rows = [{"id": "0007", "image_uri": "a.png", "instruction": "null", "seed": 5},
            {"id": "0008", "image_uri": "b.png", "instruction": "N/A", "seed": None}]
    with gzip.open(tmp_path / "m.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    t = read_manifest_table(str(tmp_path / "m.jsonl.gz"))
    assert t.column("id").to_pylist() == ["0007", "0008"]
    csv_text = 'id,image_uri,instruction,seed\n0007,a.png,null,5\n0008,b.png,"N/A",\n'
    (tmp_path / "m.csv").write_text(csv_text)
    t = read_manifest_table(str(tmp_path / "m.csv"))
    assert t.column("id").to_pylist() == ["0007", "0008"]  # not the number 7
    assert t.column("instruction").to_pylist() == ["null", "N/A"]  # text, not nulls
    assert t.column("seed").to_pylist() == ["5", None]  # an empty cell is "not given"
    assert csv_convert_options(str(tmp_path / "m.csv")).column_types["seed"] == pa.string()
    # CSV and JSON manifests of the same rows give the same work
    a = norm(read_manifest_table(str(tmp_path / "m.csv")), manifest_uri=str(tmp_path / "m.csv"))
    b = norm(read_manifest_table(str(tmp_path / "m.jsonl.gz")),
             manifest_uri=str(tmp_path / "m.jsonl.gz"))
    for col in ("id", "image_uri", "seed", "fingerprint"):
        assert a[col].tolist() == b[col].tolist()


# --- URIs ----------------------------------------------------------------------------------------


def test_manifest_base_and_resolution():
    assert manifest_base("s3://b/sets/m.parquet") == "s3://b/sets"
    assert manifest_base("s3://b/sets/") == "s3://b/sets"
    assert manifest_base("s3://b/sets") == "s3://b/sets"  # no suffix: a folder
    assert manifest_base("s3://b/sets/*.jsonl") == "s3://b/sets"
    assert manifest_base("s3://b/sets/part-*/x.csv") == "s3://b/sets"
    assert manifest_base("/data/m.csv") == "/data"
    assert resolve_image_uri("img/a.png", "s3://b/sets") == "s3://b/sets/img/a.png"
    assert resolve_image_uri("./img/../a.png", "s3://b/sets") == "s3://b/sets/a.png"
    assert resolve_image_uri("../other/a.png", "s3://b/sets") == "s3://b/other/a.png"
    assert resolve_image_uri(" s3://x/y.png ", "s3://b/sets") == "s3://x/y.png"
    assert resolve_image_uri("https://h/y.png", "/data") == "https://h/y.png"
    assert resolve_image_uri("/abs/y.png", "s3://b/sets") == "/abs/y.png"
    assert resolve_image_uri("y.png", "/data/sets") == "/data/sets/y.png"


# --- normalisation -------------------------------------------------------------------------------


def test_defaults_resolution_and_schema():
    df = norm(rows_table())
    assert list(df.columns) == list(NORMALIZED_COLUMNS) + ["tag"]
    assert df["image_uri"].tolist()[0] == "s3://bkt/sets/one/img/0.png"
    assert df["num_steps"].tolist() == [10 if i % 3 == 0 else 28 for i in range(12)]
    assert set(df["guidance_scale"]) == {6.0} and set(df["size_level"]) == {1024}
    assert set(df["negative_prompt"]) == {""}
    assert df["seed"].tolist()[0] == 0 and df["seed"].tolist()[4] == 4
    assert all(0 <= s < SEED_LIMIT for s in df["seed"])
    assert df["output_key"].tolist() == [f"images/{i}.png" for i in df["id"]]
    assert df["error_type"].isna().all() and df["fingerprint"].notna().all()
    assert df["tag"].tolist() == [f"t{i}" for i in range(12)]
    assert [json.loads(e) for e in df["extra"]] == [{"tag": f"t{i}"} for i in range(12)]
    arrow = norm_arrow(rows_table())
    assert arrow.schema.field("seed").type == pa.int64()
    assert arrow.schema.names == list(NORMALIZED_COLUMNS) + ["tag"]
    assert arrow.select(list(NORMALIZED_COLUMNS)).schema == NORMALIZED_SCHEMA
    assert arrow.column("id").to_pylist() == df["id"].tolist()


def test_ids_seeds_fingerprints_independent_of_batching():
    table = rows_table(12)
    whole = norm(table)
    parts = [norm(table.slice(0, 5)), norm(table.slice(5, 1)), norm(table.slice(6))]
    joined = pd.concat(parts, ignore_index=True)
    for col in ("id", "seed", "fingerprint", "output_key"):
        assert joined[col].tolist() == whole[col].tolist()
    # reversed order: each row gets the same answer
    rev = norm(table.take(list(range(11, -1, -1))))
    assert rev["id"].tolist() == whole["id"].tolist()[::-1]
    assert rev["fingerprint"].tolist() == whole["fingerprint"].tolist()[::-1]
    # and again in a fresh call (no hidden state)
    assert norm(table)["id"].tolist() == whole["id"].tolist()


def test_duplicates_share_an_id_and_variants_do_not():
    t = pa.table({"image_uri": ["a.png", "a.png", "a.png", "a.png", "a.png"],
                  "instruction": ["x", "x", "x", " x ", "x"],
                  "seed": [None, None, 1, None, 2]})
    ids = norm(t)["id"].tolist()
    assert ids[0] == ids[1] == ids[3]  # identical rows (whitespace stripped) are the same work
    assert len({ids[0], ids[2], ids[4]}) == 3  # a seed sweep gives distinct rows


def test_given_ids_and_text_numbers_agree_across_types():
    df = norm(pa.table({"id": [7, None], "image_uri": ["a.png"] * 2, "instruction": ["x"] * 2}))
    assert df["id"].tolist()[0] == "7"
    as_text = norm(pa.table({"image_uri": ["a.png"], "instruction": ["x"], "seed": ["7"],
                             "num_steps": ["12"], "guidance_scale": ["3"]}))
    as_numbers = norm(pa.table({"image_uri": ["a.png"], "instruction": ["x"], "seed": [7],
                                "num_steps": [12], "guidance_scale": [3.0]}))
    for col in ("id", "seed", "num_steps", "guidance_scale", "fingerprint"):
        assert as_text[col].tolist() == as_numbers[col].tolist()
    # a null column and an absent column are the same thing
    absent = norm(pa.table({"image_uri": ["a.png"], "instruction": ["x"]}))
    null = norm(pa.table({"image_uri": ["a.png"], "instruction": ["x"],
                          "seed": pa.array([None], pa.int64())}))
    assert absent["id"].tolist() == null["id"].tolist()
    assert absent["fingerprint"].tolist() == null["fingerprint"].tolist()


def test_derived_seed_depends_on_id_and_base():
    assert derive_seed("abc", 0) == derive_seed("abc", 0)
    assert derive_seed("abc", 0) != derive_seed("abc", 1)
    assert derive_seed("abc", 0) != derive_seed("abd", 0)
    a = norm(rows_table(), seed_base=0)
    b = norm(rows_table(), seed_base=1)
    given = [i % 4 == 0 for i in range(12)]
    for g, sa, sb in zip(given, a["seed"], b["seed"]):
        assert (sa == sb) == g  # given seeds stay, derived ones move
    assert a["id"].tolist() == b["id"].tolist()


def test_fingerprint_changes_exactly_with_pixel_changing_inputs():
    base = norm(rows_table(4))
    fp = base["fingerprint"].tolist()

    def changed(df) -> list[bool]:
        return [a != b for a, b in zip(fp, df["fingerprint"].tolist())]

    # config defaults: every row not overriding the parameter changes; ids never do
    for field, value in (("guidance_scale", 4.5), ("size_level", 512), ("negative_prompt", "blur")):
        df = norm(rows_table(4), defaults=replace(DEFAULTS, **{field: value}))
        assert changed(df) == [True] * 4, field
        assert df["id"].tolist() == base["id"].tolist()
    df = norm(rows_table(4), defaults=replace(DEFAULTS, num_steps=20))
    assert changed(df) == [False, True, True, False]  # rows 0 and 3 set num_steps=10 themselves
    assert changed(norm(rows_table(4), model_id="m2")) == [True] * 4
    assert changed(norm(rows_table(4), image_format="webp")) == [True] * 4
    assert changed(norm(rows_table(4), seed_base=5)) == [False, True, True, True]
    # quality matters for lossy formats only
    assert changed(norm(rows_table(4), image_quality=80)) == [False] * 4
    j90 = norm(rows_table(4), image_format="jpeg", image_quality=90)["fingerprint"].tolist()
    j80 = norm(rows_table(4), image_format="jpeg", image_quality=80)["fingerprint"].tolist()
    assert all(a != b for a, b in zip(j90, j80))
    # not changed by extra columns, the batch, or the instruction's surrounding whitespace
    t = rows_table(4)
    t = t.set_column(t.schema.get_field_index("tag"), "tag", pa.array(["z"] * 4))
    t = t.append_column("score", pa.array([0.5] * 4))
    assert changed(norm(t)) == [False] * 4
    # a row's own instruction or image changes its fingerprint (and id)
    t = rows_table(4)
    t = t.set_column(1, "instruction", pa.array(["other", "make it red 1", "x", "y"]))
    assert changed(norm(t)) == [True, False, True, True]


def test_fingerprint_function_fields():
    kw = dict(image_uris=["s3://b/a.png"], image_etags=[None], instruction="x", params=DEFAULTS, seed=1,
              model_id="m", image_format="png")
    fp = fingerprint(**kw)
    assert len(fp) == 64 and fp == fingerprint(**kw)
    assert fingerprint(**{**kw, "image_etags": ['"abc"']}) != fp
    two = fingerprint(**{**kw, "image_uris": ["s3://b/a.png", "s3://b/b.png"], "image_etags": [None, None]})
    swapped = fingerprint(**{**kw, "image_uris": ["s3://b/b.png", "s3://b/a.png"], "image_etags": [None, None]})
    assert len({fp, two, swapped}) == 3  # the ordered list counts
    assert fingerprint(**{**kw, "seed": 2}) != fp
    assert fingerprint(**{**kw, "image_format": "PNG"}) == fp
    assert fingerprint(**{**kw, "params": replace(DEFAULTS, num_steps=27)}) != fp
    assert fingerprint(**{**kw, "params": replace(DEFAULTS, guidance_scale=6)}) == fp


# --- row errors ----------------------------------------------------------------------------------


def _errors(**columns) -> list[str | None]:
    """The error type of each row; every value goes in a one-row table of its own, so a column
    may hold values of different types (as different manifest files would)."""
    n = len(next(iter(columns.values())))
    columns.setdefault("image_uri", ["a.png"] * n)
    columns.setdefault("instruction", ["edit"] * n)
    out = []
    for i in range(n):
        row = pa.table({k: pa.nulls(1, pa.string()) if v[i] is None
                        else pa.array([v[i]], pa.uint64() if isinstance(v[i], int) and v[i] >= 2**63 else None)
                        for k, v in columns.items()})
        out.append(norm_arrow(row).column("error_type")[0].as_py())
    return out


def test_instruction_errors():
    assert _errors(instruction=["ok", "", "   \n\t", None]) == [
        None, errors.EMPTY_INSTRUCTION, errors.EMPTY_INSTRUCTION, errors.EMPTY_INSTRUCTION]
    assert _errors(instruction=["x" * 100, "x" * 101, "  " + "x" * 100 + "  "]) == [
        None, errors.INSTRUCTION_TOO_LONG, None]
    df = norm(pa.table({"image_uri": ["a.png"], "instruction": ["x" * 101]}),
              max_instruction_chars=0)
    assert df["error_type"].isna().all()  # 0 disables the limit
    assert _errors(instruction=[42, ["a"]]) == [errors.INVALID_ROW, errors.INVALID_ROW]


def test_parameter_and_uri_errors():
    assert _errors(seed=["abc", -1, 1.5, 2**63, True, "12"]) == [errors.INVALID_ROW] * 5 + [None]
    assert _errors(num_steps=[0, "x", 5]) == [errors.INVALID_ROW, errors.INVALID_ROW, None]
    assert _errors(guidance_scale=["nan", float("inf"), -1, "2.5"]) == [errors.INVALID_ROW] * 3 + [
        None]
    assert _errors(size_level=[0, 512]) == [errors.INVALID_ROW, None]
    assert _errors(negative_prompt=[5, "blurry"]) == [errors.INVALID_ROW, None]
    assert _errors(image_uri=[None, "  ", 5, "ok.png"]) == [errors.INVALID_ROW] * 3 + [None]
    assert _errors(id=["a\x00b", "x" * 600, "fine"]) == [errors.INVALID_ROW] * 2 + [None]


def test_unsafe_output_keys():
    assert _errors(output_key=["../escape.png", "/abs.png", "s3://other/x.png", "a\\b.png",
                               "ok/x.png", None]) == [errors.UNSAFE_OUTPUT_KEY] * 4 + [None] * 2
    df = norm(pd.DataFrame({"image_uri": ["a.png"] * 2, "instruction": ["x"] * 2,
                            "output_key": ["./out//x.png", None]}))
    assert df["output_key"].tolist()[0] == "out/x.png"
    # an id that would make an unsafe default key
    assert _errors(id=["../../etc/passwd", "sub/name"]) == [errors.UNSAFE_OUTPUT_KEY, None]


def test_error_rows_keep_every_column_and_name_the_row():
    t = pa.table({"image_uri": ["a.png", "b.png"], "instruction": ["fine", " "],
                  "tag": ["keep-me", "and-me"], "fingerprint": ["user", "columns"]})
    df = norm(t)
    assert list(df.columns) == list(NORMALIZED_COLUMNS) + ["tag"]  # the clash lives in extra only
    bad = df.iloc[1]
    assert bad["error_type"] == errors.EMPTY_INSTRUCTION
    assert bad["id"] in bad["error_message"] and "s3://bkt/sets/one/b.png" in bad["error_message"]
    assert bad["tag"] == "and-me" and pd.isna(bad["fingerprint"])
    assert json.loads(bad["extra"]) == {"fingerprint": "columns", "tag": "and-me"}
    assert bad["image_uri"] == "s3://bkt/sets/one/b.png" and bad["seed"] >= 0
    assert df.iloc[0]["fingerprint"] != "user"


def test_extra_columns_and_json_values():
    assert extra_columns(["image_uri", "instruction", "seed", "tag", "score"]) == ["tag", "score"]
    assert extra_columns(["image_uris", "image_etags", "instruction", "x"]) == ["x"]
    t = pa.table({"image_uri": ["a.png"], "instruction": ["x"],
                  "when": pa.array([pd.Timestamp("2026-01-02T03:04:05")]),
                  "blob": [b"\x00\x01"], "nested": [{"k": [1, 2]}], "nan": [float("nan")]})
    extra = json.loads(norm(t)["extra"].tolist()[0])
    assert extra == {"when": "2026-01-02T03:04:05", "blob": "AAE=", "nested": {"k": [1, 2]},
                     "nan": None}
    assert norm(pa.table({"image_uri": ["a.png"], "instruction": ["x"]}))["extra"].isna().all()


def test_local_manifest_relative_paths(tmp_path):
    m = tmp_path / "inputs" / "manifest.jsonl"
    m.parent.mkdir()
    m.write_text(json.dumps({"image_uri": "pics/a.png", "instruction": "x"}) + "\n")
    df = norm(read_manifest_table(str(m)), manifest_uri=str(m))
    assert df["image_uri"].tolist() == [os.path.join(str(tmp_path), "inputs", "pics", "a.png")]


# --- change marker and instruction templates -------------------------------------------------------


def test_change_marker_folds_into_fingerprint_not_id():
    from step1x_batch.rows.manifest import marker_text

    base = norm(pa.table({"image_uri": ["a.png"] * 4, "instruction": ["x", "y", "z", "w"]}))
    marked = norm(pa.table({"image_uri": ["a.png"] * 4, "instruction": ["x", "y", "z", "w"],
                            "image_etag": ['"e1"', None, "", "  "]}))
    assert marked["id"].tolist() == base["id"].tolist()  # same item, same output key
    assert marked["output_key"].tolist() == base["output_key"].tolist()
    fp0, fp1 = base["fingerprint"].tolist(), marked["fingerprint"].tolist()
    assert fp1[0] != fp0[0]  # a known content version changes the fingerprint
    assert fp1[1:] == fp0[1:]  # null / empty / blank: as if the column were absent
    assert "image_etag" not in marked.columns and marked["extra"].isna().all()  # contract column
    # a new content version changes only that row; text and numbers compare as text
    again = norm(pa.table({"image_uri": ["a.png"] * 2, "instruction": ["x", "y"],
                           "image_etag": ['"e2"', "7"]}))["fingerprint"].tolist()
    assert again[0] not in (fp0[0], fp1[0])
    as_int = norm(pa.table({"image_uri": ["a.png"], "instruction": ["y"], "image_etag": [7]}))
    assert as_int["fingerprint"].tolist()[0] == again[1] != fp0[1]
    assert marker_text(pd.Timestamp("2026-01-02T03:04:05")) == "2026-01-02T03:04:05"
    assert marker_text(float("nan")) is None and marker_text(" v1 ") == "v1"
    # the same value given to fingerprint() directly gives the same fingerprint
    assert fp1[0] == fingerprint(image_uris=["s3://bkt/sets/one/a.png"], image_etags=['"e1"'],
                                 instruction="x", params=DEFAULTS,
                                 seed=int(marked["seed"].tolist()[0]), model_id="m1",
                                 image_format="png")


def test_fill_template_and_fields():
    from step1x_batch.rows.manifest import fill_template, template_fields

    assert template_fields("put the {product} on {bg}, {bg} only {{literal}}") == ["product", "bg"]
    assert fill_template("put the {product} on {bg} ({n})", {"product": "mug", "bg": "sand", "n": 3}) == (
        "put the mug on sand (3)")
    assert fill_template("no fields {{x}}", {}) == "no fields {x}"
    for missing in ({"product": "mug"}, {"product": "mug", "bg": None}, {"product": "mug", "bg": float("nan")}):
        with pytest.raises(errors.RowError) as e:
            fill_template("put the {product} on {bg}", missing)
        assert e.value.code == errors.INVALID_ROW and "'bg'" in e.value.message
    for bad in ("{}", "{0}", "{a.__class__}", "{a[0]}", "unclosed {a"):
        with pytest.raises(ValueError):
            template_fields(bad)


def test_write_manifest_round_trip(tmp_path):
    from step1x_batch.rows.manifest import write_manifest

    uri = str(tmp_path / "w" / "m.parquet")
    write_manifest(pa.table({"image_uri": ["a.png"], "instruction": ["x"], "seed": [3]}), uri)
    table = read_manifest_table(uri)
    assert table.to_pylist() == [{"image_uri": "a.png", "instruction": "x", "seed": 3}]


# --- several input images ------------------------------------------------------------------------


def test_image_uris_lists_resolve_in_order_and_hash_the_ordered_list():
    t = pa.table({"image_uris": [["a.png", "s3://other/b.png"], ["b.png", "a.png"], ["a.png"], None],
                  "image_uri": [None, None, None, "a.png"],
                  "instruction": ["x"] * 4})
    df = norm(t, max_images=3)
    assert df["error_type"].isna().all()
    assert list(df["image_uris"][0]) == ["s3://bkt/sets/one/a.png", "s3://other/b.png"]
    assert df["image_uri"][0] == "s3://bkt/sets/one/a.png"  # the first input
    assert list(df["image_uris"][3]) == ["s3://bkt/sets/one/a.png"]  # image_uri: a list of one
    assert df["fingerprint"][0] != df["fingerprint"][1] and df["id"][0] != df["id"][1]
    # one image in a list is the same work as the image_uri spelling: same id, same fingerprint
    assert df["id"][2] == df["id"][3] and df["fingerprint"][2] == df["fingerprint"][3]


def test_image_uris_as_json_text_and_etags():
    """CSV and JSON Lines carry lists as JSON text; change markers align with the images."""
    text = norm(pa.table({"image_uris": ['["a.png", "b.png"]'], "instruction": ["x"]}), max_images=2)
    native = norm(pa.table({"image_uris": [["a.png", "b.png"]], "instruction": ["x"]}), max_images=2)
    assert text["fingerprint"][0] == native["fingerprint"][0] and text["id"][0] == native["id"][0]
    tagged = norm(pa.table({"image_uris": [["a.png", "b.png"]] * 2, "image_etags": [["e1", None], ["e1", "e2"]],
                            "instruction": ["x"] * 2}), max_images=2)
    assert tagged["id"][0] == tagged["id"][1] == native["id"][0]  # markers: fingerprint only
    assert len({native["fingerprint"][0], tagged["fingerprint"][0], tagged["fingerprint"][1]}) == 3


def test_image_list_errors_name_the_problem():
    def one(**cols):
        df = norm(pa.table({"instruction": ["x"], **cols}), max_images=3)
        return df["error_type"][0], df["error_message"][0]

    code, msg = one(image_uris=[["a.png", "b.png", "c.png", "d.png"]])
    assert code == errors.TOO_MANY_IMAGES and "4 input images" in msg and "at most 3" in msg
    assert "s3://bkt/sets/one/d.png" in msg  # the row's inputs are named
    code, msg = one(image_uris=[[]])
    assert code == errors.INVALID_ROW and "empty" in msg
    code, msg = one(image_uris=['["a.png", 7]'])
    assert code == errors.INVALID_ROW and "image 2 of 2" in msg
    code, msg = one(image_uris=["a.png"])
    assert code == errors.INVALID_ROW and "JSON list" in msg
    code, msg = one(image_uris=[["a.png"]], image_uri=["b.png"])
    assert code == errors.INVALID_ROW and "both image_uri and image_uris" in msg
    code, msg = one(image_uris=[["a.png", "b.png"]], image_etags=[["e1"]])
    assert code == errors.INVALID_ROW and "1 entries for 2 images" in msg
    # the default family limit is one image
    df = norm(pa.table({"image_uris": [["a.png", "b.png"]], "instruction": ["x"]}))
    assert df["error_type"][0] == errors.TOO_MANY_IMAGES


# --- conditioning interpolation ------------------------------------------------------------------


def test_blend_columns_enter_params_ids_and_fingerprints():
    t = pa.table({"image_uri": ["a.png"] * 4, "instruction": ["happy"] * 4,
                  "blend_instruction": [None, "neutral", "neutral", "neutral"],
                  "blend_scale": [None, 0.5, 0.5, 1.5]})
    df = norm(t)
    as_text = norm(pa.table({"image_uri": ["a.png"], "instruction": ["happy"], "blend_instruction": ["neutral"],
                             "blend_scale": ["0.5"]}))
    assert df["error_type"].isna().all()
    assert pd.isna(df["blend_instruction"][0]) and df["blend_instruction"][1] == "neutral"
    assert df["blend_scale"].tolist() == [1.0, 0.5, 0.5, 1.5]
    ids, fps = df["id"].tolist(), df["fingerprint"].tolist()
    assert ids[1] == ids[2] and fps[1] == fps[2]  # the same row twice
    assert as_text["id"][0] == ids[1] and as_text["fingerprint"][0] == fps[1]  # "0.5" in a CSV is 0.5
    assert len({ids[0], ids[1], ids[3]}) == 3  # an intensity sweep is three rows, three outputs
    assert len({fps[0], fps[1], fps[3]}) == 3
    plain = norm(pa.table({"image_uri": ["a.png"], "instruction": ["happy"]}))
    assert plain["fingerprint"][0] == fps[0] and plain["id"][0] == ids[0]  # no blend: as before


def test_blend_errors():
    def one(**cols):
        df = norm(pa.table({"image_uri": ["a.png"], "instruction": ["happy"], **cols}))
        return df["error_type"][0], df["error_message"][0]

    code, msg = one(blend_scale=[0.3])
    assert code == errors.INVALID_ROW and "without a blend_instruction" in msg
    code, msg = one(blend_instruction=["neutral"], blend_scale=["lots"])
    assert code == errors.INVALID_ROW and "blend_scale" in msg
    code, _ = one(blend_instruction=["x" * 101])
    assert code == errors.INSTRUCTION_TOO_LONG
    code, _ = one(blend_instruction=["neutral"], blend_scale=[float("nan")])
    assert code == errors.INVALID_ROW
