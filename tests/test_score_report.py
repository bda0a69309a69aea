"""The judge's scores for people: ``scores/<run_id>/report.html`` (histograms, O by category, means
with bootstrap intervals, a worst-first contact sheet), the same section in the edit report, and
one line per judge in ``status``. No Ray: the scores are built directly as the scoring stage would
write them, over a row log and real tiny images on disk.

The page is parsed, not just searched: every inline SVG must be well-formed XML, the bars must be
the counts and means the test computes itself, and the hostile raw answer must show as text with
its bearer token masked.
"""

from __future__ import annotations

import datetime as dt
import io
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from step1x_batch.cli import main
from step1x_batch.job import report
from step1x_batch.job.inspection import root_status
from step1x_batch.judge.scores import SCORE_SCHEMA, ScoreWriter, conform_scores, summarize
from step1x_batch.rows.log import part_uri, write_log_part

T0 = dt.datetime(2025, 3, 1, tzinfo=dt.timezone.utc)
TOKEN = "Bearer eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXRva2Vu"
KEY = "sk-live0123456789abcdefXYZ"
HOSTILE = f"<script>alert('judge')</script> ignore that; header Authorization: {TOKEN}"
JUDGE, HASH = "http:qwen2.5-vl-7b#a1b2c3d4e5f6", "0123456789abcdef"
METRICS_JUDGE = "none:-#ffeeddccbbaa"
# (id, category, SC, PQ): O = sqrt(SC * PQ); r4's answer cannot be read
ROWS = [("r0", "style_change", 8.0, 9.0), ("r1", "style_change", 6.0, 8.0),
        ("r2", "color_alter", 2.0, 7.0), ("r3", "color_alter", 4.0, 4.0), ("r4", "color_alter", None, None)]
COLOURS = [(220, 60, 60), (60, 160, 80), (60, 90, 210), (230, 180, 40), (140, 60, 170)]


def _table(rows: list[dict]) -> pa.Table:
    """Score records as the scores log holds them (every column of SCORE_SCHEMA, missing ones null)."""
    return conform_scores(pa.Table.from_pylist(rows, schema=SCORE_SCHEMA))


def _png(colour: tuple[int, int, int], shade: int = 0, size: tuple[int, int] = (96, 64)) -> bytes:
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:] = colour
    a[: size[1] // 2, : size[0] // 2] = [max(0, c - 90 + shade) for c in colour]  # a corner that moved
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _metrics(changed: float) -> dict:
    return {"changed_fraction": changed, "unchanged": changed < 0.002, "psnr": 30.0 - 10 * changed,
            "ssim": 1.0 - changed, "width": 96, "height": 64, "aspect_change": 0.0, "size_ok": True,
            "clip_text": None, "clip_direction": None}


def _edit_root(root: Path, name: str = "out", shade: int = 0) -> tuple[str, list[dict]]:
    """An output root with a row log: r0-r4 edited (r0 twice; its first edit is history)."""
    out = root / name
    (out / "images").mkdir(parents=True)
    recs = []
    for i, (rid, cat, _, _) in enumerate(ROWS):
        src = root / f"in{i}.png"
        if not src.exists():
            src.write_bytes(_png(COLOURS[i], shade=90))  # the input: no darker corner
        dst = out / "images" / f"{rid}.png"
        dst.write_bytes(_png(COLOURS[i], shade))
        recs.append({"id": rid, "fingerprint": f"{name}-f{i}", "status": "ok", "image_uri": str(src),
                     "image_uris": [str(src)], "output_uri": str(dst), "instruction": f"make row {i} brighter",
                     "run_id": "edit", "finished_at": T0 + dt.timedelta(minutes=i + 1)})
    old = {**recs[0], "fingerprint": f"{name}-f0-old", "finished_at": T0}
    write_log_part({k: [r[k] for r in [old] + recs] for k in recs[0]}, part_uri(str(out), "edit", 0))
    return str(out), recs


def _score(rec: dict, sc: float | None, pq: float | None, cat: str, judge: str = JUDGE, hash_: str = HASH) -> dict:
    base = {"id": rec["id"], "fingerprint": rec["fingerprint"], "score_key": f"{rec['fingerprint']}|{judge}",
            "judge_id": judge, "prompt_hash": hash_, "category": cat, "instruction": rec["instruction"],
            "output_uri": rec["output_uri"], "run_id": "judge1", "finished_at": T0 + dt.timedelta(hours=1)}
    if sc is None:
        return {**base, "status": "error", "error_type": "judge_unparsable", "judge_raw": HOSTILE,
                "error_message": f"no JSON object in the answer (key {KEY})", "metrics": _metrics(0.25)}
    return {**base, "status": "ok", "score_sc": sc, "score_pq": pq, "score_o": math.sqrt(sc * pq),
            "sub_scores": {"sc": [sc, sc + 1], "pq": [pq, min(pq + 1, 10)]}, "metrics": _metrics(0.25),
            "judge_reason": f"the edit follows the instruction; judge echoed {KEY}"}


@pytest.fixture()
def scored(tmp_path: Path) -> dict:
    """The root, its judge's current scores (one table, as the scoring run summarises it), an
    older edit's score and a metrics-only judge's scores (both written to the scores log)."""
    out, recs = _edit_root(tmp_path)
    current = _table([_score(r, sc, pq, cat) for r, (_, cat, sc, pq) in zip(recs, ROWS)])
    old = {**recs[0], "fingerprint": "out-f0-old"}
    history = _table([{**_score(old, 0.0, 0.0, "style_change"), "finished_at": T0}])
    unchanged = [{**_score(r, None, None, cat, METRICS_JUDGE, "-"), "status": "ok", "error_type": None,
                  "judge_raw": None, "error_message": None, "metrics": _metrics(0.0 if i == 0 else 0.5)}
                 for i, (r, (_, cat, _, _)) in enumerate(zip(recs[:2], ROWS))]
    writer = ScoreWriter(out, "judge1", None, part_rows=100, part_seconds=1e9)
    writer.add(pa.concat_tables([current, history, _table(unchanged)]))
    writer.flush()
    return {"out": out, "recs": recs, "scores": current}


def _svgs(page: str) -> dict[str, ET.Element]:
    """Every inline <svg> (well-formed XML) by aria-label; the first of each label."""
    found: dict[str, ET.Element] = {}
    for text in re.findall(r"<svg\b.*?</svg>", page, flags=re.S):
        root = ET.fromstring(text)
        found.setdefault(root.get("aria-label"), root)
    return found


def _heights(svg: ET.Element) -> list[float]:
    return [float(r.get("height")) for r in svg.iter("rect") if r.get("class") == "bar"]


def _sheet_ids(page: str, nth: int = 0) -> list[str]:
    sheet = re.findall(r'<table class="sheet">.*?</table>', page, flags=re.S)[nth]
    return re.findall(r'<div class="meta">id (\S+) ', sheet)


def _score_page(scored: dict, **kw) -> str:
    stats = summarize(scored["scores"])
    uri = report.write_score_report(scored["out"], None, "judge1", scored["scores"], stats,
                                    input_storage=None, max_pixels=10_000_000, max_rows=10, **kw)
    assert uri == f"{scored['out']}/scores/judge1/report.html"
    return Path(uri).read_text()


def test_score_page_histograms_are_the_counts(scored):
    page = _score_page(scored)
    svgs = _svgs(page)
    ok = [(sc, pq) for _, _, sc, pq in ROWS if sc is not None]
    for label, values in (("SC", [sc for sc, _ in ok]), ("PQ", [pq for _, pq in ok]),
                          ("O", [math.sqrt(sc * pq) for sc, pq in ok])):
        heights = _heights(svgs[f"histogram of {label}"])
        assert len(heights) == 11  # whole scores 0..10
        expected = np.bincount(np.rint(values).astype(int), minlength=11)
        unit = max(heights) / expected.max()
        assert heights == pytest.approx(list(expected * unit), abs=0.11), label
    changed = _heights(svgs["histogram of the changed fraction"])
    assert len(changed) == 10 and changed[2] > 0 and sum(h > 0 for h in changed) == 1  # 0.25 -> 20-30 %


def test_score_page_category_means_and_overall_means(scored):
    page = _score_page(scored)
    svg = _svgs(page)["mean O by category"]
    labels = [t.text for t in svg.iter("text") if t.get("class") == "label"]
    values = [t.text for t in svg.iter("text") if t.get("class") == "val"]
    o = {rid: math.sqrt(sc * pq) for rid, _, sc, pq in ROWS if sc is not None}
    colour, style = np.mean([o["r2"], o["r3"]]), np.mean([o["r0"], o["r1"]])
    assert labels == ["color_alter", "style_change"]  # lowest mean first; r4's error has no O
    assert values[0].startswith(f"{colour:.2f} [") and values[0].endswith("n 2")
    assert values[1].startswith(f"{style:.2f} [") and values[1].endswith("n 2")
    widths = [float(r.get("width")) for r in svg.iter("rect") if r.get("class") == "bar"]
    assert widths[0] / widths[1] == pytest.approx(colour / style, rel=1e-3)
    for cat, text in zip(labels, values):  # the interval holds the mean and lies in 0-10
        low, high = map(float, re.search(r"\[(.*), (.*)\]", text).groups())
        assert 0 <= low <= float(text.split()[0]) <= high <= 10, cat

    stats = summarize(scored["scores"])
    means = _svgs(page)["mean scores"]
    shown = [t.text for t in means.iter("text") if t.get("class") == "val"]
    assert shown == [f"{stats[n]['mean']:.2f} [{stats[n]['low']:.2f}, {stats[n]['high']:.2f}] · n 4"
                     for n in ("score_sc", "score_pq", "score_o")]
    assert stats["score_sc"]["mean"] == pytest.approx(5.0)
    assert JUDGE in page and HASH in page
    assert "judge_unparsable: 1" in page


def test_score_page_is_worst_first_with_thumbnails(scored):
    page = _score_page(scored)
    o = {rid: math.sqrt(sc * pq) for rid, _, sc, pq in ROWS if sc is not None}
    assert _sheet_ids(page) == ["r4"] + sorted(o, key=o.get)  # the error, then the lowest O
    assert _sheet_ids(page) == ["r4", "r2", "r3", "r1", "r0"]
    assert page.count('src="data:image/jpeg;base64,') == 10  # every input and every edit
    assert 'class="ph"' not in page.split('<table class="sheet">')[1]  # no placeholder for a missing picture
    first = report.worst_first(scored["scores"], 2)
    assert [r["id"] for r in first] == ["r4", "r2"]


def test_raw_answer_is_escaped_and_secrets_are_masked(scored):
    page = _score_page(scored)
    assert "&lt;script&gt;alert(&#x27;judge&#x27;)&lt;/script&gt;" in page
    assert "<script" not in page.lower()
    assert TOKEN.split()[1] not in page and KEY not in page
    assert "eyJhbGci" not in page and "***" in page
    raw = re.search(r'<pre class="raw">(.*?)</pre>', page, flags=re.S).group(1)
    assert "ignore that" in raw


def test_preference_counts_and_the_other_edit(tmp_path):
    out, recs = _edit_root(tmp_path)
    other, theirs = _edit_root(tmp_path, "other", shade=40)
    prefs = ["A", "B", "tie", "B", "A"]
    rows = [{**_score(r, 0.0, 0.0, cat), "score_sc": None, "score_pq": None, "score_o": None, "sub_scores": None,
             "preference": p, "axis": "instruction_following", "against_fingerprint": t["fingerprint"]}
            for r, t, (_, cat, _, _), p in zip(recs, theirs, ROWS, prefs)]
    table = _table(rows)
    uri = report.write_score_report(out, None, "pair", table, summarize(table), input_storage=None,
                                    max_pixels=10_000_000, against=other)
    page = Path(uri).read_text()
    bars = _svgs(page)["pairwise preference"]
    assert [t.text for t in bars.iter("text") if t.get("class") == "val"] == ["2", "2", "1"]
    assert _sheet_ids(page) == ["r1", "r3", "r2", "r0", "r4"]  # lost, then tie, then won
    assert page.count('src="data:image/jpeg;base64,') == 15  # input, this edit, the other edit
    assert "instruction_following" in page and "<th>other (B)</th>" in page


def test_status_prints_one_line_per_judge_with_the_current_means(scored, capsys):
    assert main(["status", scored["out"]]) == 0
    text = capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if JUDGE in ln]
    assert len(lines) == 1
    stats = summarize(scored["scores"])  # the current edits only: r0's older edit's 0/0/0 is history
    assert f"({'prompts ' + HASH}): 5 rows scored: 4 ok, 1 error (judge_unparsable 1)" in lines[0]
    for name, label in (("score_sc", "SC"), ("score_pq", "PQ"), ("score_o", "O")):
        m = stats[name]
        assert f"{label} {m['mean']:.2f} [{m['low']:.2f}, {m['high']:.2f}]" in lines[0]
    assert "SC 5.00 [" in lines[0]
    (metrics_line,) = [ln for ln in text.splitlines() if METRICS_JUDGE in ln]
    assert "2 rows scored: 2 ok" in metrics_line and "unchanged 50%" in metrics_line
    assert "of the 5 current edits" in text

    status = root_status(scored["out"])
    assert [j.judge_id for j in status.scores] == [JUDGE, METRICS_JUDGE]
    assert status.scores[0].rows == 5 and status.scores[0].errors == {"judge_unparsable": 1}


def test_status_of_a_root_without_scores_has_no_scores_block(tmp_path, capsys):
    out, _ = _edit_root(tmp_path)
    assert main(["status", out]) == 0
    assert "scores (" not in capsys.readouterr().out
    assert root_status(out).scores == []


def test_the_edit_report_ends_with_a_section_per_judge(scored, tmp_path):
    uri = str(tmp_path / "runs-report.html")
    summary = {"run_id": "edit", "ok": True, "rows_processed": 5, "by_status": {"ok": 5}, "output_uri": scored["out"]}
    report.write_report(summary, [], uri, input_storage=None, output_storage=None, max_pixels=10_000_000,
                        scores_root=scored["out"])
    page = Path(uri).read_text()
    assert page.count('<section class="scores"') == 2 and 'href="#scores-1"' in page
    assert JUDGE in page and METRICS_JUDGE in page
    assert _sheet_ids(page, 0) == ["r4", "r2", "r3", "r1", "r0"]  # r0's older edit (O 0) is not shown
    assert _sheet_ids(page, 1) == ["r0", "r1"]  # metrics only: the unchanged output first
    assert KEY not in page and "<script" not in page.lower()
    assert report.root_scores(scored["out"], None).num_rows == 7

    plain = str(tmp_path / "plain.html")
    report.write_report(summary, [], plain, input_storage=None, output_storage=None, max_pixels=10_000_000,
                        scores_root=str(tmp_path / "nowhere"))
    assert '<section class="scores"' not in Path(plain).read_text()
