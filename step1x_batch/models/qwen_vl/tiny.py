"""A tiny, offline Qwen2.5-VL folder in the official release layout, made from a seed.

Both families condition on Qwen2.5-VL, so their tiny releases need one that loads through exactly
the code path of the real `Qwen2.5-VL-7B-Instruct/` folder (transformers `from_pretrained`, old-style flat config.json,
old-style checkpoint key names, tokenizer files, preprocessor config) without any download. The
tokenizer is a byte-level BPE built in code that keeps the properties the conditioner relies on:
GPT-2 byte order (so id 0 is `!`, the token the reference masks), Qwen's pre-tokenizer regex and NFC
normalizer, single-token curly quotes, and Qwen's special tokens after the regular vocabulary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# The split regex of Qwen2 / Qwen2.5 tokenizers (tokenizer.json `pre_tokenizer`).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5-VL added tokens in id order (they follow the regular vocabulary); True = special.
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

# The chat template shipped in Qwen2.5-VL-7B-Instruct's tokenizer_config.json.
QWEN25_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Words every tiny vocabulary learns as single tokens (besides the caller's corpus).
_EXTRA_CORPUS = """
system user assistant You are a helpful assistant.
make it a cat's face turn the sky red blue green yellow black white orange purple pink brown gray
change remove add replace the background into to of in on at with and or for from by as is are be
this that these those its it's don't can't won't I'm you're we've they'll he'd
person people man woman girl boy dog cat car house tree flower water sky sun moon night day
style color hat glasses text sign word words letter photo picture image painting cartoon anime
write say reads saying called named title logo brand label old new big small large tiny bright dark
"Hello" 'world' “quoted” ‘single’ “ ” ‘ ’ ! ? . , : ; - ( ) [ ] 0 1 2 3 4 5 6 7 8 9
猫 狗 红色 天空 把 背景 换成 变成 文字
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _qwen_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )


def _corpus_words(texts: list[str]) -> list[str]:
    """Pre-tokenize with Qwen's regex; every piece becomes one training "word"."""
    split = pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False)
    words = [piece for text in texts for piece, _ in split.pre_tokenize_str(text)]
    # The curly quotes on their own: the conditioner strips them as single wrapper tokens.
    return words + ["“", "”"]


def build_tiny_tokenizer(corpus: Sequence[str] = ()) -> Tokenizer:
    """Byte-level BPE with Qwen's normalizer, pre-tokenizer and added tokens.

    Ids 0..255 are the 256 byte characters in GPT-2 order (id 0 == `!`, 198 == `\\n`, 220 == ` `,
    as in Qwen's vocabulary); merged tokens follow in merge order; the Qwen added tokens come last.
    Every pre-tokenized word of ``corpus`` (a family's prompt template, say), of the chat template
    text and of a few common edit words ends up a single token.
    """
    corpus = [*corpus, _EXTRA_CORPUS]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=100_000, min_frequency=1, show_progress=False, initial_alphabet=alphabet, special_tokens=[]
    )
    trainer_tok.train_from_iterator(_corpus_words(corpus), trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]["merges"]  # [a, b] pairs (or "a b" in old versions)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained]

    byte_chars = sorted(bytes_to_unicode().values(), key=ord)  # == GPT-2 / Qwen id order
    vocab = {c: i for i, c in enumerate(byte_chars)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _qwen_pre_tokenizer()
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.add_tokens(
        [AddedToken(t, special=s, normalized=False, lstrip=False, rstrip=False, single_word=False)
         for t, s in QWEN_ADDED_TOKENS]
    )
    return tok


def _tokenizer_config(tok: Tokenizer) -> dict:
    added = {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": s,
        }
        for t, s in QWEN_ADDED_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t, s in QWEN_ADDED_TOKENS[1:] if s],
        "bos_token": None,
        "chat_template": QWEN25_VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def tiny_qwen_config(tok: Tokenizer, hidden_size: int = 64) -> dict:
    """config.json in the flat layout of the official Qwen2.5-VL-7B-Instruct release, tiny sizes."""
    heads, kv_heads = 4, 2
    if hidden_size % (2 * heads) or hidden_size < 32:
        raise ValueError(f"hidden_size must be a multiple of {2 * heads} and >= 32, got {hidden_size}")
    half = hidden_size // heads // 2  # mrope sections cover head_dim / 2 rotary frequencies
    side = 3 * half // 8  # the 7B model's [16, 24, 24] proportions over 64
    mrope_section = [half - 2 * side, side, side]
    n_tokens = tok.get_vocab_size(with_added_tokens=True)
    ids = {t: tok.token_to_id(t) for t, _ in QWEN_ADDED_TOKENS}
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": 2 * hidden_size,
        "max_position_embeddings": 32768,
        "max_window_layers": 2,
        "num_attention_heads": heads,
        "num_hidden_layers": 2,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": mrope_section},
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": -(-n_tokens // 64) * 64,
        "vision_config": {
            "depth": 2,
            "hidden_act": "silu",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "in_chans": 3,
            "out_hidden_size": hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
        },
    }


PREPROCESSOR_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}


def _checkpoint_name(name: str) -> str:
    """transformers 5 module names -> the key names of the official Qwen2.5-VL checkpoint files."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def random_qwen_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights, scaled so activations stay O(1) (attention is far from uniform).

    Drawn by this module (not by transformers' initialisers) so a seed gives the same weights
    whatever the transformers version; names are those of the official checkpoint files.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, p in sorted(model.state_dict().items()):
        shape = tuple(p.shape)
        if len(shape) == 1 and ("norm" in name or "ln_q" in name):  # RMSNorm gains
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=gen)
        elif "embed_tokens" in name:
            t = torch.randn(shape, generator=gen)
        else:
            fan_in = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else shape[0]
            t = torch.randn(shape, generator=gen) / fan_in**0.5
        out[_checkpoint_name(name)] = t.to(torch.float32).contiguous()
    return out


def write_tiny_qwen(
    folder: str | os.PathLike, seed: int = 0, hidden_size: int = 64, corpus: Sequence[str] = ()
) -> None:
    """Write a complete offline Qwen2.5-VL transformers folder (config, safetensors, tokenizer,
    preprocessor config) that loads like the real one; ``corpus`` texts tokenize to few tokens."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(corpus)
    config = tiny_qwen_config(tok, hidden_size=hidden_size)
    weights = random_qwen_state_dict(config, seed=seed)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(_tokenizer_config(tok), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    model_json = json.loads(tok.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model_json["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = ["#version: 0.2"] + [" ".join(m) if not isinstance(m, str) else m for m in model_json["merges"]]
    (folder / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n", encoding="utf-8")
