"""LoRA adapters merged into a loaded denoiser's weights at load time (no per-step cost).

One reader for every common file layout, for both families (the Step1X-Edit DiT and diffusers'
``QwenImageTransformer2DModel``). Unlike diffusers, which warns about (or silently ignores) keys it
does not recognise, every key of an adapter file must be used: a key that is not part of a LoRA
pair, a pair whose target does not exist in the model, or a shape that does not fit refuses the
whole set of adapters, with one :class:`~step1x_batch.models.loading.WeightsError` naming every
problem, before any weight is changed.

Key spellings read (``<m>`` is a module name of the model, e.g. ``transformer_blocks.0.attn.to_q``
or ``double_blocks.0.img_attn.qkv``; ``<flat>`` is ``<m>`` with ``.`` -> ``_``):

=============  =================================================================================
format         keys
=============  =================================================================================
``peft``       ``<m>.lora_A.weight`` / ``<m>.lora_B.weight`` (PEFT, diffusers), the older diffusers
(alias         ``<m>.lora.down.weight`` / ``<m>.lora.up.weight``, and ``<m>.lora_down.weight`` /
``diffusers``) ``<m>.lora_up.weight`` (ComfyUI, musubi-tuner); optional ``<m>.alpha`` or
               ``<m>.lora_alpha``, or diffusers' ``lora_adapter_metadata`` (a PEFT ``LoraConfig``:
               ``lora_alpha``, ``alpha_pattern``, ``use_rslora``) in the safetensors header.
               ``<m>`` may carry a ``transformer.``, ``base_model.model.``, ``diffusion_model.``
               or ``model.diffusion_model.`` prefix.
``kohya``      ``lora_unet_<flat>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``; ``<flat>``
               is resolved against the model's own module names (underscores are ambiguous).
``diffsynth``  ``<m>.lora_A.default.weight`` / ``<m>.lora_B.default.weight`` (x1.0).
``step1x``     Step1X-Edit's own: kohya keys over the native DiT names, e.g.
               ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` (qkv fused); only with
               ``family="step1x"``.
``auto``       any of the above, key by key.
=============  =================================================================================

Refused with a clear message: text-encoder keys (``lora_te_``, ``lora_te1_``, ``text_encoder.``:
only the denoiser is merged), LoRA biases (``lora_B.bias``), DoRA (``dora_scale``,
``lora_magnitude_vector``), LyCORIS (``hada_``, ``lokr_``, ``lora_mid``), conv LoRAs, and anything
else. A PEFT ``adapter_config.json`` beside the file is not read: the alpha must be in the file.

Targets are ``nn.Linear`` modules (``Fp8Linear`` included, see :func:`merge_adapters`).
Several named sets on one resident model, switched with the same bytes as a merge at load:
:class:`step1x_batch.models.adapter_sets.AdapterSwitcher` (it shares :func:`plan_contributions`,
:func:`lora_delta` and :func:`fp8_merged` with :func:`merge_adapters`).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from safetensors import safe_open
from torch import nn

from step1x_batch.models.base import ADAPTER_FORMATS, AdapterSpec, normalized_format
from step1x_batch.models.loading import FP8_DTYPES, WeightsError, read_header

FAMILIES = ("step1x", "qwen-image-edit")
FORMATS = ADAPTER_FORMATS
# Prefixes in front of a module name, stripped only when the name as written is not in the model.
MODULE_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
KOHYA_PREFIX = "lora_unet_"
# An fp8 weight keeps the merge only when the change it stores is within this relative error
# (Frobenius norm) of the adapter's change; see merge_adapters.
FP8_MAX_DELTA_ERROR = 0.5
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_TEXT_ENCODER = re.compile(r"^(lora_te\d*_|text_encoder(_\d+)?\.)")
_UNSUPPORTED = (  # (pattern in a key, what it is)
    (re.compile(r"\.lora_B(\.default)?\.bias$|\.lora_up\.bias$"), "LoRA bias terms are not supported"),
    (re.compile(r"(\.|^)(dora_scale|lora_magnitude_vector)(\.|$)"), "DoRA adapters are not supported"),
    (re.compile(r"(\.|^)(hada_|lokr_|lora_mid|lokr\.|oft_)"),
     "LyCORIS (LoHa / LoKr / LoCon-Tucker / OFT) adapters are not supported"),
)
# (suffix, role, spelling). Longest first: ".lora_A.default.weight" before ".lora_A.weight".
_SUFFIXES = (
    (".lora_A.default.weight", "down", "diffsynth"),
    (".lora_B.default.weight", "up", "diffsynth"),
    (".lora_A.weight", "down", "peft"),
    (".lora_B.weight", "up", "peft"),
    (".lora.down.weight", "down", "peft"),
    (".lora.up.weight", "up", "peft"),
    (".lora_down.weight", "down", "kohya"),
    (".lora_up.weight", "up", "kohya"),
    (".lora_alpha", "alpha", None),
    (".alpha", "alpha", None),
)
# Which (spelling, naming) each format reads; naming is "dotted" (<m>) or "flat" (lora_unet_<flat>).
_ACCEPTS = {
    "peft": {("peft", "dotted"), ("kohya", "dotted")},
    "kohya": {("kohya", "flat")},
    "step1x": {("kohya", "flat")},
    "diffsynth": {("diffsynth", "dotted")},
}
_ACCEPTS["auto"] = set().union(*_ACCEPTS.values())
_EXAMPLES = {
    "peft": "<module>.lora_A.weight / .lora_B.weight (or .lora.down/.lora.up, .lora_down/.lora_up)",
    "kohya": "lora_unet_<module_path>.lora_down.weight / .lora_up.weight / .alpha",
    "step1x": "lora_unet_<native_dit_path>.lora_down.weight / .lora_up.weight / .alpha",
    "diffsynth": "<module>.lora_A.default.weight / .lora_B.default.weight",
}
_METADATA_KEY = "lora_adapter_metadata"


def as_spec(adapter: Any) -> AdapterSpec:
    """An :class:`AdapterSpec` from one, a mapping, or anything with ``path``, ``scale`` and
    ``format`` attributes."""
    if isinstance(adapter, AdapterSpec):
        return adapter
    if isinstance(adapter, Mapping):
        return AdapterSpec(**adapter)
    return AdapterSpec(adapter.path, getattr(adapter, "scale", 1.0), getattr(adapter, "format", "auto"))


# --- the model's names ---------------------------------------------------------------------------


class _ModelIndex:
    """The model's modules by name, and by kohya's flattened name (``.`` -> ``_``)."""

    def __init__(self, module: nn.Module):
        self.modules: dict[str, nn.Module] = {}
        self.order: dict[str, int] = {}
        for i, (name, child) in enumerate(module.named_modules()):
            if not name:
                continue
            self.order[name] = i
            self.modules[name] = child
            plain = name.replace("_orig_mod.", "")  # a torch.compile wrapper's extra level
            if plain != name:
                self.modules.setdefault(plain, child)
                self.order.setdefault(plain, i)
        self.flat: dict[str, list[str]] = {}
        for name in self.modules:
            self.flat.setdefault(name.replace(".", "_"), []).append(name)

    def resolve_dotted(self, base: str) -> str | None:
        candidates, seen = [base], set()
        while candidates:
            name = candidates.pop(0)
            if name in seen:
                continue
            seen.add(name)
            if name in self.modules:
                return name
            candidates += [name[len(p):] for p in MODULE_PREFIXES if name.startswith(p)]
        return None

    def resolve_flat(self, flat: str) -> tuple[str | None, list[str]]:
        """(the module, or None; the candidates when ambiguous)."""
        names = self.flat.get(flat, [])
        linear = [n for n in names if isinstance(self.modules[n], nn.Linear)]
        pick = linear or names
        if len(set(map(id, (self.modules[n] for n in pick)))) > 1:
            return None, pick
        return (pick[0] if pick else None), []


# --- reading one adapter -------------------------------------------------------------------------


@dataclass
class LoraPair:
    """One LoRA pair of a file, resolved against the model."""

    base: str  # the module name as the file writes it
    target: str  # the module of the model it changes
    down: str  # key of lora_down / lora_A (rank, in)
    up: str  # key of lora_up / lora_B (out, rank)
    alpha_key: str | None
    rank: int
    ratio: float = 1.0  # alpha / rank (alpha / sqrt(rank) with rsLoRA), 1.0 without an alpha


@dataclass
class AdapterPlan:
    """A checked adapter: its pairs, ready to merge."""

    spec: AdapterSpec
    format: str
    pairs: list[LoraPair] = field(default_factory=list)


def _parse_key(key: str) -> tuple[str, str, str | None, str] | None:
    """key -> (base, role, spelling, naming) or None."""
    for suffix, role, spelling in _SUFFIXES:
        if key.endswith(suffix):
            base = key[: -len(suffix)]
            if not base:
                return None
            if base.startswith(KOHYA_PREFIX):
                return base[len(KOHYA_PREFIX):], role, spelling, "flat"
            return base, role, spelling, "dotted"
    return None


def _config_for(metadata: Mapping[str, str] | None) -> dict[str, Any] | None:
    """diffusers' ``lora_adapter_metadata`` (a LoraConfig dict, keys maybe ``transformer.``-prefixed)."""
    if not metadata or not metadata.get(_METADATA_KEY):
        return None
    raw = json.loads(metadata[_METADATA_KEY])
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    if any(k.startswith("transformer.") for k in raw):
        raw = {k[len("transformer."):]: v for k, v in raw.items() if k.startswith("transformer.")}
    return raw


def _pattern_value(patterns: Mapping[str, Any] | None, name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def plan_adapter(
    module: nn.Module | _ModelIndex, spec: AdapterSpec, family: str
) -> tuple[AdapterPlan | None, list[str]]:
    """Check one adapter against the model without changing anything: (its plan, or None; the
    problems found, each naming the file and the key). Reads the file's tensors to check alphas and
    finiteness, holds none of them."""
    index = module if isinstance(module, _ModelIndex) else _ModelIndex(module)
    where = str(spec.path)
    fmt = normalized_format(spec.format)
    refused = _spec_problem(spec, fmt, family)
    if refused:
        return None, [refused]
    try:
        header = read_header(spec.path)
        with safe_open(str(spec.path), framework="pt", device="cpu") as f:
            metadata = f.metadata()
    except WeightsError as e:
        return None, [str(e)]
    except Exception as e:  # noqa: BLE001 - the deserializer's own complaint
        return None, [f"{where}: cannot read the adapter ({e})"]
    config, problems = _read_config(metadata, where)
    keys = _group_keys(header, fmt, where)
    problems += keys.problems + keys.stray_key_problems(where)
    pairs, unresolved = _resolve_pairs(keys, header, index, config, where, problems)
    if keys.wrong_format:
        problems.append(f"{where}: keys not in the {fmt!r} format ({_EXAMPLES.get(fmt, '')}): "
                        f"{', '.join(sorted(keys.wrong_format))}")
    if unresolved:
        msg = f"{where}: LoRA pairs whose module is not in the {family} model: {', '.join(unresolved)}"
        hint = _other_family_hint(unresolved, family)
        problems.append(msg + (f" ({hint})" if hint else ""))
    if problems:
        return None, problems
    problems = _read_alphas(spec, pairs, config)
    if problems:
        return None, problems
    if not pairs:
        return None, [f"{where}: no LoRA pairs in the file"]
    return AdapterPlan(spec, fmt, pairs), []


def _spec_problem(spec: AdapterSpec, fmt: str, family: str) -> str | None:
    """What the spec itself gets wrong (format, scale), before the file is opened."""
    where = str(spec.path)
    if fmt not in FORMATS:
        return f"{where}: unknown adapter format {spec.format!r}; use one of {', '.join(FORMATS)} (or diffusers = peft)"
    if fmt == "step1x" and family != "step1x":
        return f"{where}: format 'step1x' is Step1X-Edit's own LoRA format; this model is {family!r}"
    if not math.isfinite(spec.scale):
        return f"{where}: scale {spec.scale!r} is not a finite number"
    return None


def _read_config(metadata: Mapping[str, str] | None, where: str) -> tuple[dict | None, list[str]]:
    """The header's PEFT config (diffusers' ``lora_adapter_metadata``), and its problems."""
    try:
        config = _config_for(metadata)
    except ValueError as e:  # json.JSONDecodeError included
        return None, [f"{where}: unreadable {_METADATA_KEY} in the header ({e})"]
    if config and config.get("use_dora"):
        return config, [f"{where}: {_METADATA_KEY} says use_dora; DoRA adapters are not supported"]
    return config, []


@dataclass
class _KeyGroups:
    """A file's keys sorted out: each module's (down, up, alpha) keys, and the keys that are none."""

    groups: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)  # (naming, base) -> role -> key
    text_encoder: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    wrong_format: list[str] = field(default_factory=list)
    wrong_bases: set[tuple[str, str]] = field(default_factory=set)
    unsupported: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # two keys for one role of one module

    def stray_key_problems(self, where: str) -> list[str]:
        problems = []
        if self.text_encoder:
            problems.append(f"{where}: text-encoder LoRA keys ({len(self.text_encoder)}); only the denoiser is "
                            f"merged, use an adapter without them: {', '.join(self.text_encoder)}")
        for kind, keys in self.unsupported.items():
            problems.append(f"{where}: {kind}: {', '.join(keys)}")
        if self.foreign:
            problems.append(f"{where}: keys that are not part of a LoRA pair: {', '.join(self.foreign)}")
        return problems


def _group_keys(header: Mapping[str, dict], fmt: str, where: str) -> _KeyGroups:
    keys = _KeyGroups()
    for key in sorted(header):
        if _TEXT_ENCODER.match(key):
            keys.text_encoder.append(key)
            continue
        kind = next((what for pattern, what in _UNSUPPORTED if pattern.search(key)), None)
        if kind:
            keys.unsupported.setdefault(kind, []).append(key)
            continue
        parsed = _parse_key(key)
        if parsed is None:
            keys.foreign.append(key)
            continue
        base, role, spelling, naming = parsed
        if role != "alpha" and (spelling, naming) not in _ACCEPTS[fmt]:
            keys.wrong_format.append(key)
            keys.wrong_bases.add((naming, base))
            continue
        slot = keys.groups.setdefault((naming, base), {})
        if role in slot:
            keys.problems.append(f"{where}: {key} and {slot[role]} both give the {role} weight of one module")
            continue
        slot[role] = key
    return keys


def _resolve_pairs(keys: _KeyGroups, header: Mapping[str, dict], index: _ModelIndex, config: dict | None,
                   where: str, problems: list[str]) -> tuple[list[LoraPair], list[str]]:
    """Each module's keys -> a pair checked against the model (appending to ``problems``), and the
    down keys whose module the model lacks."""
    pairs: list[LoraPair] = []
    unresolved: list[str] = []
    by_target: dict[str, str] = {}
    for (naming, base), slot in sorted(keys.groups.items()):
        if (naming, base) in keys.wrong_bases:  # reported with the wrong-format keys (with its alpha, if any)
            keys.wrong_format += [k for k in slot.values() if k not in keys.wrong_format]
            continue
        down, up = slot.get("down"), slot.get("up")
        if down is None or up is None:
            missing = "down (lora_A / lora_down)" if down is None else "up (lora_B / lora_up)"
            problems.append(f"{where}: {', '.join(sorted(slot.values()))}: no {missing} weight to pair with")
            continue
        target, problem = _target(index, naming, base, down, where)
        if problem:
            problems.append(problem)
            continue
        if target is None:
            unresolved.append(down)
            continue
        if target in by_target:
            problems.append(f"{where}: {down} and {by_target[target]} both change {target}")
            continue
        by_target[target] = down
        pair, problem = _check_pair(index, header, config, target, base, slot, where)
        if problem:
            problems.append(problem)
        else:
            pairs.append(pair)
    return pairs, unresolved


def _target(index: _ModelIndex, naming: str, base: str, down: str, where: str) -> tuple[str | None, str | None]:
    """The model's module a pair changes (None: not in the model), or a problem (several match)."""
    if naming != "flat":
        return index.resolve_dotted(base), None
    target, ambiguous = index.resolve_flat(base)
    if ambiguous:
        return None, f"{where}: {down}: {KOHYA_PREFIX + base} matches several modules ({', '.join(ambiguous)})"
    return target, None


def _check_pair(index: _ModelIndex, header: Mapping[str, dict], config: dict | None, target: str, base: str,
                slot: Mapping[str, str], where: str) -> tuple[LoraPair | None, str | None]:
    """One pair against its module's Linear: float dtypes, (rank, in) / (out, rank) shapes that
    fit, one alpha number at most and from one place only."""
    down, up, alpha = slot["down"], slot["up"], slot.get("alpha")
    layer = index.modules[target]
    if not isinstance(layer, nn.Linear):
        return None, f"{where}: {down}: {target} is a {type(layer).__name__}, not a Linear layer"
    bad = [k for k in (down, up) if header[k]["dtype"] not in _FLOAT_DTYPES]
    if bad:
        shown = ", ".join(f"{k} ({header[k]['dtype']})" for k in bad)
        return None, f"{where}: {shown}: not floating point"
    ds, us = tuple(header[down]["shape"]), tuple(header[up]["shape"])
    if len(ds) != 2 or len(us) != 2 or ds[0] != us[1]:
        return None, f"{where}: {down} {ds} and {up} {us} are not a (rank, in) / (out, rank) pair of matrices"
    expected = (layer.out_features, layer.in_features)
    if (us[0], ds[1]) != expected:
        return None, (f"{where}: {down} {ds} / {up} {us} give a {(us[0], ds[1])} change; "
                      f"{target} is {expected} (out, in)")
    if alpha is not None and math.prod(header[alpha]["shape"]) != 1:
        return None, f"{where}: {alpha}: shape {tuple(header[alpha]['shape'])}, expected one number"
    if alpha is not None and config is not None:
        return None, f"{where}: {alpha} and {_METADATA_KEY} both give the alpha of {target}"
    return LoraPair(base, target, down, up, alpha, ds[0]), None


def _read_alphas(spec: AdapterSpec, pairs: Sequence[LoraPair], config: dict | None) -> list[str]:
    """Set each pair's ratio from its alpha (a tensor, or the PEFT config) and check every tensor
    is finite: reads each tensor once, keeps none. Returns the problems."""
    where = str(spec.path)
    problems: list[str] = []
    try:
        with safe_open(str(spec.path), framework="pt", device="cpu") as f:
            for pair in pairs:
                alpha, rsl = None, False
                if pair.alpha_key is not None:
                    alpha = float(f.get_tensor(pair.alpha_key).float().reshape(()).item())
                elif config is not None:
                    r = _pattern_value(config.get("rank_pattern"), pair.target, config.get("r", pair.rank))
                    if int(r) != pair.rank:
                        problems.append(f"{where}: {pair.down}: rank {pair.rank}, but {_METADATA_KEY} says r={r}")
                        continue
                    alpha = float(_pattern_value(config.get("alpha_pattern"), pair.target,
                                                 config.get("lora_alpha", pair.rank)))
                    rsl = bool(config.get("use_rslora", False))
                if alpha is not None and not math.isfinite(alpha):
                    problems.append(f"{where}: {pair.alpha_key or _METADATA_KEY}: alpha {alpha} is not finite")
                    continue
                # kohya: an alpha of 0 (or none) means rank, i.e. ratio 1.
                if alpha is not None and alpha != 0:
                    pair.ratio = alpha / (math.sqrt(pair.rank) if rsl else pair.rank)
                for key in (pair.down, pair.up):
                    if not bool(torch.isfinite(f.get_tensor(key)).all()):
                        problems.append(f"{where}: {key}: holds NaN or infinite values")
    except Exception as e:  # noqa: BLE001
        problems.append(f"{where}: cannot read the adapter's tensors ({e})")
    return problems


def _other_family_hint(keys: Sequence[str], family: str) -> str:
    text = " ".join(keys)
    if family == "step1x" and re.search(r"transformer_blocks|to_q|add_q_proj|img_mlp[._]net", text):
        return "these look like Qwen-Image-Edit (diffusers) module names; is it an adapter for qwen-image-edit?"
    if family == "qwen-image-edit" and re.search(r"double_blocks|single_blocks", text):
        return "these look like Step1X-Edit / Flux module names; is it an adapter for step1x?"
    return ""


# --- merging -------------------------------------------------------------------------------------


def merge_adapters(module: nn.Module, adapters: Sequence[AdapterSpec], *, family: str) -> list[str]:
    """Merge every adapter into ``module`` (the denoiser) in place; returns the names of the
    modules changed, in the model's order.

    Each LoRA pair changes its Linear's weight ``W <- W + scale * s * up @ down``, with ``up`` =
    lora_B / lora_up (out, rank) and ``down`` = lora_A / lora_down (rank, in). ``s`` is the file's
    own ``alpha / rank`` when the file gives an alpha for that module (a ``.alpha`` / ``.lora_alpha``
    tensor, or diffusers' ``lora_adapter_metadata``; ``alpha / sqrt(rank)`` with rsLoRA) and 1.0
    when it does not (as diffusers does; an alpha of 0 means rank, as kohya does). ``scale``, the
    spec's multiplier, is therefore the same number as diffusers' LoRA scale
    (``attention_kwargs={"scale": s}`` / ``fuse_lora(lora_scale=s)``), kohya's and Step1X-Edit's
    ``multiplier`` and DiffSynth's ``alpha``. All adapters' changes to one weight are summed in
    float32 and added to the float32 weight, then cast back to the weight's dtype once.

    ``Fp8Linear`` weights (fp8 storage) stay fp8: the merged weight is rounded to fp8 again. As
    the stored weights already lie on the fp8 grid, a change smaller than half an fp8 step (3 to
    6 % of the weight in e4m3) is rounded away; when the change the fp8 weight keeps differs from the
    adapter's by more than ``FP8_MAX_DELTA_ERROR`` (relative, Frobenius) the adapters are refused
    (load the DiT without fp8 storage to use them) rather than merged in name only.

    Raises :class:`WeightsError` naming every problem of every adapter at once (keys that are not
    part of a LoRA pair, pairs whose module is not in ``module``, e.g. an adapter for the other
    family, shapes that do not fit, unknown formats, text-encoder keys, non-finite values); nothing
    is merged then.
    """
    if family not in FAMILIES:
        raise WeightsError(f"adapters: unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    adapters = [as_spec(a) for a in adapters]
    if not adapters:
        return []
    index = _ModelIndex(module)
    plans, contributions = plan_contributions(index, adapters, family)
    targets = list(contributions)

    with contextlib.ExitStack() as stack:
        stack.enter_context(full_float32_matmuls())
        files = {id(p): stack.enter_context(safe_open(str(p.spec.path), framework="pt", device="cpu"))
                 for p in plans}

        def merged(name: str) -> torch.Tensor:
            """The sum of every adapter's change to ``name``'s weight, in float32."""
            weight = index.modules[name].weight
            terms = ((f.get_tensor(pair.up).to(weight.device, torch.float32),
                      f.get_tensor(pair.down).to(weight.device, torch.float32), plan.spec.scale * pair.ratio)
                     for plan, pair in contributions[name] for f in (files[id(plan)],))
            return lora_delta(weight.shape, weight.device, terms)

        fp8 = _merged_fp8_weights(index, targets, merged, adapters)  # every check before any write
        for name in targets:
            weight = index.modules[name].weight
            new = fp8.pop(name) if name in fp8 else (weight.detach().float() + merged(name)).to(weight.dtype)
            with torch.inference_mode(weight.is_inference()), torch.no_grad():
                weight.copy_(new)
    return targets


def plan_contributions(index: _ModelIndex, adapters: Sequence[AdapterSpec], family: str
                       ) -> tuple[list[AdapterPlan], dict[str, list[tuple[AdapterPlan, LoraPair]]]]:
    """Every adapter's plan, and each target's (plan, pair) list in the adapters' order, the
    targets in the model's order: the order :func:`merge_adapters` sums and writes in. A
    :class:`WeightsError` naming every problem of every adapter."""
    plans = _plan_all(index, adapters, family)
    contributions: dict[str, list[tuple[AdapterPlan, LoraPair]]] = {}
    for plan in plans:
        for pair in plan.pairs:
            contributions.setdefault(pair.target, []).append((plan, pair))
    return plans, {name: contributions[name] for name in sorted(contributions, key=lambda n: index.order[n])}


def lora_delta(shape: torch.Size | Sequence[int], device: torch.device | str,
               terms: Iterable[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """The summed change ``sum(alpha * up @ down)`` to one weight, in float32, in the order given.

    The one place the change is computed, so that a weight merged at load
    (:func:`merge_adapters`) and one recomputed on a switch
    (:class:`~step1x_batch.models.adapter_sets.AdapterSwitcher`) have the same bytes. ``up`` and
    ``down`` must already be float32 on ``device``; call it inside :func:`full_float32_matmuls`.
    """
    delta = torch.zeros(shape, dtype=torch.float32, device=device)
    for up, down, alpha in terms:
        delta.add_(up @ down, alpha=alpha)
    return delta


def _plan_all(index: _ModelIndex, adapters: Sequence[AdapterSpec], family: str) -> list[AdapterPlan]:
    """Every adapter's plan; a :class:`WeightsError` naming every problem of every adapter."""
    plans, problems = [], []
    for spec in adapters:
        plan, found = plan_adapter(index, spec, family)
        problems += found
        if plan is not None:
            plans.append(plan)
    if problems:
        raise WeightsError(_summary(problems))
    return plans


def _merged_fp8_weights(index: _ModelIndex, targets: Sequence[str], merged: Callable[[str], torch.Tensor],
                        adapters: Sequence[AdapterSpec]) -> dict[str, torch.Tensor]:
    """The new weights of the fp8 targets, rounded to fp8 again; a :class:`WeightsError` when one
    overflows or keeps too little of the adapters' change (``FP8_MAX_DELTA_ERROR``)."""
    fp8: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for name in targets:
        weight = index.modules[name].weight
        if weight.dtype not in FP8_DTYPES:
            continue
        new, problem = fp8_merged(name, weight.detach(), merged(name))
        if problem:
            problems.append(problem)
        fp8[name] = new
    if problems:
        raise WeightsError(_summary(problems, [str(a.path) for a in adapters]))
    return fp8


def fp8_merged(name: str, weight: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """An fp8 weight plus ``delta``, rounded to fp8 again, and the problem when the result
    overflows or keeps too little of the change (``FP8_MAX_DELTA_ERROR``), else None."""
    w32 = weight.float()
    new = (w32 + delta).to(weight.dtype)
    norm = float(delta.norm())
    kept = new.float() - w32
    err = float((kept - delta).norm()) / norm if norm > 0 else 0.0
    if not bool(torch.isfinite(new.float()).all()):
        return new, f"{name}: the merged weight overflows {weight.dtype}"
    if err > FP8_MAX_DELTA_ERROR:
        return new, (f"{name}: its {weight.dtype} weight cannot hold the adapters' change "
                     f"(rounding back to fp8 leaves an error of {err:.0%} of the change); "
                     f"load the DiT without fp8 storage to use these adapters")
    return new, None


@contextlib.contextmanager
def full_float32_matmuls():
    """``up @ down`` in true float32 even where the process allows TF32 matmuls."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _summary(problems: Sequence[str], files: Sequence[str] = ()) -> str:
    head = f"adapters refused, nothing merged ({len(problems)} problem{'s' if len(problems) != 1 else ''})"
    if files:
        head += f" [{', '.join(files)}]"
    return head + ": " + "; ".join(problems)

