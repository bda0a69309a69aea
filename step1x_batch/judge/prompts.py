"""What a VLM judge is asked: the prompt sets (ours, and GEdit-Bench's VIEScore prompts read from an
installed package) and the requests built from them.

Why here and not in the engines: the prompt text decides the scores, so it is one value with a
digest that goes into every score key; two runs with different wording never share results.

Our set ("step1x-batch") asks what VIEScore asks for text-guided image editing, in our own words:
semantic consistency as two 0-10 sub-scores (edit success, over-editing) about the inputs and the
edit, perceptual quality as two (naturalness, artifacts) about the edit alone, each answered as
``{"score": [s1, s2], "reasoning": "..."}``. The pairwise question (A vs B on one axis) is ours in
both sets; GEdit-Bench has none.

Templates are filled in one pass of the exact placeholders ``{instruction}`` and ``{axis}``; every
other brace is literal (the JSON examples), and an instruction that itself contains ``{axis}`` is
left as written.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import yaml

from step1x_batch.errors import JobRefused

OURS = "step1x-batch"
GEDIT = "gedit"
GEDIT_EXTRA = "pip install 'step1x-batch[gedit]'"
# lmms-eval ships GEdit-Bench's VIEScore prompt module byte for byte (the same text as
# GEdit-Bench/viescore/vie_prompts.py in stepfun-ai/Step1X-Edit).
GEDIT_PACKAGE = "lmms_eval"
GEDIT_DISTRIBUTION = "lmms-eval"
GEDIT_PROMPTS_FILE = ("tasks", "gedit_bench", "viescore", "vie_prompts.py")
# the module's names GEdit-Bench's VIEScore("tie") joins into its SC and PQ prompts
GEDIT_NAMES = (
    "_context_no_delimit",
    "_prompts_0shot_two_image_edit_rule",
    "_prompts_0shot_tie_rule_SC",
    "_prompts_0shot_rule_PQ",
)

_PLACEHOLDER = re.compile(r"\{(instruction|axis)\}")


@dataclass(frozen=True)
class JudgeRequest:
    """One question to a VLM judge: a system text, a user text, and the images it sees in order.

    An empty ``system`` means no system message: GEdit-Bench sends its whole prompt as one user
    message, and a faithful replay must too."""

    system: str
    text: str
    images: tuple[bytes, ...]  # encoded image files (PNG/JPEG/WebP bytes), in the order the text names them


AXES: dict[str, str] = {
    "instruction_following": (
        "instruction following - which result does what the editing instruction asks more "
        "completely and more exactly."
    ),
    "visual_consistency": (
        "visual consistency - which result better keeps everything the instruction did not ask to "
        "change: identity, pose, layout, background, colours and fine detail outside the edited region."
    ),
    "quality": (
        "image quality - which result looks more natural and has fewer artifacts (distortion, blur, "
        "smears, malformed hands or faces, seams), whatever the instruction."
    ),
}


def _fill(template: str, **values: str) -> str:
    """One pass over the exact placeholders, so that text put in is never substituted again."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def _images(*groups: Sequence[bytes]) -> tuple[bytes, ...]:
    out = []
    for group in groups:
        for image in group:
            if not isinstance(image, (bytes, bytearray, memoryview)):
                raise TypeError(f"a judge image must be encoded bytes, got {type(image).__name__}")
            out.append(bytes(image))
    return tuple(out)


@dataclass(frozen=True)
class PromptSet:
    """A named, versioned set of judge prompts; ``digest()`` identifies its exact text."""

    name: str
    version: str
    system: str  # the role and answer rules; "" = none (everything is in the user text)
    sc: str  # semantic consistency, placeholder {instruction}; images: every input, then the edit
    pq: str  # perceptual quality, no placeholder; image: the edit only
    pairwise: str  # placeholders {instruction} {axis}; images: every input, then edit A, then edit B
    sc_scores: int = 2  # VIEScore: editing success, over-editing
    pq_scores: int = 2  # VIEScore: naturalness, artifacts

    def __post_init__(self) -> None:
        if "{instruction}" not in self.sc:
            raise ValueError(f"prompt set {self.name!r}: the SC template has no {{instruction}} placeholder")
        if "{instruction}" not in self.pairwise or "{axis}" not in self.pairwise:
            raise ValueError(f"prompt set {self.name!r}: the pairwise template needs {{instruction}} and {{axis}}")
        if self.sc_scores < 1 or self.pq_scores < 1:
            raise ValueError(f"prompt set {self.name!r}: sc_scores and pq_scores must be at least 1")

    def digest(self) -> str:
        """sha256 (hex, 16 chars) of every field; the same in every process and on every machine."""
        blob = json.dumps(asdict(self), sort_keys=True, ensure_ascii=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("ascii")).hexdigest()[:16]

    def sc_request(self, instruction: str, inputs: Sequence[bytes], edited: bytes) -> JudgeRequest:
        """Did the edit follow the instruction without changing more than asked."""
        if not inputs:
            raise ValueError("an SC request needs at least one input image")
        return JudgeRequest(self.system, _fill(self.sc, instruction=instruction), _images(inputs, [edited]))

    def pq_request(self, edited: bytes) -> JudgeRequest:
        """How natural and artifact-free the edit looks, whatever it shows."""
        return JudgeRequest(self.system, self.pq, _images([edited]))

    def pairwise_request(
        self, instruction: str, axis: str, inputs: Sequence[bytes], a: bytes, b: bytes
    ) -> JudgeRequest:
        """Which of two edits of the same row is better on one axis ({axis} gets its description)."""
        if axis not in AXES:
            raise ValueError(f"unknown pairwise axis {axis!r}; expected one of {sorted(AXES)}")
        if not inputs:
            raise ValueError("a pairwise request needs at least one input image")
        text = _fill(self.pairwise, instruction=instruction, axis=AXES[axis])
        return JudgeRequest(self.system, text, _images(inputs, [a, b]))


_SYSTEM = """\
You judge the results of AI image editing. Every image you are shown was made or changed by a \
machine, the people in it included, so describing them raises no privacy concern.
Look at the images, apply the rules in the question, and answer with one JSON object in exactly \
the form the question shows, with nothing before or after it. Keep the reasoning to one or two \
short sentences."""

_SC = """\
RULES
You are shown several images. The last one is the result of an edit. Every image before it is an \
input the edit started from; the first of them is the image that was edited.
Judge how well the result carries out the editing instruction below. Editing can fail, so the \
result may look the same as the input.

Give two scores, each a number from 0 to 10:
1. Edit success: 0 when the result does nothing the instruction asks, 10 when it does exactly \
what the instruction asks.
2. Over-editing: 0 when the result has become a different picture from the input, 10 when only \
what the instruction names has changed and everything else is kept.

Answer in this form, the two scores in this order:
{"score": [edit_success, over_editing], "reasoning": "..."}

Editing instruction: {instruction}
"""

_PQ = """\
RULES
The image was made by an AI model. Judge how good it is as a picture, whatever it shows.

Give two scores, each a number from 0 to 10:
1. Naturalness: 0 when the scene feels unnatural (wrong distances, shadows, lighting or \
perspective), 10 when it looks natural.
2. Artifacts: 0 when much of the image is distorted, smeared, watermarked or scratched, or has \
blurred faces, malformed body parts or subjects that do not fit together; 10 when it has no \
artifacts.

Answer in this form, the two scores in this order:
{"score": [naturalness, artifacts], "reasoning": "..."}
"""

_PAIRWISE = """\
RULES
You are shown several images. The last two are two results of the same edit: the second to last \
is edit A, the last is edit B. Every image before them is an input the edit started from; the \
first of them is the image that was edited.
Compare A and B on one aspect only: {axis}
Name the better one on that aspect, or "tie" when neither is clearly better. The order in which \
they are shown says nothing about which is better.

Answer with one JSON object, where winner is "A", "B" or "tie":
{"winner": "...", "reasoning": "..."}

Editing instruction: {instruction}
"""

_STEP1X = PromptSet(name=OURS, version="1", system=_SYSTEM, sc=_SC, pq=_PQ, pairwise=_PAIRWISE)


def load_prompts(name: str) -> PromptSet:
    """The prompt set a judge config names: ours (built in), GEdit-Bench's (from lmms-eval), or
    a team's own in a YAML file (``name``, ``version``, ``sc``, ``pq``, optional ``system``,
    ``pairwise``, ``sc_scores``, ``pq_scores``; what it leaves out is ours). Resolved once by the
    driver: the workers get the set itself, not its name."""
    if name == OURS:
        return _STEP1X
    if name == GEDIT:
        return _gedit()
    if name.endswith((".yaml", ".yml", ".json")):
        return _from_file(name)
    raise JobRefused(f"unknown judge prompt set {name!r}; use {OURS!r}, {GEDIT!r} or a .yaml file.")


def _from_file(path: str) -> PromptSet:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise JobRefused(f"judge.prompts: cannot read the prompt set {path}: {e}") from None
    fields = set(PromptSet.__dataclass_fields__)
    if not isinstance(data, dict) or not {"name", "version", "sc", "pq"} <= set(data) or set(data) - fields:
        raise JobRefused(f"judge.prompts: {path} must be a mapping with name, version, sc and pq "
                         f"(and optionally {sorted(fields - {'name', 'version', 'sc', 'pq'})}), nothing else")
    try:
        return PromptSet(**{**asdict(_STEP1X), **{k: (str(v) if k not in ("sc_scores", "pq_scores") else int(v))
                                                   for k, v in data.items()}})
    except (ValueError, TypeError) as e:
        raise JobRefused(f"judge.prompts: {path}: {e}") from None


def _gedit_texts() -> tuple[dict[str, str | None], str]:
    """GEdit-Bench's prompt strings and the package version, read from the installed file.

    The module is parsed, not imported: importing it runs lmms_eval.tasks' and the viescore
    package's __init__ (the whole task registry, an OpenAI client); the strings are all we need."""
    try:
        spec = importlib.util.find_spec(GEDIT_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise JobRefused(f"judge prompts 'gedit' need the lmms-eval package; install it with {GEDIT_EXTRA}.")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*GEDIT_PROMPTS_FILE)
    try:
        version = importlib.metadata.version(GEDIT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        tree = ast.Module(body=[], type_ignores=[])
    texts: dict[str, str | None] = {}  # the last assignment wins, as on import; a computed value is None
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            constant = isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
            texts[node.targets[0].id] = node.value.value if constant else None
    missing = [n for n in GEDIT_NAMES if texts.get(n) is None]
    if missing:
        raise JobRefused(
            f"the installed lmms-eval {version} has no GEdit-Bench VIEScore prompts "
            f"({'/'.join(GEDIT_PROMPTS_FILE)} lacks {', '.join(missing)}); install a version that has them with {GEDIT_EXTRA}."
        )
    return texts, version


def _gedit() -> PromptSet:
    """GEdit-Bench's VIEScore("tie") prompts as it sends them: one user message, no system message,
    SC = context + two-image edit rule + SC rule with <instruction> filled, PQ = context + PQ rule."""
    texts, version = _gedit_texts()
    context = texts["_context_no_delimit"]
    sc = "\n".join([context, texts["_prompts_0shot_two_image_edit_rule"], texts["_prompts_0shot_tie_rule_SC"]])
    pq = "\n".join([context, texts["_prompts_0shot_rule_PQ"]])
    return PromptSet(
        name=GEDIT,
        version=version,
        system="",
        sc=sc.replace("<instruction>", "{instruction}"),
        pq=pq,
        pairwise=_PAIRWISE,
    )
