"""The charts of ``report.html``: rows per second over the run, time per stage per row, errors by
type. Each chart is inline SVG; the tests parse it and check that what is drawn is the data (bar
count, order, labels, lengths; line points), that odd or missing summary keys never crash the
page, that data text is escaped inside the SVG, and that the page needs nothing from a network.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from step1x_batch.job import report
from step1x_batch.job.report import array_data_uri, render_report

EVIL = "<script>alert(1)</script>"


def _summary(**extra) -> dict:
    base = {
        "run_id": "r1", "ok": True, "rows_processed": 60, "by_status": {"ok": 50, "error": 10},
        "by_error_type": {"decode_error": 4, EVIL: 1, "input_not_found": 3, "too_many_images": 2},
        "rows_skipped": 0, "wall_s": 30.0, "rows_per_s": 2.0, "output_uri": "/tmp/out",
        "stage_ms": {"normalise": 6.0, "preprocess": 600.0, "edit": 3000.0, "write": 0.0},
        "stage_ms_per_row": {"normalise": 0.1, "preprocess": 10.0, "edit": 50.0, "write": 0.0},
        "timeline": {"bucket_s": 2.0, "ok": [1, 4, 9, 3, 0, 2], "error": [0, 1, 0, 5, 2, 0]},
    }
    base.update(extra)
    return base


def _page(summary: dict, rows=(), thumbs=()) -> str:
    return render_report(summary, list(rows), list(thumbs))


def _svgs(page: str) -> dict[str, ET.Element]:
    """Every inline <svg> of the page, parsed as XML (so it must be well formed), by aria-label."""
    found = {}
    for text in re.findall(r"<svg\b.*?</svg>", page, flags=re.S):
        root = ET.fromstring(text)
        found[root.get("aria-label")] = root
    return found


def _bars(svg: ET.Element) -> list[tuple[str, float, str]]:
    """(label, bar width, value text) of a horizontal bar chart, top to bottom."""
    labels = [t.text for t in svg.iter("text") if t.get("class") == "label"]
    widths = [float(r.get("width")) for r in svg.iter("rect") if r.get("class") == "bar"]
    values = [t.text for t in svg.iter("text") if t.get("class") == "val"]
    assert len(labels) == len(widths) == len(values)
    return list(zip(labels, widths, values))


def _points(svg: ET.Element, cls: str) -> list[tuple[float, float]]:
    (line,) = [e for e in svg.iter("polyline") if e.get("class") == cls]
    return [tuple(map(float, p.split(","))) for p in line.get("points").split()]


def test_error_bars_are_the_error_types_sorted_by_count():
    bars = _bars(_svgs(_page(_summary()))["errors by type"])
    assert [b[0] for b in bars] == ["decode_error", "input_not_found", "too_many_images", EVIL]
    assert [b[2] for b in bars] == ["4", "3", "2", "1"]
    widths = [b[1] for b in bars]
    assert all(w > 0 for w in widths)
    assert [w / widths[0] for w in widths] == pytest.approx([1, 3 / 4, 2 / 4, 1 / 4], rel=1e-3)


def test_ties_sort_by_name_and_a_long_tail_becomes_one_bar():
    types = {f"type_{i:02d}": 1 for i in range(20)} | {"big": 7}
    bars = _bars(_svgs(_page(_summary(by_error_type=types)))["errors by type"])
    assert len(bars) == report.MAX_BARS
    assert bars[0][0] == "big" and bars[1][0] == "type_00" and bars[2][0] == "type_01"
    assert bars[-1][0] == f"other ({21 - report.MAX_BARS + 1} types)"
    assert bars[-1][2] == str(21 - report.MAX_BARS + 1)


def test_error_type_names_are_escaped_inside_the_charts():
    page = _page(_summary())
    assert EVIL not in page and "<script" not in page
    (svg_text,) = [t for t in re.findall(r"<svg\b.*?</svg>", page, flags=re.S) if "errors by type" in t]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in svg_text
    # escaped exactly once: the parsed label is the original name, not "&lt;..." text
    svg = ET.fromstring(svg_text)
    assert EVIL in [t.text for t in svg.iter("text")]
    assert any(EVIL in (t.text or "") for t in svg.iter("title"))


def test_stage_bars_are_proportional_to_ms_per_row_in_pipeline_order():
    per_row = {"write": 5.0, "edit": 80.0, "normalise": 0.0, "preprocess": 20.0}
    bars = _bars(_svgs(_page(_summary(stage_ms_per_row=per_row)))["time per stage per row"])
    assert [b[0] for b in bars] == ["normalise", "preprocess", "edit", "write"]
    widths = {b[0]: b[1] for b in bars}
    assert widths["normalise"] == 0.0  # a stage with 0 ms is shown, with no bar
    scale = widths["edit"] / 80.0
    for name, ms in per_row.items():
        assert widths[name] == pytest.approx(ms * scale, abs=0.02)
    assert [b[2] for b in bars] == ["0 ms (0%)", "20 ms (19%)", "80 ms (76%)", "5 ms (5%)"]


def test_stage_chart_falls_back_to_totals_when_per_row_is_missing():
    summary = _summary(stage_ms_per_row=None, rows_processed=10,
                       stage_ms={"normalise": 10.0, "preprocess": 100.0, "edit": 400.0, "write": 50.0})
    bars = _bars(_svgs(_page(summary))["time per stage per row"])
    assert [(b[0], b[2].split(" ms")[0]) for b in bars] == [
        ("normalise", "1"), ("preprocess", "10"), ("edit", "40"), ("write", "5")]


def test_throughput_line_follows_the_timeline():
    ok, err = [1, 4, 9, 3, 0, 2], [0, 1, 0, 5, 2, 0]
    svg = _svgs(_page(_summary(timeline={"bucket_s": 2.0, "ok": ok, "error": err})))["rows per second over the run"]
    total = _points(svg, "line-total")
    oks = _points(svg, "line-ok")
    assert len(total) == len(oks) == len(ok)
    xs = [p[0] for p in total]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)
    assert [p[0] for p in oks] == xs
    # SVG y grows downwards: the highest point is the bucket with the most rows (ok + error)
    rows = [a + b for a, b in zip(ok, err)]
    assert min(range(len(total)), key=lambda i: total[i][1]) == rows.index(max(rows))
    # heights above the baseline are proportional to rows per second, for the total and for ok
    base = next(p[1] for p, n in zip(oks, ok) if n == 0)
    scale = (base - total[2][1]) / (rows[2] / 2.0)
    for (_, y), n in zip(total, rows):
        assert base - y == pytest.approx(n / 2.0 * scale, abs=0.15)
    for (_, y), n in zip(oks, ok):
        assert base - y == pytest.approx(n / 2.0 * scale, abs=0.15)
    classes = {e.get("class") for e in svg.iter("polygon")}
    assert {"area-ok", "area-error"} <= classes  # errors are drawn apart from ok rows
    # hover text per bucket, and the axes say what they measure
    titles = [t.text for t in svg.iter("title")]
    assert len(titles) == len(ok) and titles[3] == "6–8 s: 3 ok, 5 error, 4 rows/s"
    texts = [t.text for t in svg.iter("text")]
    assert "rows per second" in texts and "time since the run started (s)" in texts


def test_one_bucket_timeline_draws_a_flat_segment():
    svg = _svgs(_page(_summary(timeline={"bucket_s": 10.0, "ok": [30], "error": [10]})))["rows per second over the run"]
    total = _points(svg, "line-total")
    assert len(total) == 2 and total[0][1] == total[1][1] and total[0][0] < total[1][0]


def test_long_timeline_is_merged_into_fewer_points_and_keeps_every_row():
    ok = [i % 7 for i in range(5000)]
    page = _page(_summary(timeline={"bucket_s": 1.0, "ok": ok, "error": [1] * 5000}))
    svg = _svgs(page)["rows per second over the run"]
    assert len(_points(svg, "line-total")) <= report.MAX_POINTS
    assert f"{sum(ok) + 5000:,} rows in" in page
    assert "time since the run started (h)" in [t.text for t in svg.iter("text")] or \
        "time since the run started (min)" in [t.text for t in svg.iter("text")]


@pytest.mark.parametrize("summary", [
    {},
    {"timeline": None, "by_error_type": None, "stage_ms_per_row": None, "by_status": None},
    {"timeline": {}},
    {"timeline": {"bucket_s": 5.0, "ok": [], "error": []}},
    {"timeline": {"bucket_s": 0, "ok": [1, 2], "error": [0, 0]}},
    {"timeline": {"bucket_s": "x", "ok": "nope", "error": 3}},
    {"timeline": {"bucket_s": 2.0, "ok": [0, 0, 0], "error": [0, 0, 0]}},
    {"timeline": {"bucket_s": 2.0, "ok": [1, None, "3", float("nan")], "error": [-4]}},
    {"timeline": [1, 2, 3], "by_error_type": ["a"], "stage_ms_per_row": "fast"},
    {"rows_processed": None, "rows_skipped": "many", "wall_s": float("inf"), "rows_per_s": None,
     "by_error_type": {"x": None, "y": "2", "z": float("nan")}},
    {"stage_ms_per_row": {"normalise": 0, "preprocess": 0, "edit": 0, "write": 0}},
    {"stage_ms_per_row": {"edit": float("nan"), "custom": -3, "write": "12"}},
])
def test_missing_or_odd_summary_values_render(summary):
    page = _page(summary)
    assert page.startswith("<!doctype html>") and '<section class="charts">' in page
    for svg in _svgs(page).values():  # whatever is drawn is well formed, with finite numbers
        for e in svg.iter():
            for key in ("x", "y", "width", "height", "x1", "x2", "y1", "y2"):
                if key in e.attrib:
                    assert math.isfinite(float(e.get(key))), (e.tag, key, e.get(key))
            if "points" in e.attrib:
                assert all(math.isfinite(float(v)) for p in e.get("points").split() for v in p.split(","))


def test_missing_data_says_so_instead_of_a_chart():
    page = _page({"run_id": "old", "rows_processed": 0})
    assert _svgs(page) == {}
    assert "no timeline in this summary" in page and "no stage timings" in page and "no errors" in page


def test_page_is_self_contained():
    one = np.full((20, 30, 3), 120, np.uint8)
    rows = [{"id": "a", "status": "ok", "instruction": "x", "image_uris": ["/in/a.png", "/in/b.png"]}]
    page = _page(_summary(), rows, [([array_data_uri(one), array_data_uri(one)], array_data_uri(one))])
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "@import" not in page and "url(" not in page and "<script" not in page
    assert re.findall(r'\bsrc="([^"]*)"', page) and all(
        s.startswith("data:image/jpeg;base64,") for s in re.findall(r'\bsrc="([^"]*)"', page))
    # a URL in the data is only shown as text, escaped where needed
    url = 'https://example.com/out?a=1&b="2"'
    page = _page(_summary(output_uri=url, by_error_type={"http://x/<y>": 2}))
    assert page.count("https://") == 1 and "https://example.com/out?a=1&amp;b=&quot;2&quot;" in page
    assert "http://x/&lt;y&gt;" in page and "http://x/<y>" not in page


def test_multi_input_rows_still_show_every_input_thumbnail():
    pics = [array_data_uri(np.full((16, 24, 3), v, np.uint8)) for v in (10, 90, 170, 250)]
    rows = [
        {"id": "one", "status": "ok", "instruction": "a", "image_uri": "/in/0.png"},
        {"id": "three", "status": "ok", "instruction": "b", "image_uris": ["/in/1.png", "/in/2.png", "/in/3.png"]},
    ]
    page = _page(_summary(), rows, [([pics[0]], pics[3]), (pics[:3], pics[3])])
    (one,) = [tr for tr in page.split("<tr ") if "id one &middot;" in tr]
    (three,) = [tr for tr in page.split("<tr ") if "id three &middot;" in tr]
    assert one.count("<img ") == 1 + 1
    assert three.count("<img ") == 3 + 1 and three.count(pics[0]) == 1 and three.count(pics[2]) == 1
    assert three.index(pics[0]) < three.index(pics[1]) < three.index(pics[2])  # in input order


def _text_px(text: str) -> float:
    """The width of ``text`` at the charts' 12 px in DejaVu Sans (a wide sans-serif, what a Linux
    browser falls back to), measured by FreeType: an oracle independent of the report's code."""
    from PIL import ImageFont

    try:
        font = ImageFont.truetype("DejaVuSans.ttf", 12)
    except OSError:
        font = ImageFont.load_default(size=12)
    return font.getlength(text)


@pytest.mark.parametrize("per_row", [
    {"normalise": 0.4, "preprocess": 30.0, "edit": 1473.0, "write": 30.0},  # "1,473 ms (96%)"
    {"normalise": 0.0, "preprocess": 0.0, "edit": 123456.0, "write": 0.0},  # "123,456 ms (100%)"
])
def test_a_bar_at_full_width_keeps_its_whole_label(per_row):
    svg = _svgs(_page(_summary(stage_ms_per_row=per_row)))["time per stage per row"]
    width = float(svg.get("viewBox").split()[2])
    for t in svg.iter("text"):
        if t.get("class") == "val":
            assert float(t.get("x")) + _text_px(t.text) <= width, (t.text, t.get("x"), width)
