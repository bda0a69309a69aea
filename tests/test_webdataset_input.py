"""WebDataset tar shards as input (issue 21, item 2): rows/webdataset.read_shard on real tar files
written by Python's tarfile and by the ``webdataset`` package, locally and on the moto S3 server."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import fsspec
import pyarrow as pa
import pytest
import webdataset as wds

from step1x_batch.rows import manifest
from step1x_batch.rows.webdataset import (
    MANIFEST_PROBLEM,
    DEFAULT_COLUMNS,
    default_view,
    iter_shard,
    read_shard,
    split_name,
)


def _png(image_factory, shade: int) -> bytes:
    rgb = image_factory.rgb(24, 16)
    rgb[0, 0] = (shade, shade, shade)  # every sample's picture differs
    return image_factory.encode(rgb, "PNG")


def _jpg(image_factory, shade: int) -> bytes:
    rgb = image_factory.rgb(24, 16)
    rgb[:, :2] = (shade, 0, 0)
    return image_factory.encode(rgb, "JPEG", quality=90)


def _write_tar(path: Path, members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> list[int]:
    """Write members in order; returns each member's data offset in the file."""
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tf:
        return [m.offset_data for m in tf.getmembers()]


def _samples(image_factory, start: int, count: int) -> list[tuple[str, dict[str, bytes]]]:
    out = []
    for i in range(start, start + count):
        key = f"part/{i:06d}"
        out.append((key, {
            "jpg": _jpg(image_factory, 10 * i),
            "txt": f"make sample {i} brighter".encode(),
            "json": json.dumps({"instruction": f"edit {i}", "task_type": "color", "score": i / 2,
                                "ok": True, "tags": ["a", i], "none": None}).encode(),
        }))
    return out


def _members(samples) -> list[tuple[str, bytes]]:
    return [(f"{key}.{ext}", data) for key, parts in samples for ext, data in parts.items()]


@pytest.fixture
def three_shards(tmp_path, image_factory):
    """shard-0 by tarfile, shard-1 by webdataset's TarWriter, shard-2 cut inside an image member."""
    s0, s1, s2 = (_samples(image_factory, 4 * n, 4) for n in range(3))
    _write_tar(tmp_path / "shard-0.tar", _members(s0))
    with wds.TarWriter(str(tmp_path / "shard-1.tar")) as sink:
        for key, parts in s1:
            sink.write({"__key__": key, **parts})
    full = tmp_path / "full-2.tar"
    members = _members(s2)
    offsets = _write_tar(full, members)
    third_jpg = [i for i, (name, _) in enumerate(members) if name == f"{s2[2][0]}.jpg"][0]
    cut = offsets[third_jpg] + len(members[third_jpg][1]) // 2  # in the middle of the image bytes
    (tmp_path / "shard-2.tar").write_bytes(full.read_bytes()[:cut])
    full.unlink()
    return tmp_path, (s0, s1, s2)


def test_three_shards_one_truncated_give_intact_rows_and_one_problem_row(three_shards):
    folder, (s0, s1, s2) = three_shards
    tables = [read_shard(str(folder / f"shard-{n}.tar"), None) for n in range(3)]

    for table, samples in zip(tables[:2], (s0, s1)):
        assert table.num_rows == 4
        assert table.column("__key__").to_pylist() == [k for k, _ in samples]
        assert table.column("jpg").to_pylist() == [p["jpg"] for _, p in samples]
        assert table.column("txt").to_pylist() == [p["txt"].decode() for _, p in samples]
        assert table.column(MANIFEST_PROBLEM).null_count == 4

    broken = tables[2]
    # two intact samples, then one row for the sample the tar ends inside, nothing after it
    assert broken.column("__key__").to_pylist() == [s2[0][0], s2[1][0], s2[2][0]]
    assert broken.column("jpg").to_pylist()[:2] == [s2[0][1]["jpg"], s2[1][1]["jpg"]]
    problems = broken.column(MANIFEST_PROBLEM).to_pylist()
    assert problems[:2] == [None, None]
    shard = str(folder / "shard-2.tar")
    assert problems[2] == f"shard {shard}: member {s2[2][0]}.jpg is truncated (the tar ends inside it)"
    assert broken.column("jpg")[2].as_py() is None  # no half image handed on

    # one schema for every shard, so Ray can concatenate the blocks as they are
    assert tables[0].schema == tables[1].schema == broken.schema
    assert pa.concat_tables(tables).num_rows == 11
    assert broken.schema.field("jpg").type == pa.large_binary()
    assert broken.schema.field("txt").type == pa.string()
    assert broken.schema.field("score").type == pa.string()


def test_a_sample_with_json_jpg_and_txt(tmp_path, image_factory):
    jpg, png = _jpg(image_factory, 3), _png(image_factory, 4)
    doc = {"instruction": "add a hat", "task_type": "add", "seed": 7, "weight": 0.5, "flag": False,
           "tags": ["x", 1], "meta": {"lang": "en"}, "empty": None, "jpg": "loses to the member",
           "webp": "an image name: never a text column", "__key__": "not the key"}
    shard = tmp_path / "one.tar"
    _write_tar(shard, [("dir/k1.jpg", jpg), ("dir/k1.json", json.dumps(doc).encode()),
                       ("dir/k1.txt", "café".encode()), ("dir/k1.0.png", png),
                       ("dir/k1.cls", b"\x00\x01")])
    table = read_shard(str(shard), None)
    assert table.num_rows == 1
    row = table.to_pylist()[0]
    assert row["__key__"] == "dir/k1" and row["__url__"] == str(shard)
    assert row["jpg"] == jpg and row["0.png"] == png and row["cls"] == b"\x00\x01"
    assert row["txt"] == "café"
    assert (row["instruction"], row["task_type"], row["seed"], row["weight"], row["flag"]) == (
        "add a hat", "add", "7", "0.5", "false")
    assert json.loads(row["tags"]) == ["x", 1] and json.loads(row["meta"]) == {"lang": "en"}
    assert row["empty"] is None and row[MANIFEST_PROBLEM] is None
    assert "webp" not in row  # would be string here and bytes in a shard with .webp members
    assert table.schema.field("0.png").type == pa.large_binary()
    assert table.schema.field("cls").type == pa.large_binary()
    assert table.schema.field("seed").type == pa.string()
    assert table.column_names[0:2] == ["__key__", "__url__"] and table.column_names[-1] == MANIFEST_PROBLEM


def test_default_view_chooses_sample_by_sample(tmp_path, image_factory):
    """Without input.columns each sample takes its own image and text (a shard mixing jpg and png
    samples, or json and txt instructions, loses none), and its id names its shard."""
    path = tmp_path / "mixed.tar"
    png, jpg = _png(image_factory, 1), _jpg(image_factory, 2)
    _write_tar(path, [("a.png", png), ("a.txt", b"from txt"), ("b.jpg", jpg),
                      ("b.json", b'{"instruction": "from json", "task": "t"}'), ("c.txt", b"no image")])
    view = default_view(read_shard(str(path)))
    rows = {r["__sample__"]: r for r in view.to_pylist()}
    assert set(rows) == {"mixed/a", "mixed/b", "mixed/c"}
    assert rows["mixed/a"]["__image__"] == png and rows["mixed/a"]["__instruction__"] == "from txt"
    assert rows["mixed/b"]["__image__"] == jpg and rows["mixed/b"]["__instruction__"] == "from json"
    assert rows["mixed/c"]["__image__"] is None and rows["mixed/b"]["task"] == "t"
    assert not {"png", "jpg", "txt", "instruction"} & set(view.column_names)  # taken members are not carried twice
    assert DEFAULT_COLUMNS == {"id": "__sample__", "image": "__image__",
                                                  "instruction": "__instruction__"}


def test_member_names_group_as_webdataset_groups_them(tmp_path):
    assert split_name("a/b/000123.jpg") == ("a/b/000123", "jpg")
    assert split_name("x.0.png") == ("x", "0.png")
    assert split_name("x.JPG") == ("x", "jpg")
    assert split_name("README") is None and split_name("d/.hidden.txt") is None
    members = [("a/b/1.jpg", b"1"), ("a/b/1.seg.png", b"2"), ("a/c/1.jpg", b"3"), ("x.0.png", b"4"),
               ("x.txt", b"t"), ("README", b"skipped")]
    shard = tmp_path / "names.tar"
    _write_tar(shard, members)
    ours = read_shard(str(shard), None).to_pylist()
    theirs = list(wds.WebDataset(str(shard), shardshuffle=False, empty_check=False))
    assert [r["__key__"] for r in ours] == [s["__key__"] for s in theirs] == ["a/b/1", "a/c/1", "x"]
    for row, sample in zip(ours, theirs):
        exts = {k for k in sample if not k.startswith("__")}
        assert {k for k, v in row.items() if v is not None and not k.startswith("__")} == exts


def test_broken_members_are_problems_of_their_sample(tmp_path, image_factory):
    jpg = _jpg(image_factory, 1)
    shard = tmp_path / "bad.tar"
    _write_tar(shard, [("k1.jpg", jpg), ("k1.txt", b"\xff\xfe bad"),
                       ("k2.jpg", jpg), ("k2.json", b"[1, 2]"),
                       ("k3.jpg", jpg), ("k3.json", b"{not json"),
                       ("k4.jpg", b"x" * 5000),
                       ("k1.png", jpg),  # k1 again, after other samples
                       ("k5.jpg", jpg)])
    table = read_shard(str(shard), None, max_member_bytes=4096)
    keys = table.column("__key__").to_pylist()
    problems = dict(zip(range(len(keys)), table.column(MANIFEST_PROBLEM).to_pylist()))
    assert keys == ["k1", "k2", "k3", "k4", "k1", "k5"]
    where = f"shard {shard}: member"
    assert problems[0].startswith(f"{where} k1.txt is not valid UTF-8 text")
    assert problems[1] == f"{where} k2.json is a JSON list, not an object"
    assert problems[2].startswith(f"{where} k3.json is not valid JSON")
    assert problems[3] == f"{where} k4.jpg is 5000 bytes, over the 4096-byte member limit; skipped"
    assert table.column("jpg")[3].as_py() is None
    assert "key 'k1' repeats at member k1.png" in problems[4] and "starts at member k1.jpg" in problems[4]
    assert problems[5] is None
    assert table.column("jpg").to_pylist()[5] == jpg


def test_a_link_member_cannot_be_read(tmp_path, image_factory):
    shard = tmp_path / "link.tar"
    with tarfile.open(shard, "w") as tf:
        info = tarfile.TarInfo("k1.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
        data = _jpg(image_factory, 2)
        info = tarfile.TarInfo("k2.jpg")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    rows = read_shard(str(shard), None).to_pylist()
    assert [r["__key__"] for r in rows] == ["k1", "k2"]
    assert rows[0][MANIFEST_PROBLEM] == f"shard {shard}: member k1.jpg cannot be read (a symbolic link, not a file)"
    assert rows[1]["jpg"] == data and rows[1][MANIFEST_PROBLEM] is None


def test_a_tar_cut_between_members_or_damaged_is_reported(tmp_path, image_factory):
    members = [(f"k{i}.jpg", _jpg(image_factory, i)) for i in range(3)]
    full = tmp_path / "full.tar"
    offsets = _write_tar(full, members, fmt=tarfile.USTAR_FORMAT)
    data = full.read_bytes()
    header_of_last = offsets[2] - 512
    cases = {
        "boundary.tar": (data[:header_of_last], "without its end-of-archive marker"),
        "header.tar": (data[:header_of_last + 100], "ends inside a member header"),
        "damaged.tar": (data[:header_of_last] + b"garbage!" * 64, "a damaged member header"),
    }
    for name, (blob, why) in cases.items():
        (tmp_path / name).write_bytes(blob)
        table = read_shard(str(tmp_path / name), None)
        assert table.column("__key__").to_pylist() == ["k0", "k1", None], name
        assert table.column("jpg").to_pylist()[:2] == [members[0][1], members[1][1]]
        last = table.column(MANIFEST_PROBLEM).to_pylist()[-1]
        assert why in last and "after member k1.jpg" in last, (name, last)
    assert read_shard(str(full), None).column(MANIFEST_PROBLEM).null_count == 3


def test_a_file_that_is_not_a_tar_is_one_problem_row(tmp_path):
    for name, blob in (("text.tar", b"hello, not a tar " * 100), ("empty.tar", b"")):
        path = tmp_path / name
        path.write_bytes(blob)
        table = read_shard(str(path), None)
        assert table.num_rows == 1
        row = table.to_pylist()[0]
        assert row["__key__"] is None and row["__url__"] == str(path)
        assert row[MANIFEST_PROBLEM].startswith(f"shard {path} is not a tar file")
    with pytest.raises(FileNotFoundError):  # a shard that cannot be opened is the caller's refusal
        read_shard(str(tmp_path / "missing.tar"), None)


def test_gzip_shards_and_batches(tmp_path, image_factory):
    samples = _samples(image_factory, 0, 6)
    plain = tmp_path / "s.tar"
    _write_tar(plain, _members(samples))
    packed = tmp_path / "s.tar.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    whole = read_shard(str(plain), None)
    assert read_shard(str(packed), None).drop_columns(["__url__"]).equals(whole.drop_columns(["__url__"]))
    pieces = list(iter_shard(str(plain), None, batch_bytes=1))  # a table per sample
    assert len(pieces) == 6 and all(p.num_rows == 1 for p in pieces)
    assert pa.concat_tables(pieces).equals(whole)
    empty = tmp_path / "empty-archive.tar"
    _write_tar(empty, [])
    assert read_shard(str(empty), None).num_rows == 0


def test_a_shard_on_s3(s3_bucket, storage_options, tmp_path, image_factory):
    samples = _samples(image_factory, 0, 3)
    local = tmp_path / "s3.tar"
    _write_tar(local, _members(samples))
    uri = f"{s3_bucket}/shards/shard-000.tar"
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": storage_options.endpoint_url})
    fs.pipe(uri, local.read_bytes())
    table = read_shard(uri, storage_options)
    assert table.column("__key__").to_pylist() == [k for k, _ in samples]
    assert table.column("jpg").to_pylist() == [p["jpg"] for _, p in samples]
    assert set(table.column("__url__").to_pylist()) == {uri}
    assert table.schema == read_shard(str(local), None).schema
    with pytest.raises(FileNotFoundError):
        read_shard(f"{s3_bucket}/shards/missing.tar", storage_options)


def test_the_problem_column_is_the_manifest_readers_one():
    assert MANIFEST_PROBLEM == manifest.MANIFEST_PROBLEM


def test_a_column_map_on_shards_lacking_a_member(tmp_path, image_factory):
    """input.columns on WebDataset shards: a piece without a mapped member gives problem rows
    naming it, never a failed read; pre-flight does not refuse the map (members are columns)."""
    from step1x_batch.job.config import parse_config
    from step1x_batch.job.preflight import check_job
    from step1x_batch.rows.manifest import read_manifest_table

    folder = tmp_path / "shards"
    folder.mkdir()
    _write_tar(folder / "a.tar", [("x.png", _png(image_factory, 1)), ("x.caption", b"make it red")])
    _write_tar(folder / "b.tar", [("y.png", _png(image_factory, 2))])  # no caption member at all
    columns = {"id": "__key__", "image": "png", "instruction": "caption"}
    table = read_manifest_table(str(folder), edit_rows=True, columns=columns)
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows["x"]["instruction"] == "make it red" and rows["x"][MANIFEST_PROBLEM] is None
    assert "['caption']" in rows["y"][MANIFEST_PROBLEM]
    cfg = parse_config({"input": {"manifest": str(folder), "columns": columns}, "output": {"uri": str(tmp_path / "o")},
                        "model": {"family": "null"}})
    check_job(cfg)  # no refusal: b.tar's sample is its own error row
