"""``runs/<run_id>/report.html``: a contact sheet of input / output thumbnails, errors first; and
``scores/<run_id>/report.html``: the judge's scores (histograms, scores by category, means with
bootstrap intervals, a worst-first contact sheet), also appended to the edit report when the root
holds scores.

People would rather look than read. One self-contained HTML file (thumbnails are small base64
JPEG data URIs, no external assets), at most ``runtime.report_max_rows`` rows. Every piece of text
that came from a manifest, a log or an exception is passed through :func:`html.escape`: an
instruction such as ``<script>...`` shows as text and never runs. A judge's raw answer, reason and
error message are also redacted (a hostile or careless endpoint may echo a key).
"""

from __future__ import annotations

import base64
import html
import io
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from step1x_batch.errors import redact
from step1x_batch.job.console import format_rate, plural
from step1x_batch.io.storage import StorageOptions, join_uri, read_bytes, write_bytes
from step1x_batch.job.inspection import scores_by_judge, scores_of_edits
from step1x_batch.judge.scores import current_edits as score_current_edits
from step1x_batch.judge.scores import current_scores, mean_interval, score_dir, score_part_uris, summarize
from step1x_batch.rows.log import read_logs

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
h2{font-size:1.15em;margin:1.6em 0 .3em} section.scores{margin-top:1.5em}
td.scores{width:11em;white-space:nowrap} td.scores .o{font-size:1.25em;font-weight:600}
.reason{white-space:pre-wrap;word-break:break-word;max-width:40em;color:#333;font-size:.9em;margin:.3em 0}
pre.raw{white-space:pre-wrap;word-break:break-all;max-width:48em;max-height:12em;overflow:auto;background:#f6f6f6;
border:1px solid #e3e3e3;padding:6px;margin:.2em 0;font-size:.8em}
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
    *,
    top_value: float | None = None,
    whiskers: Sequence[tuple[float, float]] | None = None,
    texts: Sequence[str] | None = None,
    counts: bool = False,
) -> str:
    """Horizontal bars with the value written at the end of each: easier to read than a table.
    ``value_text(value)`` is the label shown beside a bar (escaped here, like the names), or
    ``texts[i]`` when given; ``top_value`` fixes the axis' end (scores: 10); ``whiskers`` are
    (low, high) intervals drawn across the bars' ends (means with their 95 % intervals);
    ``counts``: whole-number ticks only."""
    row, bar = 28, 18
    texts = list(texts) if texts is not None else [value_text(v) for _, v in items]
    label_chars = min(max(len(label) for label, _ in items), 28)
    left = 12 + int(label_chars * 7.4)  # DejaVu Sans, the headless default: ~7 px a letter
    # The value is written after the bar's end: the right margin holds the longest one, so a bar
    # at full width keeps its whole label ("1,473 ms (96%)" was cut at a fixed 86 px).
    value_chars = max(len(t) for t in texts)
    right, top = 6 + 8 + int(math.ceil(value_chars * VALUE_CHAR_PX)), 6
    pw = max(width - left - right, 60)
    ph = row * len(items)
    height = top + ph + 40
    highest = max([v for _, v in items] + [hi for _, hi in whiskers or ()])
    ticks = _ticks(top_value, 5) if top_value else _count_ticks(highest) if counts else _ticks(highest or 1.0, 4)
    vmax = max(ticks[-1], highest)

    def x(v: float) -> float:
        return left + pw * v / vmax

    body = []
    for t in ticks:
        body.append(
            f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{top}" y2="{top + ph}" stroke="{GRID_COLOUR}"/>'
            f'<text x="{x(t):.1f}" y="{top + ph + 15}" text-anchor="middle">{_e(_fmt(t))}</text>'
        )
    for i, ((label, value), text) in enumerate(zip(items, texts)):
        cy = top + i * row + row / 2
        shown = label if len(label) <= 28 else label[:27] + "…"
        w = pw * value / vmax
        end = w
        body.append(
            f'<text class="label" x="{left - 8}" y="{cy + 4:.1f}" text-anchor="end">{_e(shown)}</text>'
            f'<rect class="bar" x="{left}" y="{cy - bar / 2:.1f}" width="{w:.2f}" height="{bar}" rx="2" '
            f'fill="{colour}"><title>{_e(label)}: {_e(text)}</title></rect>'
        )
        if whiskers is not None:
            lo, hi = (left + pw * v / vmax for v in whiskers[i])
            end = max(end, hi - left)
            body.append(
                f'<path class="ci" d="M{lo:.1f},{cy:.1f}H{hi:.1f}M{lo:.1f},{cy - 5:.1f}V{cy + 5:.1f}'
                f'M{hi:.1f},{cy - 5:.1f}V{cy + 5:.1f}" stroke="{TOTAL_COLOUR}" stroke-width="1.4" fill="none"/>'
            )
        body.append(f'<text class="val" x="{left + end + 6:.1f}" y="{cy + 4:.1f}">{_e(text)}</text>')
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


def _adapter_sets_html(summary: dict[str, Any]) -> str:
    """Rows and edit time per adapter set, and how often the actors switched (model.adapter_sets)."""
    sets = summary.get("adapter_sets")
    if not isinstance(sets, dict) or not sets:
        return ""
    rows = "".join(f"<tr><td>{_e(name or '(base model)')}</td><td>{int(_num(v.get('rows')))}</td>"
                   f"<td>{_num(v.get('edit_s')):.1f} s</td></tr>" for name, v in sets.items() if isinstance(v, dict))
    return (f'<div class="sum">Adapter sets: {int(_num(summary.get("adapter_switches")))} switches '
            f'({_num(summary.get("adapter_switch_s")):.2f} s switching)</div>'
            f"<table><tr><th>set</th><th>rows</th><th>edit time</th></tr>{rows}</table>")


def render_report(
    summary: dict[str, Any],
    rows: Sequence[dict[str, Any]],
    thumbs: Sequence[tuple[Sequence[str | None], str | None]],
    scores_html: str = "",
) -> str:
    """The HTML page: summary and charts on top, then one table row per record (inputs, output,
    text); then ``scores_html`` (:func:`scores_sections`) when the root holds scores."""
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
        f"Showing {len(rows)} rows, errors first."
        + (' The judge\'s scores are <a href="#scores-1">below the rows</a>.' if scores_html else "")
        + "</div>"
    )
    head += _adapter_sets_html(summary) + _charts(summary)
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
        f"<body>{head}{''.join(body)}{scores_html}</body></html>\n"
    )


def write_report(
    summary: dict[str, Any],
    rows: Sequence[dict[str, Any]],
    uri: str,
    *,
    input_storage: StorageOptions | None,
    output_storage: StorageOptions | None,
    max_pixels: int,
    scores_root: str | None = None,
    max_score_rows: int = 60,
) -> str:
    """Fetch thumbnails for ``rows`` (every input and the output, in parallel) and write the
    report to ``uri``; ``summary`` is the run's summary as written to ``summary.json``. With
    ``scores_root`` (the job's output URI) and scores under it, the page ends with a section per
    judge on the root's current edits (at most ``max_score_rows`` rows each)."""

    def thumbs(rec: dict[str, Any]) -> tuple[list[str | None], str | None]:
        uris = rec.get("image_uris") or [rec.get("image_uri")]
        inputs = [_fetch(u, input_storage, max_pixels) for u in uris]
        return inputs, _fetch(rec.get("output_uri"), output_storage, max_pixels)

    with ThreadPoolExecutor(8) as pool:
        pictures = list(pool.map(thumbs, rows))
    scores_html = _root_scores_html(scores_root, output_storage, input_storage, max_pixels, max_score_rows)
    write_bytes(uri, render_report(summary, rows, pictures, scores_html).encode("utf-8"), output_storage)
    return uri


def _root_scores_html(root: str | None, storage: StorageOptions | None, input_storage: StorageOptions | None,
                      max_pixels: int, max_rows: int) -> str:
    """The scores sections of the edit report ("" when the root holds no scores); a failure to
    read them is a line on the page, never a lost report."""
    if not root or not score_part_uris(root, storage):
        return ""
    try:
        return scores_sections(root, storage, root_scores(root, storage), input_storage=input_storage,
                               max_pixels=max_pixels, max_rows=max_rows)
    except Exception as e:  # noqa: BLE001 - the report is for people; the rows above still matter
        return f'<section class="scores" id="scores-1"><h2>Scores</h2><div class="nodata">could not read ' \
               f"the scores: {_e(redact(f'{type(e).__name__}: {e}'))}</div></section>"


# ---------------------------------------------------------------------------------------------
# Scores: ``scores/<run_id>/report.html``, and a section of the edit report when the root holds scores

SCORE_AXES = (("score_sc", "SC", "semantic consistency"), ("score_pq", "PQ", "perceptual quality"),
              ("score_o", "O", "overall √(SC·PQ)"))
SCORE_COLOUR = "#7b6cb5"  # muted violet for the judge's scores
MAX_CATEGORIES = 24  # more categories than this: the best ones are pooled into one "other" bar
_PREFERENCE_RANK = {"B": 0, "tie": 1, "A": 2}  # pairwise, worst first: this root's edit lost
_EDIT_COLUMNS = ["id", "fingerprint", "status", "image_uri", "image_uris", "output_uri", "finished_at"]


def _count_ticks(top: float) -> list[float]:
    """Axis ticks for counts: whole numbers only."""
    step = max(1, math.ceil(_ticks(max(top, 1.0), 4)[1]))
    return [float(i * step) for i in range(math.ceil(max(top, 1.0) / step) + 1)]


def _histogram(bins: Sequence[tuple[str, int]], ticks: Sequence[tuple[float, str]], colour: str,
               axis_title: str, name: str, width: int = 560, height: int = 230) -> str:
    """Vertical bars of equal-width bins (``bins``: the tooltip's name and the count of each);
    ``ticks`` are (position counted in bins from the first bin's left edge, text) under the axis."""
    left, right, top, bottom = 46, 24, 20, 44  # the right margin holds half of a "100%" tick label
    pw, ph = width - left - right, height - top - bottom
    yticks = _count_ticks(max(c for _, c in bins))
    ymax, bw = yticks[-1], pw / len(bins)

    def y(v: float) -> float:
        return top + ph - ph * v / ymax

    body = []
    for v in yticks:
        body.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="{GRID_COLOUR}"/>'
                    f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{_e(_fmt(v))}</text>')
    for i, (label, count) in enumerate(bins):
        x = left + i * bw
        body.append(f'<rect class="bar" x="{x + 1:.1f}" y="{y(count):.1f}" width="{max(bw - 2, 1):.1f}" '
                    f'height="{ph * count / ymax:.1f}" fill="{colour}"><title>{_e(label)}: '
                    f'{_e(_rows(count))}</title></rect>')
        if count:
            body.append(f'<text class="val" x="{x + bw / 2:.1f}" y="{y(count) - 4:.1f}" '
                        f'text-anchor="middle">{count:,}</text>')
    for pos, text in ticks:
        x = left + pos * bw
        body.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#999"/>'
                    f'<text x="{x:.1f}" y="{top + ph + 17}" text-anchor="middle">{_e(text)}</text>')
    body.append(
        f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" stroke="#999"/>'
        f'<text class="axis-title" x="{left + pw / 2:.1f}" y="{height - 6}" text-anchor="middle">{_e(axis_title)}</text>'
        f'<text class="axis-title" transform="translate(13,{top + ph / 2:.1f}) rotate(-90)" '
        f'text-anchor="middle">rows</text>'
    )
    return _svg(width, height, body, name)


def score_histogram(values: Sequence[float]) -> list[int]:
    """Counts of 0-10 scores in 11 bins of width 1 centred on the whole scores (VIEScore answers
    whole numbers; O = √(SC·PQ) falls in the bin of the whole number it rounds to)."""
    counts, _ = np.histogram(np.clip(np.asarray(values, dtype=np.float64), 0, 10), bins=np.arange(-0.5, 11.0, 1.0))
    return [int(c) for c in counts]


def changed_histogram(values: Sequence[float]) -> list[int]:
    """Counts of changed-pixel fractions in 10 bins of 10 % (the first holds the unchanged outputs)."""
    counts, _ = np.histogram(np.clip(np.asarray(values, dtype=np.float64), 0, 1), bins=np.linspace(0, 1, 11))
    return [int(c) for c in counts]


def _ok(scores: pa.Table) -> pa.Table:
    return scores.filter(pc.fill_null(pc.equal(scores.column("status"), "ok"), False)) if scores.num_rows else scores


def _values(table: pa.Table, name: str) -> list[float]:
    return [v for v in table.column(name).to_pylist() if v is not None and math.isfinite(v)]


def _changed(table: pa.Table) -> list[float]:
    metrics = table.column("metrics").to_pylist() if table.num_rows else []
    return [m["changed_fraction"] for m in metrics if m and m.get("changed_fraction") is not None]


def _histogram_cards(ok: pa.Table, pairwise: bool) -> list[str]:
    """One histogram per score (SC, PQ, O on 0-10) and one of the changed-pixel fraction; a judge
    that gives no scores (pairwise, metrics only) gets one card saying why instead of three."""
    cards = []
    score_ticks = [(i + 0.5, str(i)) for i in range(11)]
    if not any(_values(ok, name) for name, _, _ in SCORE_AXES):
        why = ("a pairwise judge answers which edit is better, not scores" if pairwise
               else "a metrics-only judge asks no VLM" if ok.num_rows else "no row was scored")
        cards.append(_card("SC, PQ and O", "", f'<div class="nodata">no scores: {why}</div>'))
    for name, label, meaning in SCORE_AXES:
        values = _values(ok, name)
        title = f"{label}: {meaning}"
        if not values:
            continue
        bins = [(f"{label} in [{i - 0.5:g}, {i + 0.5:g})", c) for i, c in enumerate(score_histogram(values))]
        chart = _histogram(bins, score_ticks, SCORE_COLOUR, f"{label} (0-10, bins of 1)", f"histogram of {label}")
        cards.append(_card(title, f"{_rows(len(values))}, mean {_fmt(float(np.mean(values)))}", chart))
    changed = _changed(ok)
    if changed:
        bins = [(f"changed {10 * i}-{10 * i + 10} %", c) for i, c in enumerate(changed_histogram(changed))]
        ticks = [(float(i), f"{10 * i}%") for i in range(0, 11, 2)]
        chart = _histogram(bins, ticks, OK_COLOUR, "share of the output's pixels that moved (bins of 10 %)",
                           "histogram of the changed fraction")
        unchanged = sum(1 for m in ok.column("metrics").to_pylist() if m and m.get("unchanged"))
        cards.append(_card("Changed fraction", f"{unchanged:,} of {len(changed):,} outputs unchanged", chart))
    else:
        cards.append(_card("Changed fraction", "", '<div class="nodata">no image metrics</div>'))
    return cards


def category_means(scores: pa.Table, name: str = "score_o", resamples: int = 1000,
                   seed: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """(category, mean of ``name`` with its bootstrap 95 % interval and count) over the ok records
    of each category, lowest mean first (ties by name); no category counts as ``(none)``."""
    ok = _ok(scores)
    groups: dict[str, list[float]] = {}
    for cat, v in zip(ok.column("category").to_pylist(), ok.column(name).to_pylist()):
        if v is not None and math.isfinite(v):
            groups.setdefault("(none)" if cat is None else str(cat), []).append(v)
    rng = np.random.default_rng(seed)
    out = [(cat, mean_interval(np.array(groups[cat]), rng, resamples)) for cat in sorted(groups)]
    return sorted(out, key=lambda kv: (kv[1]["mean"], kv[0]))


def _interval_text(m: dict[str, Any]) -> str:
    return f"{m['mean']:.2f} [{m['low']:.2f}, {m['high']:.2f}] · n {m['n']:,}"


def _category_card(scores: pa.Table) -> str:
    """Mean O by category with its interval and count, lowest first (a long tail pooled)."""
    means = category_means(scores)
    if not means:
        return ""
    if len(means) > MAX_CATEGORIES:
        rest = means[MAX_CATEGORIES - 1:]
        ok = _ok(scores)
        names = {c for c, _ in rest}
        pooled = [v for c, v in zip(ok.column("category").to_pylist(), ok.column("score_o").to_pylist())
                  if v is not None and ("(none)" if c is None else str(c)) in names]
        pool = mean_interval(np.array(pooled), np.random.default_rng(0))
        means = means[:MAX_CATEGORIES - 1] + [(f"other ({len(rest)} categories)", pool)]
    chart = _bar_chart([(c, m["mean"]) for c, m in means], SCORE_COLOUR, "mean O (0-10), 95 % interval",
                       _fmt, "mean O by category", top_value=10.0,
                       whiskers=[(m["low"], m["high"]) for _, m in means], texts=[_interval_text(m) for _, m in means])
    return _card("O by category", f"{len(means)} categor{'y' if len(means) == 1 else 'ies'}, lowest mean first",
                 chart)


def _summary_cards(stats: dict[str, Any], scores: pa.Table) -> list[str]:
    """Means with intervals, score errors by type, and pairwise preference counts when set."""
    cards = []
    means = [(label, stats[name]) for name, label, _ in SCORE_AXES if isinstance(stats.get(name), dict)]
    if means:
        chart = _bar_chart([(label, m["mean"]) for label, m in means], SCORE_COLOUR,
                           "mean (0-10), bootstrap 95 % interval", _fmt, "mean scores", top_value=10.0,
                           whiskers=[(m["low"], m["high"]) for _, m in means],
                           texts=[_interval_text(m) for _, m in means])
        cards.append(_card("Mean scores", "over the ok rows", chart))
    errors = _error_items({"by_error_type": stats.get("errors")})
    if errors:
        n = int(sum(v for _, v in errors))
        cards.append(_card("Score errors by type", f"{n:,} rows", _bar_chart(
            errors, ERROR_COLOUR, "rows", lambda v: f"{v:,.0f}", "score errors by type", counts=True)))
    else:
        cards.append(_card("Score errors by type", "", '<div class="nodata">no score errors</div>'))
    pref = stats.get("preference")
    if isinstance(pref, dict):
        axes = sorted({a for a in scores.column("axis").to_pylist() if a})
        items = [("A: this output", _num(pref.get("A"))), ("B: the other output", _num(pref.get("B"))),
                 ("tie", _num(pref.get("tie")))]
        cards.append(_card("Pairwise preference", f"axis {', '.join(axes) or '-'}", _bar_chart(
            items, OK_COLOUR, "rows", lambda v: f"{v:,.0f}", "pairwise preference", counts=True)))
    return cards


def worst_first(scores: pa.Table, limit: int) -> list[dict[str, Any]]:
    """At most ``limit`` score records, worst first: score errors (by type, then id), then the
    lowest O; pairwise, the rows this root's edit lost before ties and wins; without O (the
    metrics-only judge), the least changed outputs first (returning the input is the commonest
    failure of an editing model). Ties by id."""
    if scores.num_rows == 0 or limit <= 0:
        return []
    is_ok = pc.fill_null(pc.equal(scores.column("status"), "ok"), False)
    errors, ok = scores.filter(pc.invert(is_ok)), scores.filter(is_ok)
    out: list[dict[str, Any]] = []
    if errors.num_rows:
        order = pc.sort_indices(errors, sort_keys=[("error_type", "ascending"), ("id", "ascending")])
        out = errors.take(order).slice(0, limit).to_pylist()
    room = limit - len(out)
    if room > 0 and ok.num_rows:
        rank = pa.array([_PREFERENCE_RANK.get(p, 3) for p in ok.column("preference").to_pylist()], pa.int8())
        missing = float("inf")  # a record without O / a changed fraction sorts after those with one
        keys = pa.table({"o": pc.fill_null(ok.column("score_o"), missing), "rank": rank,
                         "changed": pc.fill_null(pc.struct_field(ok.column("metrics"), "changed_fraction"), missing),
                         "id": ok.column("id")})
        order = pc.sort_indices(keys, sort_keys=[("o", "ascending"), ("rank", "ascending"), ("changed", "ascending"),
                                                 ("id", "ascending")])
        out += ok.take(order.slice(0, room)).to_pylist()
    return out


def _score_cell(rec: dict[str, Any]) -> str:
    """The scores of one record: O large, SC / PQ and sub-scores, preference, the metrics."""
    parts = [] if rec.get("status") == "ok" else ['<div class="code">no score</div>']
    if rec.get("score_o") is not None:
        parts.append(f'<div class="o">O {_e(_fmt(rec["score_o"]))}</div>')
    sc_pq = [f"{label} {_e(_fmt(rec[name]))}" for name, label, _ in SCORE_AXES[:2] if rec.get(name) is not None]
    if sc_pq:
        parts.append(f"<div>{' &middot; '.join(sc_pq)}</div>")
    subs = rec.get("sub_scores") or {}
    sub = [f"{k.upper()} [{', '.join(_fmt(v) for v in subs[k])}]" for k in ("sc", "pq") if subs.get(k)]
    if sub:
        parts.append(f'<div class="meta">sub-scores {_e(" ".join(sub))}</div>')
    if rec.get("preference"):
        parts.append(f'<div class="o">prefers {_e(rec["preference"])}</div>'
                     f'<div class="meta">axis {_e(rec.get("axis"))}</div>')
    m = rec.get("metrics") or {}
    if m.get("changed_fraction") is not None:
        flag = ' <span class="code">unchanged</span>' if m.get("unchanged") else ""
        parts.append(f'<div class="meta">changed {100 * m["changed_fraction"]:.1f}%{flag}</div>')
    if m.get("psnr") is not None and m.get("ssim") is not None:
        parts.append(f'<div class="meta">PSNR {m["psnr"]:.1f} dB &middot; SSIM {m["ssim"]:.3f}</div>')
    if m.get("size_ok") is False:
        parts.append(f'<div class="meta"><span class="code">size off</span> {_e(m.get("width"))}x'
                     f'{_e(m.get("height"))}</div>')
    return "".join(parts) or '<div class="meta">-</div>'


def _score_text(rec: dict[str, Any]) -> str:
    """Instruction, the judge's reason or error (type, message, raw answer), the row's identity."""
    text = [f'<div class="instr">{_e(rec.get("instruction"))}</div>']
    if rec.get("status") != "ok":
        text.append(f'<div><span class="code">{_e(rec.get("error_type"))}</span> '
                    f'{_e(redact(rec.get("error_message") or ""))}</div>')
        if rec.get("judge_raw"):
            text.append(f'<div class="meta">raw answer:</div><pre class="raw">{_e(redact(rec["judge_raw"]))}</pre>')
    elif rec.get("judge_reason"):
        text.append(f'<div class="reason">{_e(redact(rec["judge_reason"]))}</div>')
    meta = f"id {_e(rec.get('id'))}"
    if rec.get("category"):
        meta += f" &middot; category {_e(rec['category'])}"
    meta += f" &middot; fingerprint {_e((rec.get('fingerprint') or '')[:12])}"
    text.append(f'<div class="meta">{meta}<br>{_e(rec.get("output_uri"))}</div>')
    return "".join(text)


def _score_sheet(rows: Sequence[dict[str, Any]], thumbs: Sequence[tuple[Sequence[str | None], str | None, str | None]],
                 pairwise: bool) -> str:
    """The worst-first contact sheet: inputs, the edit (and the other edit, pairwise), scores, text."""
    other = "<th>other (B)</th>" if pairwise else ""
    body = [f'<table class="sheet"><tr><th>input</th><th>output</th>{other}<th>scores</th><th>row</th></tr>']
    for rec, (tins, tout, tother) in zip(rows, thumbs):
        err = rec.get("status") != "ok"
        b = f'<td class="img">{_img(tother, "other edit unreadable")}</td>' if pairwise else ""
        body.append(
            f'<tr class="{"error" if err else "ok"}"><td class="img">{_inputs(tins)}</td>'
            f'<td class="img">{_img(tout, "output unreadable")}</td>{b}'
            f'<td class="scores">{_score_cell(rec)}</td><td>{_score_text(rec)}</td></tr>'
        )
    body.append("</table>")
    return "".join(body)


def _means_text(stats: dict[str, Any]) -> str:
    """``Means (...): SC ... · PQ ... · O ...<br>`` and the unchanged share, as far as they exist."""
    means = [f"{label} {_interval_text(stats[name])}" for name, label, _ in SCORE_AXES if isinstance(stats.get(name), dict)]
    text = f"Means (bootstrap 95 % intervals): {' &middot; '.join(_e(m) for m in means)}.<br>" if means else ""
    share = stats.get("unchanged_share")
    if share is not None:
        text += f"Unchanged outputs: {100 * _num(share):.0f}%.<br>"
    return text


def _order_text(scores: pa.Table, pairwise: bool) -> str:
    """How :func:`worst_first` ordered the ok rows of this judge, in words."""
    if pairwise:
        return "the rows whose edit lost (B), then ties"
    if scores.num_rows and pc.any(pc.is_valid(scores.column("score_o"))).as_py():
        return "the lowest O"
    return "the least changed outputs"


def render_scores_section(scores: pa.Table, stats: dict[str, Any], rows: Sequence[dict[str, Any]],
                          thumbs: Sequence[tuple[Sequence[str | None], str | None, str | None]],
                          anchor: str = "scores") -> str:
    """One judge's scores as an HTML section: judge id and prompt hash, counts, means with
    bootstrap 95 % intervals; charts (means, histograms, O by category, errors, preference);
    then the worst-first contact sheet of ``rows`` (:func:`worst_first`) with their ``thumbs``
    (inputs, output, other edit)."""
    judges = sorted({j for j in scores.column("judge_id").to_pylist() if j}) if scores.num_rows else []
    hashes = sorted({h for h in scores.column("prompt_hash").to_pylist() if h}) if scores.num_rows else []
    errors = stats.get("errors") if isinstance(stats.get("errors"), dict) else {}
    errs = ", ".join(f"{_e(k)}: {int(_num(v))}" for k, v in sorted(errors.items(), key=lambda kv: str(kv[0])))
    pairwise = scores.num_rows > 0 and any(scores.column("preference").to_pylist())
    head = (
        f'<section class="scores" id="{_e(anchor)}"><h2>Scores by {_e(", ".join(judges) or "no judge")}</h2>'
        f'<div class="sum">judge {_e(", ".join(judges) or "-")} &middot; prompt hash {_e(", ".join(hashes) or "-")}<br>'
        f"{_rows(int(_num(stats.get('rows'))))} scored: {int(_num(stats.get('ok')))} ok, "
        f"{int(sum(_num(v) for v in errors.values()))} score errors ({errs or 'none'}).<br>"
        f"{_means_text(stats)}"
        f"Showing {len(rows)} rows, worst first: score errors, then {_order_text(scores, pairwise)}.</div>"
    )
    ok = _ok(scores)
    cards = _summary_cards(stats, scores) + _histogram_cards(ok, pairwise) + [_category_card(scores)]
    return f'{head}<div class="charts">{"".join(cards)}</div>{_score_sheet(rows, thumbs, pairwise)}</section>'


def current_edits(output_uri: str, storage: StorageOptions | None) -> pa.Table:
    """Each id's current edit (its latest ``ok`` log record): id, fingerprint, inputs, output."""
    return score_current_edits(output_uri, storage, _EDIT_COLUMNS)


def root_scores(output_uri: str, storage: StorageOptions | None) -> pa.Table:
    """The deciding score records of the root's current edits (every judge; an id's older edit's
    scores left out): what the edit report shows when the root holds scores."""
    edits = current_edits(output_uri, storage)
    return scores_of_edits(current_scores(output_uri, storage), edits.column("id"), edits.column("fingerprint"))


def _edit_uris(root: str, storage: StorageOptions | None, ids: set[str]) -> dict[tuple[str, str], dict[str, Any]]:
    """(id, fingerprint) -> the ok log record of that edit, for ``ids`` only."""
    if not ids:
        return {}
    logs = _ok(read_logs(root, storage, columns=_EDIT_COLUMNS))
    if logs.num_rows:
        logs = logs.filter(pc.is_in(logs.column("id"), value_set=pa.array(sorted(ids), pa.string())))
    return {(r["id"], r["fingerprint"]): r for r in logs.to_pylist()}


def _score_thumbs(rows: Sequence[dict[str, Any]], output_uri: str, storage: StorageOptions | None,
                  input_storage: StorageOptions | None, max_pixels: int,
                  against: str | None) -> list[tuple[list[str | None], str | None, str | None]]:
    """Thumbnails of each shown record's inputs (from the row log), its edit and, pairwise, the
    other root's edit it was compared with; fetched in parallel."""
    ids = {r["id"] for r in rows if r.get("id")}
    edits = _edit_uris(output_uri, storage, ids)
    others = _edit_uris(against, storage, ids) if against else {}

    def one(rec: dict[str, Any]) -> tuple[list[str | None], str | None, str | None]:
        edit = edits.get((rec.get("id"), rec.get("fingerprint"))) or {}
        uris = edit.get("image_uris") or ([edit["image_uri"]] if edit.get("image_uri") else [])
        other = others.get((rec.get("id"), rec.get("against_fingerprint"))) or {}
        return ([_fetch(u, input_storage, max_pixels) for u in uris],
                _fetch(rec.get("output_uri") or edit.get("output_uri"), storage, max_pixels),
                _fetch(other.get("output_uri"), storage, max_pixels))

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, rows))


def scores_sections(output_uri: str, storage: StorageOptions | None, scores: pa.Table,
                    stats: dict[str, Any] | None = None, *, input_storage: StorageOptions | None,
                    max_pixels: int, max_rows: int, against: str | None = None) -> str:
    """One :func:`render_scores_section` per judge (judge id, prompt hash) in ``scores``, with
    thumbnails; ``stats`` (:func:`summarize`'s dict) is used when ``scores`` holds one judge,
    else each judge's is computed."""
    groups = scores_by_judge(scores)
    out = []
    for i, (_, _, table) in enumerate(groups):
        judged = stats if stats is not None and len(groups) == 1 else summarize(table)
        rows = worst_first(table, max_rows)
        thumbs = _score_thumbs(rows, output_uri, storage, input_storage, max_pixels, against)
        out.append(render_scores_section(table, judged, rows, thumbs, anchor=f"scores-{i + 1}"))
    return "".join(out) or '<div class="nodata">no scores</div>'


def render_score_page(run_id: str, output_uri: str, sections: str) -> str:
    """The whole ``scores/<run_id>/report.html`` page around :func:`scores_sections`."""
    return (
        '<!doctype html><html><head><meta charset="utf-8">'
        f"<title>step1x-batch scores {_e(run_id)}</title><style>{_CSS}</style></head>"
        f"<body><h1>step1x-batch scores {_e(run_id)}</h1>"
        f'<div class="sum">Output: {_e(redact(output_uri))}</div>{sections}</body></html>\n'
    )


def write_score_report(output_uri: str, storage: StorageOptions | None, run_id: str, scores: pa.Table,
                       stats: dict[str, Any] | None = None, *, input_storage: StorageOptions | None,
                       max_pixels: int, max_rows: int = 60, against: str | None = None) -> str:
    """Write ``<output_uri>/scores/<run_id>/report.html`` for ``scores`` (the current score
    records of a scoring run's keys) and return its URI; ``stats`` is the run's
    ``ScoreSummary.stats``; ``against`` is the other root of a pairwise judge (its edits are shown)."""
    uri = join_uri(score_dir(output_uri, run_id), "report.html")
    sections = scores_sections(output_uri, storage, scores, stats, input_storage=input_storage,
                               max_pixels=max_pixels, max_rows=max_rows, against=against)
    write_bytes(uri, render_score_page(run_id, output_uri, sections).encode("utf-8"), storage)
    return uri
