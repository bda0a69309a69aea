"""The GPU half of Qwen2.5-VL conditioning: prepared ids and pixels in, last hidden states out.

The vision tower runs once per input image, however many prompts (instruction, negative prompt)
read that image: its features are scattered into each prompt's embeddings, and the text model
runs on the prompts with the rope positions the CPU prepare stage computed.

``batch_invariant`` (the default): every image goes through the vision tower alone and every
prompt through the text model alone, at its own length, so a prompt's hidden states are bit for
bit those of encoding it alone, whatever shares its batch (in a padded batch a bf16 prompt's
states move by ~0.03 with its companions' lengths). It is also how the released code encodes
(one prompt per call). The encoder is ~0.1 % of an edit's FLOPs, so exactness costs little.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from step1x_batch.models.qwen_vl.processor import TextInput


class QwenVLEncoder:
    """Qwen2.5-VL as a conditioning encoder.

    ``zero_masked_queries``: zero the attention output at masked query positions, which is what
    flash-attention's unpadding gives for a 2-D mask with zeros (Step1X-Edit's reference ran that
    way; its mask has zeros inside a prompt, not only as padding). Padding is unaffected either way.
    """

    def __init__(self, model, *, zero_masked_queries: bool = False, batch_invariant: bool = True) -> None:
        self.model = model
        self.zero_masked_queries = zero_masked_queries
        self.batch_invariant = batch_invariant
        self.hidden_size: int = model.config.text_config.hidden_size
        self.image_token_id: int = model.config.image_token_id
        self._query_keep: Tensor | None = None
        for layer in model.model.language_model.layers:
            layer.self_attn.register_forward_hook(self._mask_attention_output)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        *,
        attn_implementation: str = "sdpa",
        zero_masked_queries: bool = False,
        batch_invariant: bool = True,
    ) -> "QwenVLEncoder":
        """Load a local Qwen2.5-VL folder: safetensors only, no remote code, no network. A
        checkpoint whose keys do not match the config is refused with one message naming every
        missing, unexpected and wrong-shape key (transformers itself only warns and leaves those
        weights random)."""
        from transformers import Qwen2_5_VLForConditionalGeneration

        from step1x_batch.models.loading import PICKLE_SUFFIXES, WeightsError, read_header

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise WeightsError(f"{folder}: no Qwen2.5-VL folder here (expected config.json, tokenizer, safetensors)")
        shards = sorted(folder.glob("*.safetensors"))
        if not shards:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            found = f"only pickle checkpoints ({', '.join(pickles)}); refusing to load them" if pickles else "none"
            raise WeightsError(f"{folder}: no .safetensors weights for the text encoder, found {found}")
        for shard in shards:
            read_header(shard)  # a truncated or corrupt shard is named here, not deep in transformers
        device = torch.device(device)
        extra = {}
        if device.type != "cpu" and importlib.util.find_spec("accelerate") is not None:
            extra["device_map"] = {"": device}  # straight to the device, no full host copy
        model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(folder),
            dtype=dtype,
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
            attn_implementation=attn_implementation,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below, with the other bad keys
            **extra,
        )
        parts = []
        for title, keys in (
            ("missing", sorted(k for k in info.get("missing_keys", ()) if k != "lm_head.weight")),  # never used
            ("unexpected", sorted(info.get("unexpected_keys", ()))),
            ("wrong shape", sorted(f"{k}: file {tuple(a)} vs model {tuple(b)}" for k, a, b in info.get("mismatched_keys", ()))),
        ):
            if keys:
                parts.append(f"{title} ({len(keys)}): " + ", ".join(keys))
        if parts:
            raise WeightsError("; ".join([f"{folder}: weights do not match the model"] + parts))
        model = model.to(device)
        model.lm_head = torch.nn.Identity()  # never used: hidden states only (saves ~1 GB for 7B)
        model.eval().requires_grad_(False)
        return cls(model, zero_masked_queries=zero_masked_queries, batch_invariant=batch_invariant)

    @property
    def device(self) -> torch.device:
        return self.model.model.language_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.language_model.embed_tokens.weight.dtype

    def _mask_attention_output(self, module, args, output):
        keep = self._query_keep
        if keep is None:
            return output
        attn_output, *rest = output
        return (attn_output * keep.to(attn_output.dtype), *rest)

    @contextmanager
    def _zeroing(self, attention_mask: Tensor):
        self._query_keep = attention_mask[..., None] if self.zero_masked_queries else None
        try:
            yield
        finally:
            self._query_keep = None

    @torch.inference_mode()
    def image_features(self, pixel_values: Sequence[np.ndarray], grids: Sequence[np.ndarray]) -> list[Tensor]:
        """Vision-tower features of each image, (tokens_i, hidden): one tower call per image when
        batch invariant, else one call for all of them."""
        if not pixel_values:
            return []
        if self.batch_invariant and len(pixel_values) > 1:
            return [self._image_features([p], [g])[0] for p, g in zip(pixel_values, grids)]
        return self._image_features(pixel_values, grids)

    def _image_features(self, pixel_values: Sequence[np.ndarray], grids: Sequence[np.ndarray]) -> list[Tensor]:
        dev = self.device
        pixels = torch.from_numpy(np.concatenate(pixel_values)).to(dev)
        grid = torch.from_numpy(np.stack([np.asarray(g, dtype=np.int64) for g in grids])).to(dev)
        out = self.model.model.get_image_features(pixels, grid, return_dict=True)
        return list(out.pooler_output)

    @torch.inference_mode()
    def hidden_states(self, prompts: Sequence[TextInput], features: Sequence[Sequence[Tensor]]) -> list[Tensor]:
        """Last hidden layer (after the final norm) of each prompt, (L_i, hidden).

        ``features[i]`` are the image features of prompt i's image blocks, in order. Batch
        invariant: one prompt per call, unpadded; otherwise right padded into one batch (the text
        model is causal, so real tokens see the same values, up to floating-point reordering).
        """
        if self.batch_invariant and len(prompts) > 1:
            return [self._hidden_states([p], [f])[0] for p, f in zip(prompts, features)]
        return self._hidden_states(prompts, features)

    def _hidden_states(self, prompts: Sequence[TextInput], features: Sequence[Sequence[Tensor]]) -> list[Tensor]:
        dev = self.device
        lengths = [int(p.ids.size) for p in prompts]
        width = max(lengths)
        n = len(prompts)
        ids = torch.zeros((n, width), dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        positions = torch.ones((3, n, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : lengths[i]] = torch.from_numpy(np.asarray(p.ids, dtype=np.int64))
            mask[i, : lengths[i]] = torch.from_numpy(np.asarray(p.mask, dtype=np.int64))
            positions[:, i, : lengths[i]] = torch.from_numpy(np.asarray(p.positions, dtype=np.int64))
        ids, mask, positions = ids.to(dev), mask.to(dev), positions.to(dev)
        embeds = self.model.model.get_input_embeddings()(ids)
        for i, feats in enumerate(features):
            slots = (ids[i] == self.image_token_id).nonzero()[:, 0]
            if feats:
                stacked = torch.cat(list(feats)).to(embeds.dtype)
                if stacked.shape[0] != slots.numel():
                    raise ValueError(f"prompt {i} has {slots.numel()} image tokens for {stacked.shape[0]} features")
                embeds[i, slots] = stacked
            elif slots.numel():
                raise ValueError(f"prompt {i} has image tokens but no image features")
        with self._zeroing(mask):
            out = self.model.model.language_model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
            )
        hidden = out.last_hidden_state
        return [hidden[i, : lengths[i]] for i in range(n)]
