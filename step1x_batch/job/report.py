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
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from step1x_batch.job.console import format_rate, plural
from step1x_batch.io.storage import StorageOptions, read_bytes, write_bytes

THUMB = 160  # pixels on the longer side


def thumbnail_data_uri(data: bytes, max_pixels: int = 40_000_000, size: int = THUMB) -> str | None:
    """A small JPEG data URI of an encoded image, or None when it cannot be decoded."""
    from step1x_batch.io.images import decode_image

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
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#222;background:#fafbfc}
h1{font-size:1.3em} .sum{margin:.5em 0 1em;line-height:1.5}
table{border-collapse:collapse;width:100%;background:#fff} td,th{border-bottom:1px solid #ddd;padding:6px;vertical-align:top;text-align:left}
td.img{width:170px} img{max-width:160px;max-height:160px;display:block}
.inputs{display:flex;flex-wrap:wrap;gap:4px;max-width:340px} .inputs img{max-width:80px;max-height:80px}
.inputs .ph{width:80px;height:60px}
.ph{width:160px;height:90px;background:#f3f3f3;color:#888;display:flex;align-items:center;justify-content:center;font-size:.8em}
.error{background:#fff4f4} .code{font-family:monospace;color:#b00020;font-weight:bold}
.meta{color:#666;font-size:.85em} .instr{white-space:pre-wrap;word-break:break-word;max-width:40em}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:14px;margin:0 0 1.5em}
.card{background:#fff;border:1px solid #e3e6ea;border-radius:8px;padding:10px 14px 6px;margin:0;min-width:0}
.card.wide{grid-column:1/-1}
.card figcaption{font-weight:600;font-size:.95em;margin-bottom:4px}
.card figcaption .sub{font-weight:normal;color:#666;font-size:.9em;margin-left:.6em}
.card svg{display:block;width:100%;height:auto}
.card svg text{font-size:12px;fill:#444}
.card svg .axis-title{fill:#666;font-size:11.5px}
.card svg .val{fill:#222}
.nodata{color:#888;font-size:.9em;padding:1.5em 0;text-align:center}
"""

OK_COLOUR = "#4e8fbf"  # calm blue for rows that succeeded
ERROR_COLOUR = "#d9534f"  # red for error rows and error types
STAGE_COLOUR = "#6aa88f"  # muted green for time spent per stage
TOTAL_COLOUR = "#2f3b4a"
GRID_COLOUR = "#e6e9ed"
STAGES = ("normalise", "preprocess", "edit", "write")  # pipeline order, shown in this order
MAX_POINTS = 240  # longer timelines are merged into fewer, wider buckets (the page stays small)
VALUE_CHAR_PX = 7.6  # an upper bound on a 12 px label character's width (digits ~6.7, "%" ~10)
MAX_BARS = 12  # more error types than this: the rest are summed into one "other" bar


def _rows(n: int) -> str:
    return plural(n, "row")


def _num(value: Any) -> float:
    """A finite float, or 0.0: summary values may be missing, None, strings, NaN."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return 0.0
    return out if math.isfinite(out) else 0.0


def _fmt(value: float) -> str:
    """A short readable number: 1,234 / 123 / 12.3 / 1.23 / 0.05."""
    a = abs(value)
    if a >= 1000:
        return f"{value:,.0f}"
    if a >= 100:
        return f"{value:.0f}"
    text = f"{value:.1f}" if a >= 10 else f"{value:.2f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _ticks(top: float, count: int = 5) -> list[float]:
    """Round axis ticks from 0 to at least ``top`` (steps of 1, 2, 2.5 or 5 times a power of 10)."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    n = math.ceil(top / step - 1e-9)
    return [i * step for i in range(n + 1)]


def _svg(width: int, height: int, body: list[str], label: str) -> str:
    # no xmlns: inline SVG in HTML needs none, and the page then names no URL at all
    return (
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{_e(label)}">{"".join(body)}</svg>'
    )


def _timeline(summary: dict[str, Any]) -> tuple[list[tuple[float, float, int, int]], float]:
    """``summary["timeline"]`` as (start_s, end_s, ok, error) buckets, merged down to at most
    MAX_POINTS; ([], 0) when it is missing or unusable (old summaries, odd values)."""
    tl = summary.get("timeline")
    if not isinstance(tl, dict):
        return [], 0.0
    bucket = _num(tl.get("bucket_s"))
    oks, errs = tl.get("ok"), tl.get("error")
    oks = list(oks) if isinstance(oks, (list, tuple)) else []
    errs = list(errs) if isinstance(errs, (list, tuple)) else []
    n = max(len(oks), len(errs))
    if bucket <= 0 or n == 0:
        return [], 0.0
    oks = [max(0, int(_num(v))) for v in oks] + [0] * (n - len(oks))
    errs = [max(0, int(_num(v))) for v in errs] + [0] * (n - len(errs))
    group = math.ceil(n / MAX_POINTS)
    out = []
    for i in range(0, n, group):
        j = min(i + group, n)
        out.append((i * bucket, j * bucket, sum(oks[i:j]), sum(errs[i:j])))
    return out, bucket


def _time_unit(total_s: float) -> tuple[str, float]:
    """Seconds for short runs, minutes or hours for long ones (axis numbers stay small)."""
    if total_s > 3 * 3600:
        return "h", 3600.0
    if total_s > 180:
        return "min", 60.0
    return "s", 1.0


def _line_chart(buckets: list[tuple[float, float, int, int]], width: int = 1180, height: int = 280) -> str:
    """Rows per second over the run: ok rows as a blue area, error rows stacked on top in red,
    the total as a dark line, the mean as a dashed line. Each bucket has a hover tooltip."""
    left, right, top, bottom = 58, 18, 30, 44
    pw, ph = width - left - right, height - top - bottom
    t_end = buckets[-1][1]
    rates = [(ok / (b - a), (ok + err) / (b - a)) for a, b, ok, err in buckets]
    mean = sum(ok + err for _, _, ok, err in buckets) / t_end
    yticks = _ticks(max(r[1] for r in rates) or 1.0)
    ymax = yticks[-1]
    unit, div = _time_unit(t_end)
    xticks = [t * div for t in _ticks(t_end / div, 8) if t * div <= t_end + 1e-9]

    def x(t: float) -> float:
        return left + pw * t / t_end

    def y(v: float) -> float:
        return top + ph - ph * v / ymax

    if len(buckets) == 1:  # one bucket: a flat segment across it rather than a lone point
        xs = [x(0.0), x(t_end)]
        rates = rates * 2
    else:
        xs = [x((a + b) / 2) for a, b, _, _ in buckets]
    ok_pts = [f"{px:.1f},{y(r[0]):.1f}" for px, r in zip(xs, rates)]
    tot_pts = [f"{px:.1f},{y(r[1]):.1f}" for px, r in zip(xs, rates)]
    base = [f"{xs[-1]:.1f},{y(0):.1f}", f"{xs[0]:.1f},{y(0):.1f}"]
    body = []
    for v in yticks:
        body.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="{GRID_COLOUR}"/>')
        body.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{_e(_fmt(v))}</text>')
    for t in xticks:
        body.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#999"/>')
        body.append(f'<text x="{x(t):.1f}" y="{top + ph + 17}" text-anchor="middle">{_e(_fmt(t / div))}</text>')
    body.append(
        f'<polygon class="area-ok" points="{" ".join(ok_pts + base)}" fill="{OK_COLOUR}" fill-opacity="0.35"/>'
        f'<polygon class="area-error" points="{" ".join(tot_pts + ok_pts[::-1])}" fill="{ERROR_COLOUR}" fill-opacity="0.6"/>'
        f'<polyline class="line-ok" points="{" ".join(ok_pts)}" fill="none" stroke="{OK_COLOUR}" stroke-width="1.5"/>'
        f'<polyline class="line-total" points="{" ".join(tot_pts)}" fill="none" stroke="{TOTAL_COLOUR}" '
        f'stroke-width="1.6" stroke-linejoin="round"/>'
        f'<line class="mean" x1="{left}" x2="{left + pw}" y1="{y(mean):.1f}" y2="{y(mean):.1f}" '
        f'stroke="{TOTAL_COLOUR}" stroke-dasharray="4 4" stroke-opacity="0.7"/>'
        f'<text x="{left + pw - 4}" y="{y(mean) - 5:.1f}" text-anchor="end">mean {_e(_fmt(mean))} rows/s</text>'
        f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" stroke="#999"/>'
        f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + ph}" stroke="#999"/>'
    )
    for (a, b, ok, err), (_, total) in zip(buckets, rates):  # invisible hover targets
        body.append(
            f'<rect x="{x(a):.1f}" y="{top}" width="{max(x(b) - x(a), 0.5):.1f}" height="{ph}" fill="transparent">'
            f"<title>{_e(_fmt(a))}–{_e(_fmt(b))} s: {ok} ok, {err} error, {_e(_fmt(total))} rows/s</title></rect>"
        )
    body.append(
        f'<text class="axis-title" x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">'
        f"time since the run started ({unit})</text>"
        f'<text class="axis-title" transform="translate(14,{top + ph / 2}) rotate(-90)" text-anchor="middle">'
        f"rows per second</text>"
    )
    legend = [("ok", OK_COLOUR, "0.6"), ("error", ERROR_COLOUR, "0.8")]
    lx = left
    for name, colour, opacity in legend:
        body.append(
            f'<rect x="{lx}" y="8" width="12" height="12" rx="2" fill="{colour}" fill-opacity="{opacity}"/>'
            f'<text x="{lx + 17}" y="18">{name}</text>'
        )
        lx += 70
    body.append(
        f'<line x1="{lx}" x2="{lx + 16}" y1="14" y2="14" stroke="{TOTAL_COLOUR}" stroke-width="1.6"/>'
        f'<text x="{lx + 21}" y="18">total</text>'
    )
    return _svg(width, height, body, "rows per second over the run")


def _bar_chart(
    items: Sequence[tuple[str, float]],
    colour: str,
    axis_title: str,
    value_text: Callable[[float], str],
    name: str,
    width: int = 580,
) -> str:
    """Horizontal bars with the value written at the end of each: easier to read than a table.
    ``value_text(value)`` is the label shown beside a bar (escaped here, like the names)."""
    row, bar = 28, 18
    label_chars = min(max(len(label) for label, _ in items), 28)
    left = 12 + int(label_chars * 6.8)
    # The value is written after the bar's end: the right margin holds the longest one, so a bar
    # at full width keeps its whole label ("1,473 ms (96%)" was cut at a fixed 86 px).
    value_chars = max(len(value_text(v)) for _, v in items)
    right, top = 6 + 8 + int(math.ceil(value_chars * VALUE_CHAR_PX)), 6
    pw = max(width - left - right, 60)
    ph = row * len(items)
    height = top + ph + 40
    ticks = _ticks(max(v for _, v in items) or 1.0, 4)
    vmax = ticks[-1]

    def x(v: float) -> float:
        return left + pw * v / vmax

    body = []
    for t in ticks:
        body.append(
            f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{top}" y2="{top + ph}" stroke="{GRID_COLOUR}"/>'
            f'<text x="{x(t):.1f}" y="{top + ph + 15}" text-anchor="middle">{_e(_fmt(t))}</text>'
        )
    for i, (label, value) in enumerate(items):
        cy = top + i * row + row / 2
        shown = label if len(label) <= 28 else label[:27] + "…"
        w = pw * value / vmax
        body.append(
            f'<text class="label" x="{left - 8}" y="{cy + 4:.1f}" text-anchor="end">{_e(shown)}</text>'
            f'<rect class="bar" x="{left}" y="{cy - bar / 2:.1f}" width="{w:.2f}" height="{bar}" rx="2" '
            f'fill="{colour}"><title>{_e(label)}: {_e(value_text(value))}</title></rect>'
            f'<text class="val" x="{left + w + 6:.1f}" y="{cy + 4:.1f}">{_e(value_text(value))}</text>'
        )
    body.append(
        f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + ph}" stroke="#999"/>'
        f'<text class="axis-title" x="{left + pw / 2:.1f}" y="{height - 6}" text-anchor="middle">{_e(axis_title)}</text>'
    )
    return _svg(width, height, body, name)


def _stage_items(summary: dict[str, Any]) -> list[tuple[str, float]]:
    """ms per row of each stage, pipeline stages first; derived from ``stage_ms`` when an older
    summary has no ``stage_ms_per_row``."""
    per_row = summary.get("stage_ms_per_row")
    if not isinstance(per_row, dict) or not per_row:
        totals, n = summary.get("stage_ms"), _num(summary.get("rows_processed"))
        if not isinstance(totals, dict) or n <= 0:
            return []
        per_row = {k: _num(v) / n for k, v in totals.items()}
    names = [s for s in STAGES if s in per_row] + sorted(str(k) for k in per_row if k not in STAGES)
    return [(name, max(0.0, _num(per_row.get(name)))) for name in names]


def _error_items(summary: dict[str, Any]) -> list[tuple[str, float]]:
    """Error types by count, most frequent first (ties by name); a long tail becomes one bar."""
    by_type = summary.get("by_error_type")
    if not isinstance(by_type, dict):
        return []
    items = sorted(((str(k), _num(v)) for k, v in by_type.items() if _num(v) > 0), key=lambda kv: (-kv[1], kv[0]))
    if len(items) > MAX_BARS:
        rest = items[MAX_BARS - 1:]
        items = items[: MAX_BARS - 1] + [(f"other ({len(rest)} types)", sum(v for _, v in rest))]
    return items


def _share(value: float, total: float) -> str:
    """A percentage that never shows a non-zero stage as 0%."""
    pct = 100 * value / total if total > 0 else 0.0
    return "<1%" if 0 < pct < 0.5 else f"{pct:.0f}%"


def _card(title: str, sub: str, content: str, wide: bool = False) -> str:
    cls = "card wide" if wide else "card"
    sub_html = f'<span class="sub">{_e(sub)}</span>' if sub else ""
    return f'<figure class="{cls}"><figcaption>{_e(title)}{sub_html}</figcaption>{content}</figure>'



def _charts(summary: dict[str, Any]) -> str:
    """The three charts above the contact sheet; a chart without data says so instead."""
    buckets, bucket_s = _timeline(summary)
    if buckets:
        rows = sum(ok + err for _, _, ok, err in buckets)
        peak = max((ok + err) / (b - a) for a, b, ok, err in buckets)
        sub = f"peak {_fmt(peak)} rows/s · {rows:,} row{'' if rows == 1 else 's'} in {len(buckets)} bucket{'' if len(buckets) == 1 else 's'} of {_fmt(buckets[0][1] - buckets[0][0])} s"
        rate = _card("Rows per second over the run", sub, _line_chart(buckets), wide=True)
    else:
        rate = _card("Rows per second over the run", "", '<div class="nodata">no timeline in this summary</div>', True)
    stages = _stage_items(summary)
    if stages and any(v > 0 for _, v in stages):
        total = sum(v for _, v in stages)
        chart = _bar_chart(
            stages, STAGE_COLOUR, "milliseconds per row",
            lambda v: f"{_fmt(v)} ms ({_share(v, total)})", "time per stage per row",
        )
        stage = _card("Time per stage per row", f"{_fmt(total)} ms per row in all", chart)
    else:
        stage = _card("Time per stage per row", "", '<div class="nodata">no stage timings</div>')
    errors = _error_items(summary)
    if errors:
        n = int(sum(v for _, v in errors))
        err = _card("Errors by type", f"{n:,} error rows", _bar_chart(
            errors, ERROR_COLOUR, "rows", lambda v: f"{v:,.0f}", "errors by type"
        ))
    else:
        err = _card("Errors by type", "", '<div class="nodata">no errors</div>')
    return f'<section class="charts">{rate}{stage}{err}</section>'


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
    """The HTML page: summary and charts on top, then one table row per record (inputs, output, text)."""
    by_type = summary.get("by_error_type")
    by_type = by_type if isinstance(by_type, dict) else {}
    errs = ", ".join(f"{_e(k)}: {int(_num(v))}" for k, v in sorted(by_type.items(), key=lambda kv: str(kv[0])))
    by_status = summary.get("by_status")
    by_status = by_status if isinstance(by_status, dict) else {}
    status = "FAILED" if not summary.get("ok", True) else "succeeded"
    head = (
        f"<h1>step1x-batch run {_e(summary.get('run_id'))} ({status})</h1>"
        f'<div class="sum">'
        f"{_rows(int(_num(summary.get('rows_processed'))))} processed: "
        f"{int(_num(by_status.get('ok')))} ok, "
        f"{int(_num(by_status.get('error')))} error ({errs or 'none'}); "
        f"{int(_num(summary.get('rows_skipped')))} skipped as already done; "
        f"{_num(summary.get('wall_s')):.1f} s, {_e(format_rate(_num(summary.get('rows_per_s'))))} rows/s.<br>"
        f"Output: {_e(summary.get('output_uri'))}<br>"
        f"Showing {len(rows)} rows, errors first.</div>"
    )
    head += _charts(summary)
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
