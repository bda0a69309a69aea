"""The ``engine: transformers`` judge: Qwen2.5-VL ``generate`` in this process, from a local folder.

For small runs and CPU tests (the vLLM and HTTP engines serve real volumes). Greedy and seeded, and
one request at a time: padding a batch changes float results, so a request would get another answer
depending on what it was batched with; alone it gets the same answer every time.

The inputs are built here from the folder's tokenizer (its chat template) and image processor, the
way transformers' ``Qwen2_5_VLProcessor`` builds them (the test checks they are equal), because that
processor also loads a video processor that needs torchvision, which a CPU install lacks.
No Ray here: the module imports on a GPU machine without Ray.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from step1x_batch.errors import JobRefused
from step1x_batch.judge.prompts import JudgeRequest

__all__ = ["TransformersJudge", "check_folder"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
IMAGE_PAD = "<|image_pad|>"


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return False


def check_folder(folder: str) -> None:
    """Refuse (one sentence) a judge folder that cannot load: missing config, weights, tokenizer,
    chat template or image preprocessor config, so the job stops before any row instead of failing
    every row's score."""
    path = Path(folder)
    if not path.is_dir():
        raise JobRefused(f"The judge model folder {folder} does not exist or is not a folder; set judge.model "
                         "to a local Qwen2.5-VL-Instruct folder.")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / name).is_file() for name in _WEIGHTS):
        missing.append("the weights (model.safetensors or its index)")
    bpe = (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    if not ((path / "tokenizer.json").is_file() or bpe):
        missing.append("the tokenizer (tokenizer.json, or vocab.json with merges.txt)")
    elif not _has_chat_template(path):
        missing.append("a chat template (tokenizer_config.json's chat_template or chat_template.json)")
    if not (path / "preprocessor_config.json").is_file():
        missing.append("preprocessor_config.json")
    if missing:
        raise JobRefused(f"The judge model folder {folder} lacks {', '.join(missing)}; point judge.model at a "
                         "complete Qwen2.5-VL-Instruct release folder.")


def _chat_template(folder: Path, tokenizer: Any) -> str:
    """The tokenizer's chat template, else the processor's (chat_template.jinja / .json)."""
    if tokenizer.chat_template:
        return tokenizer.chat_template
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return json.loads((folder / "chat_template.json").read_text(encoding="utf-8"))["chat_template"]


def _messages(request: JudgeRequest) -> list[dict[str, Any]]:
    """The chat as Qwen2.5-VL's template reads it: images first, then the text (as the HTTP
    payload orders them); no system message when ``system`` is empty."""
    user = [{"type": "image"} for _ in request.images] + [{"type": "text", "text": request.text}]
    system = [{"role": "system", "content": [{"type": "text", "text": request.system}]}] if request.system else []
    return system + [{"role": "user", "content": user}]


class TransformersJudge:
    """In-process Qwen2.5-VL `generate` from a local folder, greedy, seeded: small runs and CPU tests."""

    def __init__(self, folder: str, device: str = "cpu", dtype: str = "float32", max_new_tokens: int = 256,
                 seed: int = 0) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        check_folder(folder)
        if dtype not in _DTYPES:
            raise JobRefused(f"The judge dtype {dtype!r} is not one of {', '.join(_DTYPES)}; set judge.dtype to one.")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device, self.max_new_tokens, self.seed = torch.device(device), int(max_new_tokens), int(seed)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.image_processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        self.chat_template = _chat_template(Path(folder), self.tokenizer)
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=_DTYPES[dtype], local_files_only=True)
        self.model.to(self.device).eval()
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        # Greedy: the release's sampling settings (temperature, top_p, top_k) do not apply;
        # its repetition penalty still does, as in a vLLM server that reads the same folder.
        self.generation = copy.deepcopy(self.model.generation_config)
        self.generation.update(do_sample=False, temperature=None, top_p=None, top_k=None,
                               max_new_tokens=self.max_new_tokens)
        if self.generation.pad_token_id is None:
            self.generation.pad_token_id = self.tokenizer.pad_token_id

    def encode(self, request: JudgeRequest) -> dict[str, torch.Tensor]:
        """The model inputs of one request, as ``Qwen2_5_VLProcessor`` builds them: the chat
        template's text with each image's pad token repeated once per merged patch."""
        text = self.tokenizer.apply_chat_template(_messages(request), chat_template=self.chat_template,
                                                  add_generation_prompt=True, tokenize=False)
        inputs: dict[str, torch.Tensor] = {}
        if request.images:
            images = [Image.open(io.BytesIO(data)).convert("RGB") for data in request.images]
            pixels = self.image_processor(images=images, return_tensors="pt")
            inputs = {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}
            merge = self.image_processor.merge_size ** 2
            pieces = text.split(IMAGE_PAD)
            if len(pieces) != len(images) + 1:
                raise ValueError(f"the chat template placed {len(pieces) - 1} images for {len(images)} given")
            counts = [int(thw.prod()) // merge for thw in pixels["image_grid_thw"]]
            text = pieces[0] + "".join(IMAGE_PAD * n + rest for n, rest in zip(counts, pieces[1:]))
        tokens = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        ids = tokens["input_ids"]
        inputs.update(input_ids=ids, attention_mask=tokens["attention_mask"],
                      mm_token_type_ids=(ids == self.image_token_id).to(torch.int64))
        return inputs

    @torch.inference_mode()
    def _one(self, request: JudgeRequest) -> str:
        inputs = {k: v.to(self.device) for k, v in self.encode(request).items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        torch.manual_seed(self.seed)
        out = self.model.generate(**inputs, generation_config=self.generation)
        new = out[0, inputs["input_ids"].shape[1]:]
        return self.tokenizer.decode(new, skip_special_tokens=True)

    def answer(self, requests: Sequence[JudgeRequest]) -> list[str]:
        """One answer text per request, in order, each asked alone (so an answer never depends on
        the other requests). An exception raises; the stage makes it that row's judge_failed."""
        return [self._one(r) for r in requests]
