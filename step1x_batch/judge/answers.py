"""Reading a judge's answer: the JSON object with its scores (or its winner), found in whatever
text a real judge wraps around it, and the VIEScore overall score.

Why strict about content and lenient about wrapping: judges put the object in ```json fences or
after a sentence of preamble, which loses nothing; but a wrong count, a word where a number should
be, or a cut-off answer means the score is unknown, and guessing one (as VIEScore's own parser
does on a retry) would put a made-up number into a benchmark. Those become row errors:
``judge_unparsable``, or ``judge_out_of_range`` for a number off the 0-10 scale. The raw answer
kept with an error is redacted and bounded, since it lands in logs and score files.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from step1x_batch.errors import JUDGE_OUT_OF_RANGE, JUDGE_UNPARSABLE, redact

ANSWER_CODES = frozenset({JUDGE_UNPARSABLE, JUDGE_OUT_OF_RANGE})
CUT_MARKER = " [...cut]"
_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\r?\n?(.*?)```", re.DOTALL)
_WINNERS = {"A": 1.0, "B": 0.0, "TIE": 0.5}


@dataclass(frozen=True)
class Verdict:
    """What one answer says: its scores in the prompt's order (pairwise: 1.0 A, 0.0 B, 0.5 tie)."""

    scores: tuple[float, ...]
    reasoning: str


def bounded(text: str | None, limit: int = 2000) -> str:
    """``text`` with credentials masked, then cut to at most ``limit`` characters with a marker."""
    text = redact(str(text)) if text else ""
    if len(text) <= limit:
        return text
    keep = max(limit - len(CUT_MARKER), 0)
    return (text[:keep] + CUT_MARKER)[:limit]


class AnswerError(Exception):
    """An answer that gives no usable score; ``code`` is judge_unparsable or judge_out_of_range."""

    def __init__(self, code: str, message: str, raw: str) -> None:
        if code not in ANSWER_CODES:
            raise ValueError(f"unknown answer error code {code!r}; expected one of {sorted(ANSWER_CODES)}")
        self.code = code
        self.message = bounded(message, 500)
        self.raw = bounded(raw)
        super().__init__(self.code, self.message, self.raw)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __reduce__(self):  # picklable across Ray workers with the same fields
        return (type(self), (self.code, self.message, self.raw))


def _objects(text: str):
    """Every JSON object in ``text``, fenced blocks first, each in the order it starts."""
    decoder = json.JSONDecoder()
    places = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for place in places:
        start = place.find("{")
        while start != -1:
            try:
                value, _ = decoder.raw_decode(place, start)
            except json.JSONDecodeError:
                value = None
            if isinstance(value, dict):
                yield value
            start = place.find("{", start + 1)


def _find(text: str | None, key: str) -> dict[str, Any]:
    """The first JSON object in the answer that holds ``key``; AnswerError when there is none."""
    if text is None or not str(text).strip():
        raise AnswerError(JUDGE_UNPARSABLE, "the judge gave an empty answer", "")
    text = str(text)
    for obj in _objects(text):
        if key in obj:
            return obj
    if "{" in text and "}" not in text[text.find("{"):]:
        why = f"the judge's answer is cut off (a JSON object with no closing brace, {len(text)} characters)"
    else:
        why = f"the judge's answer has no JSON object with a {key!r} field"
    raise AnswerError(JUDGE_UNPARSABLE, why, text)


def _number(value: Any) -> float | None:
    """A finite number, from a JSON number or a numeric string ("7", " 7.5 "); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _reasoning(obj: dict[str, Any]) -> str:
    value = obj.get("reasoning", "")
    return bounded(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))


def parse_scores(text: str | None, expected: int, low: float = 0, high: float = 10) -> Verdict:
    """The ``expected`` scores of a ``{"score": [...], "reasoning": "..."}`` answer, each in [low, high]."""
    obj = _find(text, "score")
    raw = obj["score"]
    items = raw if isinstance(raw, list) else [raw]
    if len(items) != expected:
        raise AnswerError(JUDGE_UNPARSABLE, f"the judge gave {len(items)} scores where {expected} were asked for", text)
    scores = [_number(item) for item in items]
    if any(s is None for s in scores):
        raise AnswerError(JUDGE_UNPARSABLE, f"the judge's scores are not all numbers: {json.dumps(raw)[:200]}", text)
    outside = [s for s in scores if not low <= s <= high]
    if outside:
        raise AnswerError(JUDGE_OUT_OF_RANGE, f"the judge gave {outside[0]:g}, outside the {low:g}-{high:g} scale", text)
    return Verdict(scores=tuple(scores), reasoning=_reasoning(obj))


def parse_preference(text: str | None) -> Verdict:
    """A pairwise ``{"winner": "A" | "B" | "tie", ...}`` answer as scores (1.0,), (0.0,) or (0.5,)."""
    obj = _find(text, "winner")
    winner = obj["winner"]
    score = _WINNERS.get(winner.strip().upper()) if isinstance(winner, str) else None
    if score is None:
        raise AnswerError(JUDGE_UNPARSABLE, f"the judge's winner is {json.dumps(winner)[:100]}, not A, B or tie", text)
    return Verdict(scores=(score,), reasoning=_reasoning(obj))


def overall(sc: Verdict, pq: Verdict) -> tuple[float, float, float]:
    """VIEScore's (SC, PQ, O): the minimum of each answer's sub-scores and their geometric mean."""
    if not sc.scores or not pq.scores:
        raise ValueError("overall() needs at least one SC and one PQ score")
    semantic, quality = min(sc.scores), min(pq.scores)
    return semantic, quality, math.sqrt(semantic * quality)
