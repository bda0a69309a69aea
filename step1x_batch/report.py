"""``runs/<run_id>/report.html``: a contact sheet of input / output thumbnails, errors first.

People would rather look than read. One self-contained HTML file (thumbnails are small base64
JPEG data URIs, no external assets), at most ``runtime.report_max_rows`` rows. Every piece of text
that came from a manifest, a log or an exception is passed through :func:`html.escape`: an
instruction such as ``<script>...`` shows as text and never runs.
"""

from __future__ import annotations

import base64
import html
import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
from PIL import Image

from step1x_batch.storage import StorageOptions, read_bytes, write_bytes

THUMB = 160  # pixels on the longer side


def thumbnail_data_uri(data: bytes, max_pixels: int = 40_000_000, size: int = THUMB) -> str | None:
    """A small JPEG data URI of an encoded image, or None when it cannot be decoded."""
    from step1x_batch.images import decode_image

    try:
        image = decode_image(data, max_pixels)
    except Exception:
        return None
    return array_data_uri(image, size)


def array_data_uri(image: np.ndarray, size: int = THUMB) -> str:
    pil = Image.fromarray(np.ascontiguousarray(image))
    pil.thumbnail((size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    pil.convert("RGB").save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fetch(uri: str | None, options: StorageOptions | None, max_pixels: int) -> str | None:
    if not uri:
        return None
    try:
        return thumbnail_data_uri(read_bytes(uri, options), max_pixels)
    except Exception:
        return None


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em} .sum{margin:.5em 0 1em;line-height:1.5}
table{border-collapse:collapse;width:100%} td,th{border-bottom:1px solid #ddd;padding:6px;vertical-align:top;text-align:left}
td.img{width:170px} img{max-width:160px;max-height:160px;display:block}
.inputs{display:flex;flex-wrap:wrap;gap:4px;max-width:340px} .inputs img{max-width:80px;max-height:80px}
.inputs .ph{width:80px;height:60px}
.ph{width:160px;height:90px;background:#f3f3f3;color:#888;display:flex;align-items:center;justify-content:center;font-size:.8em}
.error{background:#fff4f4} .code{font-family:monospace;color:#b00020;font-weight:bold}
.meta{color:#666;font-size:.85em} .instr{white-space:pre-wrap;word-break:break-word;max-width:40em}
"""


def _img(src: str | None, alt: str) -> str:
    if src is None:
        return f'<div class="ph">{_e(alt)}</div>'
    return f'<img src="{src}" alt="{_e(alt)}">'


def _inputs(srcs: Sequence[str | None]) -> str:
    """One thumbnail per input image (a multi-reference row shows all of them, in order)."""
    if len(srcs) <= 1:
        return _img(srcs[0] if srcs else None, "no input image")
    cells = "".join(_img(src, f"input {i} unreadable") for i, src in enumerate(srcs, 1))
    return f'<div class="inputs">{cells}</div>'


def render_report(
    summary: dict[str, Any],
    rows: Sequence[dict[str, Any]],
    thumbs: Sequence[tuple[Sequence[str | None], str | None]],
) -> str:
    """The HTML page: summary on top, then one table row per record (inputs, output, text)."""
    by_type = summary.get("by_error_type") or {}
    errs = ", ".join(f"{_e(k)}: {int(v)}" for k, v in sorted(by_type.items())) or "none"
    status = "FAILED" if not summary.get("ok", True) else "succeeded"
    head = (
        f"<h1>step1x-batch run {_e(summary.get('run_id'))} ({status})</h1>"
        f'<div class="sum">'
        f"{int(summary.get('rows_processed', 0))} rows processed: "
        f"{int((summary.get('by_status') or {}).get('ok', 0))} ok, "
        f"{int((summary.get('by_status') or {}).get('error', 0))} error ({errs}); "
        f"{int(summary.get('rows_skipped', 0))} skipped as already done; "
        f"{float(summary.get('wall_s', 0.0)):.1f} s, {float(summary.get('rows_per_s', 0.0)):.2f} rows/s.<br>"
        f"Output: {_e(summary.get('output_uri'))}<br>"
        f"Showing {len(rows)} rows, errors first.</div>"
    )
    body = ["<table><tr><th>input</th><th>output</th><th>row</th></tr>"]
    for rec, (tins, tout) in zip(rows, thumbs):
        err = rec.get("status") == "error"
        text = [f'<div class="instr">{_e(rec.get("instruction"))}</div>']
        if err:
            text.append(
                f'<div><span class="code">{_e(rec.get("error_type"))}</span> {_e(rec.get("error_message"))}</div>'
            )
        meta = (
            f"id {_e(rec.get('id'))} &middot; seed {_e(rec.get('seed'))} &middot; "
            f"steps {_e(rec.get('num_steps'))} &middot; cfg {_e(rec.get('guidance_scale'))} &middot; "
            f"size {_e(rec.get('size_level'))}"
        )
        if rec.get("input_width"):
            meta += f" &middot; input {_e(rec.get('input_width'))}x{_e(rec.get('input_height'))}"
        uris = rec.get("image_uris") or [rec.get("image_uri")]
        text.append(f'<div class="meta">{meta}<br>{"<br>".join(_e(u) for u in uris)}</div>')
        body.append(
            f'<tr class="{"error" if err else "ok"}">'
            f'<td class="img">{_inputs(tins)}</td>'
            f'<td class="img">{_img(tout, "no output" if err else "output unreadable")}</td>'
            f"<td>{''.join(text)}</td></tr>"
        )
    body.append("</table>")
    return (
        '<!doctype html><html><head><meta charset="utf-8">'
        f"<title>step1x-batch {_e(summary.get('run_id'))}</title><style>{_CSS}</style></head>"
        f"<body>{head}{''.join(body)}</body></html>\n"
    )


def write_report(
    summary: dict[str, Any],
    rows: Sequence[dict[str, Any]],
    uri: str,
    *,
    input_storage: StorageOptions | None,
    output_storage: StorageOptions | None,
    max_pixels: int,
) -> str:
    """Fetch thumbnails for ``rows`` (every input and the output, in parallel) and write the
    report to ``uri``; ``summary`` is the run's summary as written to ``summary.json``."""

    def thumbs(rec: dict[str, Any]) -> tuple[list[str | None], str | None]:
        uris = rec.get("image_uris") or [rec.get("image_uri")]
        inputs = [_fetch(u, input_storage, max_pixels) for u in uris]
        return inputs, _fetch(rec.get("output_uri"), output_storage, max_pixels)

    with ThreadPoolExecutor(8) as pool:
        pictures = list(pool.map(thumbs, rows))
    write_bytes(uri, render_report(summary, rows, pictures).encode("utf-8"), output_storage)
    return uri
