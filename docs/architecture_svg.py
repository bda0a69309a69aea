"""Draw docs/architecture.svg: the package's layers (read from the folders themselves) beside one
edit job's stages. ``python docs/architecture_svg.py`` rewrites it; tests/test_architecture_doc.py
fails when the picture no longer matches the package (a module added, moved or removed).

Plain SVG text, no plotting library: the same package gives the same bytes on every machine.
"""

from __future__ import annotations

import sys
from html import escape
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "step1x_batch"
OUT = Path(__file__).resolve().with_name("architecture.svg")

# The layers, lowest first, each with what it holds (tests/test_boundaries.py enforces the order).
LAYERS = [
    ("errors", "the foundation: row error codes, JobRefused, redaction (stdlib only)"),
    ("models", "model families behind one interface (base.py); no Ray, no job code"),
    ("io", "bytes in and out: storage, image codecs, weights staging"),
    ("rows", "the row contract: manifest, fingerprint, log, state, digest"),
    ("judge", "judging edits: prompts, answers, metrics, engines, scores log, scoring stage"),
    ("job", "the edit job: config, pre-flight, lease, Ray Data graph, driver, report"),
    ("recipes", "jobs built on the edit job: synthetic pairs, catalog nights, scoring"),
    ("cli", "the step1x-batch command and the demo"),
]

# One edit job, left to right: (stage, where it runs, what it does).
STAGES = [
    ("manifest", "driver", "Parquet / JSONL / CSV"),
    ("skip join", "CPU tasks", "fingerprint vs state"),
    ("normalise", "CPU tasks", "id, defaults, fingerprint"),
    ("prepare", "CPU tasks", "read, decode, family.prepare"),
    ("edit", "GPU actors", "family engine, batches by key"),
    ("write", "CPU tasks", "family.finish, encode, put"),
    ("row log", "driver", "parts, lease, then state"),
]

W, LAYER_H, GAP = 940, 54, 10
FONT = "font-family='DejaVu Sans, Arial, sans-serif'"


def layer_modules(name: str) -> list[str]:
    """The modules of one layer, as a reader finds them in the tree."""
    if name == "errors":
        return ["errors.py"]
    if name == "cli":
        return ["cli.py", "demo.py"]
    folder = PACKAGE / name
    entries = sorted(p.name for p in folder.iterdir() if p.suffix == ".py" and p.name != "__init__.py")
    entries += sorted(f"{p.name}/" for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    return entries


def _text(x: float, y: float, body: str, size: int = 13, weight: str = "normal", anchor: str = "start",
          fill: str = "#1f2933") -> str:
    return (f"<text x='{x:.0f}' y='{y:.0f}' {FONT} font-size='{size}' font-weight='{weight}' "
            f"text-anchor='{anchor}' fill='{fill}'>{escape(body)}</text>")


def _wrap(words: list[str], width: int) -> list[str]:
    lines, line = [], ""
    for w in words:
        candidate = f"{line}  {w}" if line else w
        if len(candidate) > width and line:
            lines.append(line)
            line = w
        else:
            line = candidate
    return lines + ([line] if line else [])


def layers_panel(top: float) -> tuple[list[str], float]:
    """The layers as a stack, highest on top, an arrow meaning 'imports' pointing down."""
    parts = [_text(20, top, "Layers: a module imports only its own layer or a lower one", 15, "bold")]
    y = top + 14
    for name, what in reversed(LAYERS):
        lines = _wrap(layer_modules(name), 92)
        h = LAYER_H + 16 * max(0, len(lines) - 1)
        shade = "#e6f0fa" if name not in ("models", "errors") else "#eef7ea"
        parts.append(f"<rect x='20' y='{y:.0f}' width='{W - 40}' height='{h}' rx='6' fill='{shade}' stroke='#7b8794'/>")
        parts.append(_text(34, y + 21, f"step1x_batch/{name if name not in ('errors', 'cli') else ''}", 14, "bold"))
        parts.append(_text(250, y + 21, what, 12, fill="#3e4c59"))
        for i, line in enumerate(lines):
            parts.append(_text(34, y + 40 + 16 * i, line, 12, fill="#52606d"))
        y += h + GAP
    parts.append(f"<line x1='{W - 12}' y1='{top + 24}' x2='{W - 12}' y2='{y - GAP - 6}' stroke='#9aa5b1' "
                 f"stroke-width='2' marker-end='url(#arrow)'/>")
    return parts, y


def stages_panel(top: float) -> tuple[list[str], float]:
    """One edit job's stages; colour says where each runs."""
    colours = {"driver": "#fdf3d8", "CPU tasks": "#e6f0fa", "GPU actors": "#fde2e1"}
    parts = [_text(20, top, "One edit job: Ray Data stages, an error is a column, every row ends as one log record",
                   15, "bold")]
    box_w, gap, y = 118, 15, top + 16
    for i, (name, where, what) in enumerate(STAGES):
        x = 20 + i * (box_w + gap)
        parts.append(f"<rect x='{x}' y='{y:.0f}' width='{box_w}' height='74' rx='6' fill='{colours[where]}' "
                     f"stroke='#7b8794'/>")
        parts.append(_text(x + box_w / 2, y + 20, name, 13, "bold", "middle"))
        parts.append(_text(x + box_w / 2, y + 38, where, 11, anchor="middle", fill="#52606d"))
        for j, line in enumerate(_wrap(what.split(" "), 19)):
            parts.append(_text(x + box_w / 2, y + 54 + 12 * j, line, 10, anchor="middle", fill="#52606d"))
        if i:
            parts.append(f"<line x1='{x - gap + 1}' y1='{y + 37:.0f}' x2='{x - 3}' y2='{y + 37:.0f}' "
                         f"stroke='#52606d' stroke-width='1.5' marker-end='url(#arrow)'/>")
    return parts, y + 74 + 20


def render() -> str:
    stage_parts, y = stages_panel(28)
    layer_parts, y = layers_panel(y + 14)
    head = (f"<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{y + 10:.0f}' "
            f"viewBox='0 0 {W} {y + 10:.0f}'>\n"
            "<defs><marker id='arrow' viewBox='0 0 10 10' refX='9' refY='5' markerWidth='7' markerHeight='7' "
            "orient='auto-start-reverse'><path d='M 0 0 L 10 5 L 0 10 z' fill='#52606d'/></marker></defs>\n"
            f"<rect width='{W}' height='{y + 10:.0f}' fill='white'/>\n")
    return head + "\n".join(stage_parts + layer_parts) + "\n</svg>\n"


def main() -> int:
    OUT.write_text(render())
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
