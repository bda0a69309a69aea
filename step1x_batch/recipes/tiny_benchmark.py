"""``step1x-batch make-tiny-benchmark DIR [--seed N]``: a GEdit-Bench-shaped dataset made from a seed.

The published benchmark (``hf://datasets/stepfun-ai/GEdit-Bench/data/*.parquet``) is Parquet with
the images inside: columns ``key``, ``task_type``, ``instruction``, ``instruction_language``,
``input_image``, ``input_image_raw`` (``datasets`` Image features: ``{bytes, path}`` structs) and
``Intersection_exist``. This writes the same columns and types at toy size (12 rows: 3 task types x
2 languages x 2, small procedurally drawn PNGs), so the demo and the tests run the benchmark job on
a dataset shaped exactly like the real one. The ``datasets`` feature metadata goes into the Parquet
schema (the ``huggingface`` key ``datasets`` itself writes), written with pyarrow: the job does not
import ``datasets``, yet ``load_dataset("parquet", ...)`` types both image columns as ``Image()``.
Same seed, same bytes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

__all__ = ["TASK_TYPES", "LANGUAGES", "DATA_FILE", "make_tiny_benchmark", "tiny_benchmark_table"]

TASK_TYPES = ("background_change", "color_alter", "style_change")
LANGUAGES = ("en", "cn")
DATA_FILE = "data/train-00000-of-00001.parquet"  # the hub's own file name for one shard
RAW_SIZE = (64, 48)  # input_image_raw, width x height
INPUT_SIZE = (32, 24)  # input_image: a resized copy of the raw one

_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets.Image's storage
_INSTRUCTIONS = {
    ("background_change", "en"): ["Replace the background with a beach", "Put the object in a snowy forest"],
    ("background_change", "cn"): ["把背景换成海滩", "把物体放到雪林里"],
    ("color_alter", "en"): ["Make the circle red", "Turn the square blue"],
    ("color_alter", "cn"): ["把圆形变成红色", "把方块变成蓝色"],
    ("style_change", "en"): ["Make it look like a watercolour painting", "Render it in pixel-art style"],
    ("style_change", "cn"): ["把它变成水彩画风格", "用像素画风格渲染"],
}


def _features() -> dict[str, dict[str, str]]:
    """GEdit-Bench's features in ``Features.to_dict()`` form."""
    value = lambda dtype: {"dtype": dtype, "_type": "Value"}  # noqa: E731
    return {"key": value("string"), "task_type": value("string"), "instruction": value("string"),
            "instruction_language": value("string"), "input_image": {"_type": "Image"},
            "input_image_raw": {"_type": "Image"}, "Intersection_exist": value("bool")}


def _schema() -> pa.Schema:
    schema = pa.schema([("key", pa.string()), ("task_type", pa.string()), ("instruction", pa.string()),
                        ("instruction_language", pa.string()), ("input_image", _IMAGE),
                        ("input_image_raw", _IMAGE), ("Intersection_exist", pa.bool_())])
    return schema.with_metadata({b"huggingface": json.dumps({"info": {"features": _features()}}).encode()})


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # no timestamp chunk: the same pixels give the same bytes
    return buf.getvalue()


def _draw(rng: np.random.Generator) -> Image.Image:
    """A small picture: a gradient background, a circle and a square in random colours."""
    w, h = RAW_SIZE
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0.0, 1.0, h)[:, None, None]
    background = (top * (1 - t) + bottom * t).astype(np.uint8).repeat(w, axis=1)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    cx, cy, r = int(rng.integers(12, w - 12)), int(rng.integers(10, h - 10)), int(rng.integers(5, 10))
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    x, y, s = int(rng.integers(0, w - 14)), int(rng.integers(0, h - 14)), int(rng.integers(6, 14))
    draw.rectangle([x, y, x + s, y + s], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def tiny_benchmark_table(seed: int = 0) -> pa.Table:
    """The 12 rows (3 task types x 2 languages x 2) with the published columns and types."""
    rng = np.random.default_rng(seed)
    rows = []
    for task in TASK_TYPES:
        for lang in LANGUAGES:
            for k, instruction in enumerate(_INSTRUCTIONS[(task, lang)]):
                key = f"{task}-{lang}-{k}"
                raw = _draw(rng)
                small = raw.resize(INPUT_SIZE, Image.Resampling.BICUBIC)
                rows.append({"key": key, "task_type": task, "instruction": instruction,
                             "instruction_language": lang,
                             "input_image": {"bytes": _png(small), "path": f"{key}.png"},
                             "input_image_raw": {"bytes": _png(raw), "path": f"{key}_raw.png"},
                             "Intersection_exist": bool(rng.integers(0, 2))})
    return pa.Table.from_pylist(rows, schema=_schema())


_README = """# A tiny GEdit-Bench-shaped dataset (seed {seed})

Made by `step1x-batch make-tiny-benchmark` for the demo and the tests: {rows} rows ({types} x
languages {langs} x 2), small drawn pictures, the published columns and types of
[GEdit-Bench](https://huggingface.co/datasets/stepfun-ai/GEdit-Bench) (`key`, `task_type`,
`instruction`, `instruction_language`, `input_image`, `input_image_raw` as `datasets` Image
features, `Intersection_exist`). The same seed writes the same bytes.

Use it as a benchmark's input:

```yaml
input:
  manifest: {manifest}
  columns: {{id: key, image: input_image_raw, instruction: instruction}}
```

For the real benchmark: `input.manifest: hf://datasets/stepfun-ai/GEdit-Bench/data/` with the same
`columns`.
"""


def make_tiny_benchmark(folder: str | Path, seed: int = 0) -> Path:
    """Write ``folder/data/train-00000-of-00001.parquet`` and ``folder/README.md``; return the
    Parquet file's path."""
    folder = Path(folder)
    path = folder / DATA_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    table = tiny_benchmark_table(seed)
    pq.write_table(table, path, compression="zstd")
    (folder / "README.md").write_text(_README.format(
        seed=seed, rows=table.num_rows, types=", ".join(TASK_TYPES), langs=" and ".join(LANGUAGES),
        manifest=str(path.parent.resolve()) + "/"), encoding="utf-8")
    return path
