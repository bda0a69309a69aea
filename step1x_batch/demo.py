"""``step1x-batch demo [--family step1x|qwen-image-edit]``: the whole job on a laptop CPU in
about a minute.

Makes a tiny release folder of the family from a seed (cached in the working folder), draws sample
pictures, writes a manifest with a few deliberately bad rows (so the report shows errors too; the
Qwen-Image-Edit manifest adds rows with several input images), writes the job config and runs it
on a local Ray, exactly as a cluster run would go.

Working folder: ``--dir`` if given, else ``./step1x-demo`` in the current directory.
Layout for Step1X-Edit: ``weights/`` (tiny model), ``inputs/`` (pictures + ``manifest.jsonl``),
``demo.yaml`` (the config), ``output/`` (``images/``, ``logs/<run_id>/``,
``runs/<run_id>/report.html``); Qwen-Image-Edit: the same names with ``-qwen-image-edit``.
Running it again reuses the weights and inputs and skips rows already done (resume).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from step1x_batch.job.lease import Lease
    from step1x_batch.job.preflight import Preflight

DEFAULT_WORKDIR = "step1x-demo"
FAMILIES = ("step1x", "qwen-image-edit")

# Good rows: (file name, width, height, instruction, how it is stored).
_GOOD = [
    ("sunset.png", 96, 64, "make the sky purple", "png"),
    ("circles.png", 64, 64, "turn the circles into squares", "png"),
    ("stripes.jpg", 80, 112, "add snow on the ground", "jpeg"),
    ("poster_cmyk.jpg", 96, 64, "make it look like an old poster", "cmyk"),
    ("palette.gif", 64, 48, "remove the sun", "gif"),
    ("grey.png", 72, 72, "colourise the picture", "grey"),
    ("alpha.png", 64, 80, "put the object on a beach", "rgba"),
    ("rotated.jpg", 96, 64, "make it night time", "exif"),
    ("scripty.png", 64, 64, "<script>alert('not run')</script> add a red hat", "png"),
]


def _suffix(family: str) -> str:
    return "" if family == "step1x" else f"-{family}"


def demo_config(workdir: str, family: str = "step1x") -> dict[str, Any]:
    """The demo's job config (``configs/demo.yaml`` is this with workdir ``step1x-demo``)."""
    w = workdir.rstrip("/")
    if family == "qwen-image-edit":
        return _qwen_demo_config(w)
    return {
        "input": {"manifest": f"{w}/inputs/manifest.jsonl"},
        "output": {"uri": f"{w}/output", "format": "png"},
        "model": {
            "family": "step1x",
            "weights": f"{w}/weights",
            "dtype": "float32",
            "device": "cpu",
            "max_batch_size": 2,
            "options": {"version": "v1.1"},
        },
        "sampling": {"num_steps": 4, "guidance_scale": 6.0, "size_level": 128, "negative_prompt": ""},
        "resources": {
            "num_gpus_per_actor": 0,
            "cpus_per_actor": 0.5,
            "reserved_cpus": 1,
            "min_actors": 1,
            "max_actors": 1,  # one tiny model; torch uses every core in it
            "edit_batch_size": 2,
            "io_batch_size": 4,
        },
        "runtime": {
            "max_error_fraction": 0.5,  # the demo's manifest is bad on purpose in a third of its rows
            "log_part_rows": 8,
            "progress_bars": True,
        },
    }


def _qwen_demo_config(w: str) -> dict[str, Any]:
    """Qwen-Image-Edit at toy size: small reference and VL areas so the CPU keeps up."""
    s = _suffix("qwen-image-edit")
    return {
        "input": {"manifest": f"{w}/inputs/manifest{s}.jsonl"},
        "output": {"uri": f"{w}/output{s}", "format": "png"},
        "model": {
            "family": "qwen-image-edit",
            "weights": f"{w}/weights{s}",
            "dtype": "float32",
            "device": "cpu",
            "max_batch_size": 2,
            "options": {"reference_area": 96 * 96, "vl_area": 64 * 64},
        },
        "sampling": {"num_steps": 4, "size_level": 96},
        "resources": {
            "num_gpus_per_actor": 0, "cpus_per_actor": 0.5, "reserved_cpus": 1, "min_actors": 1,
            "max_actors": 1, "edit_batch_size": 2, "io_batch_size": 4,
        },
        "runtime": {"max_error_fraction": 0.5, "log_part_rows": 8, "progress_bars": True},
    }


def _draw(width: int, height: int, seed: int) -> np.ndarray:
    """A procedural picture: a gradient sky, a sun, hills and a few shapes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = (y / max(1, height - 1))[..., None]
    sky = (1 - t) * top + t * bottom
    img = Image.fromarray(sky.astype(np.uint8))
    d = ImageDraw.Draw(img)
    r = max(4, min(width, height) // 6)
    cx, cy = int(rng.integers(r, width - r)), int(rng.integers(r, height // 2))
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(255, 214, 64))
    hill = [(0, height)] + [(i, int(height * (0.65 + 0.1 * np.sin(i / 9 + seed)))) for i in range(0, width + 1, 4)]
    d.polygon(hill + [(width, height)], fill=tuple(int(c) for c in rng.integers(0, 160, 3)))
    for _ in range(3):
        s = int(rng.integers(4, max(5, min(width, height) // 4)))
        px, py = int(rng.integers(0, width - s)), int(rng.integers(0, height - s))
        d.rectangle([px, py, px + s, py + s], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return np.asarray(img)


def _encode(image: np.ndarray, how: str) -> bytes:
    pil = Image.fromarray(image)
    buf = io.BytesIO()
    if how == "png":
        pil.save(buf, "PNG")
    elif how == "jpeg":
        pil.save(buf, "JPEG", quality=92)
    elif how == "cmyk":
        pil.convert("CMYK").save(buf, "JPEG", quality=92)
    elif how == "gif":
        pil.convert("P", palette=Image.Palette.ADAPTIVE).save(buf, "GIF")
    elif how == "grey":
        pil.convert("L").save(buf, "PNG")
    elif how == "rgba":
        rgba = pil.convert("RGBA")
        alpha = np.full(image.shape[:2], 255, np.uint8)
        alpha[:, : image.shape[1] // 3] = 0
        rgba.putalpha(Image.fromarray(alpha))
        rgba.save(buf, "PNG")
    elif how == "exif":  # stored rotated; EXIF orientation 6 makes it upright again
        exif = Image.Exif()
        exif[0x0112] = 6
        pil.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=92, exif=exif.tobytes())
    else:
        raise ValueError(how)
    return buf.getvalue()


def make_inputs(folder: str | os.PathLike, family: str = "step1x") -> Path:
    """Draw the sample pictures and write the family's manifest (relative image paths) into
    ``folder``; Qwen-Image-Edit's also has rows with several input images."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for i, (name, w, h, instruction, how) in enumerate(_GOOD):
        (folder / name).write_bytes(_encode(_draw(w, h, seed=i), how))
        rows.append({"id": Path(name).stem, "image_uri": name, "instruction": instruction, "source": "demo"})
    good_png = _encode(_draw(64, 64, seed=99), "png")
    (folder / "corrupt.png").write_bytes(good_png[:16] + b"\xff" * 8 + good_png[24:])  # header mangled
    (folder / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    (folder / "ok_for_bad_rows.png").write_bytes(good_png)
    rows += [
        {"id": "missing", "image_uri": "no_such_picture.png", "instruction": "add a moon", "source": "demo"},
        {"id": "corrupt", "image_uri": "corrupt.png", "instruction": "add a moon", "source": "demo"},
        {"id": "truncated", "image_uri": "truncated.png", "instruction": "add a moon", "source": "demo"},
        {"id": "blank-instruction", "image_uri": "ok_for_bad_rows.png", "instruction": "   ", "source": "demo"},
        {"id": "escaping-key", "image_uri": "ok_for_bad_rows.png", "instruction": "add a moon",
         "output_key": "../../outside.png", "source": "demo"},
    ]
    if family == "qwen-image-edit":
        rows += [
            {"id": "two-pictures", "image_uris": ["sunset.png", "circles.png"],
             "instruction": "put the circles into the sunset", "source": "demo"},
            {"id": "three-pictures", "image_uris": ["stripes.jpg", "grey.png", "alpha.png"],
             "instruction": "combine the three pictures into one poster", "source": "demo"},
            {"id": "missing-reference", "image_uris": ["sunset.png", "no_such_picture.png"],
             "instruction": "add the missing picture", "source": "demo"},
        ]
    manifest = folder / f"manifest{_suffix(family)}.jsonl"
    with open(manifest, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return manifest


def make_weights(folder: str | os.PathLike, family: str = "step1x") -> Path:
    """The tiny release folder, made once from seed 0 and reused (a marker file says it is whole)."""
    folder = Path(folder)
    marker = folder / ".demo-weights-complete"
    if marker.exists():
        return folder
    if family == "qwen-image-edit":
        from step1x_batch.models.qwen_image_edit.tiny import make_tiny_weights
    else:
        from step1x_batch.models.step1x.tiny import make_tiny_weights

    make_tiny_weights(str(folder), seed=0)
    marker.write_text("seed 0\n")
    return folder


def main(workdir: str | None = None, family: str = "step1x") -> int:
    """Prepare everything under ``workdir`` and run the job; returns the exit status."""
    from step1x_batch.job.config import parse_config
    from step1x_batch.job.entrypoint import check_lease_and_run, exit_status
    from step1x_batch.job.runner import run_job

    if family not in FAMILIES:
        raise ValueError(f"the demo runs one of {', '.join(FAMILIES)}, not {family!r}")
    s = _suffix(family)
    work = Path(workdir or DEFAULT_WORKDIR).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"step1x-batch demo ({family}) in {work}")
    print("  tiny weights ...", end=" ", flush=True)
    make_weights(work / f"weights{s}", family)
    print(f"{work / f'weights{s}'}")
    manifest = work / "inputs" / f"manifest{s}.jsonl"
    if not manifest.exists():
        make_inputs(work / "inputs", family)
    print(f"  manifest:      {manifest}")
    raw = demo_config(str(work), family)
    (work / f"demo{s}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    print(f"  config:        {work / f'demo{s}.yaml'}")
    cfg = parse_config(raw)

    def run(facts: "Preflight", lease: "Lease") -> bool:
        summary = run_job(cfg, facts, lease)
        print(f"open the report: {summary.paths['report']}")
        if summary.rows_processed == 0 and summary.rows_skipped:
            print(f"(every row was already done by an earlier run; delete {work / f'output{s}'} to redo them)")
        return summary.ok

    return exit_status(lambda: check_lease_and_run(cfg, run, job="demo"))
