"""Step1X-Edit's Qwen2.5-VL conditioning on the tiny folder (float32, CPU, offline): the CPU half
(Step1XPrompts, in the prepare stage) and the GPU half (QwenVLEncoder + encode_prompts).

Oracles: direct transformers calls on inputs built here by hand (processor output constructed from
the reference sheet), transformers' own get_rope_index for the positions, and a hand-written
MLP-only chain for the masked-token case.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from step1x_batch.models.qwen_vl.encoder import QwenVLEncoder
from step1x_batch.models.qwen_vl.tiny import write_tiny_qwen
from step1x_batch.models.step1x import conditioner as C

ATOL = 2e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen")
    write_tiny_qwen(path, seed=0, corpus=[C.load_prefix()])
    return path


@pytest.fixture(scope="module")
def prompts(folder):
    return C.Step1XPrompts.from_folder(folder)


@pytest.fixture(scope="module")
def encoder(folder):
    return QwenVLEncoder.from_pretrained(folder, device="cpu", dtype=torch.float32, zero_masked_queries=True)


def encode(prompts, encoder, images, instructions, max_length=C.MAX_LENGTH):
    """(embeds, mask) of each instruction, through the production path (prepare, then encode)."""
    rows = [prompts.prepare(img, text, "") for img, text in zip(images, instructions)]
    embeds, mask = C.encode_prompts(encoder, rows, prompts.prefix_drop, max_length)
    return embeds[: len(rows)], mask[: len(rows)]


def hidden(prompts, encoder, inputs):
    """Last hidden states of one prepared row's instruction prompt."""
    (features,) = encoder.image_features([inputs.pixel_values], [inputs.grid])
    return encoder.hidden_states([inputs.cond], [[features]])[0]


@pytest.fixture(scope="module")
def raw(folder):
    """An independent copy of the model, with lm_head, for direct transformers calls."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(folder), dtype=torch.float32, local_files_only=True, use_safetensors=True,
        attn_implementation="sdpa", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    return model.eval()


@pytest.fixture(scope="module")
def tok(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def by_hand(tok, img: np.ndarray, instruction: str, qwen_hw: tuple[int, int]):
    """Processor output for a quote-free instruction, built from the reference sheet's recipe."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    t = torch.from_numpy(img).permute(2, 0, 1).float().div(255)  # to_tensor
    pil = Image.fromarray(t.mul(255).byte().permute(1, 2, 0).numpy())  # ToPILImage
    pil = pil.resize((qwen_hw[1], qwen_hw[0]), Image.Resampling.BICUBIC)  # qwen_vl_utils
    proc = Qwen2VLImageProcessorPil(min_pixels=256 * 28 * 28, max_pixels=324 * 28 * 28)
    pix = proc(images=[pil], return_tensors="pt")
    n = int(pix["image_grid_thw"].prod()) // 4
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + C.load_prefix()
            + "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>" + instruction
            + "<|im_end|>\n<|im_start|>assistant\n")
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    return ids, pix["pixel_values"], pix["image_grid_thw"]


def direct(raw, ids, pixel_values, grid, *, token_types: bool = True, mask=None):
    kwargs = {}
    if token_types:
        kwargs["mm_token_type_ids"] = (ids == raw.config.image_token_id).int()
    with torch.inference_mode():
        out = raw(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                  pixel_values=pixel_values, image_grid_thw=grid, output_hidden_states=True, **kwargs)
    return out.hidden_states[-1][0]


@pytest.fixture(scope="module")
def plain(prompts, encoder, raw, tok):
    img = image(64, 48, seed=1)  # qwen_vl_utils: 56x56, then the processor's minimum: 448x448
    ids, pix, grid = by_hand(tok, img, "make it red", (56, 56))
    embeds, mask = encode(prompts, encoder, [img], ["make it red"])
    return dict(img=img, ids=ids, pix=pix, grid=grid, embeds=embeds, mask=mask,
                direct=direct(raw, ids, pix, grid), direct_no_types=direct(raw, ids, pix, grid, token_types=False))


def test_matches_direct_transformers_call(prompts, plain):
    ids, embeds, mask = plain["ids"], plain["embeds"], plain["mask"]
    kept = ids.shape[1] - prompts.prefix_drop
    assert plain["grid"].tolist() == [[1, 32, 32]]
    assert embeds.shape == (1, 640, 64) and embeds.dtype == torch.float32
    assert mask.dtype == torch.long and mask[0, :kept].eq(1).all() and mask[0, kept:].eq(0).all()
    torch.testing.assert_close(embeds[0, :kept], plain["direct"][prompts.prefix_drop:], atol=ATOL, rtol=0)
    assert embeds[0, kept:].eq(0).all()


@pytest.mark.parametrize("variant", ["step1x", "realrestorer"])
def test_prepare_needs_no_torchvision(folder, variant):
    """The CPU prepare of either variant runs where torchvision cannot be imported (the tests'
    own process may hold the oracles' torchvision, so this runs in a fresh one)."""
    import subprocess

    script = f"""
import sys
sys.modules["torchvision"] = None  # any import of it now raises ImportError
import numpy as np
from step1x_batch.models.step1x import conditioner as C
from step1x_batch.models.step1x.variant import VARIANTS
prompts = C.Step1XPrompts.from_folder({str(folder)!r}, variant=VARIANTS[{variant!r}])
out = prompts.prepare(np.zeros((64, 48, 3), np.uint8), "make it red", "")
print("ok", type(out).__name__)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok")


def test_dropping_mm_token_type_ids_changes_hidden_states(prompts, plain):
    # transformers 5 computes mrope positions only when mm_token_type_ids reaches the model.
    with_types, without = plain["direct"], plain["direct_no_types"]
    drop = prompts.prefix_drop
    first_image = int((plain["ids"][0] == prompts.vision.image_token_id).nonzero()[0])
    torch.testing.assert_close(with_types[:first_image], without[:first_image], atol=ATOL, rtol=0)
    assert (with_types[drop:] - without[drop:]).abs().max() > 1e-2


def test_prepare_builds_ids_pixels_and_positions(prompts, raw, plain):
    inputs = prompts.prepare(plain["img"], "make it red", "")
    ids = torch.from_numpy(inputs.cond.ids)[None]
    assert torch.equal(ids, plain["ids"])
    assert np.array_equal(inputs.pixel_values, plain["pix"].numpy()) and inputs.grid.tolist() == plain["grid"][0].tolist()
    image_at = (plain["ids"][0] == prompts.vision.image_token_id).nonzero()[:, 0]
    # Image block: t = h = w offsets from its start, 16 x 16 merged grid; text resumes at start + 16.
    start = int(image_at[0])
    pos = inputs.cond.positions
    assert pos[:, :start].tolist() == [list(range(start))] * 3
    block = pos[:, start:start + 256]
    assert (block[0] == start).all()
    assert block[1].tolist() == [start + r for r in range(16) for _ in range(16)]
    assert block[2].tolist() == [start + c for _ in range(16) for c in range(16)]
    assert pos[:, start + 256].tolist() == [start + 16] * 3
    # Oracle: transformers' own get_rope_index with the token types rebuilt for these ids.
    types = (ids == prompts.vision.image_token_id).int()
    oracle, _ = raw.model.get_rope_index(ids, types, image_grid_thw=plain["grid"])
    assert np.array_equal(pos, oracle[:, 0].numpy())


def test_positions_of_masked_tokens_match_transformers_45(prompts, raw):
    """A masked `!` (id 0): kept tokens are numbered as if it were absent and it gets 1, as
    transformers 4.5x computed it (get_rope_index with the mask, then masked positions 1)."""
    inputs = prompts.prepare(image(64, 48, seed=5), "make it pop! now", "")
    ids, mask = torch.from_numpy(inputs.cond.ids)[None], torch.from_numpy(inputs.cond.mask)[None]
    assert int((mask == 0).sum()) == 1
    types = (ids == prompts.vision.image_token_id).int()
    oracle, _ = raw.model.get_rope_index(ids, types, image_grid_thw=torch.from_numpy(inputs.grid)[None],
                                         attention_mask=mask)
    oracle = oracle.masked_fill(mask[None] == 0, 1)
    assert np.array_equal(inputs.cond.positions, oracle[:, 0].numpy())


def test_batch_equals_singles(prompts, encoder):
    imgs = [image(64, 48, seed=2), image(96, 160, seed=3), image(64, 48, seed=4)]
    instructions = ["make it a cat's face", 'write "Hi!" on it', ""]  # "" = a negative-prompt row
    embeds, mask = encode(prompts, encoder, imgs, instructions)
    assert len(set(mask.sum(1).tolist())) == 3  # really different lengths (and image grids)
    for i, (img, text) in enumerate(zip(imgs, instructions)):
        e1, m1 = encode(prompts, encoder, [img], [text])
        assert torch.equal(m1[0], mask[i])
        torch.testing.assert_close(e1[0], embeds[i], atol=ATOL, rtol=0)


def test_deterministic_and_truncation(prompts, encoder, plain):
    embeds2, mask2 = encode(prompts, encoder, [plain["img"]], ["make it red"])
    assert torch.equal(embeds2, plain["embeds"]) and torch.equal(mask2, plain["mask"])
    short, short_mask = encode(prompts, encoder, [plain["img"]], ["make it red"], max_length=100)
    assert short.shape == (1, 100, 64) and short_mask.eq(1).all()
    torch.testing.assert_close(short[0], plain["embeds"][0, :100], atol=ATOL, rtol=0)


def test_masked_exclamation_reproduces_flash_attention(prompts, encoder, raw, tok):
    """Reference (flash-attention 2, 2-D mask with a zero): the id-0 token's attention output is 0 and
    no token attends to it. So the other tokens equal a run with the `!` removed, and the `!` state is
    the MLP-only chain on its embedding."""
    img, text = image(64, 48, seed=5), "make it pop! now"
    inputs = prompts.prepare(img, text, "")
    ids, mask = torch.from_numpy(inputs.cond.ids)[None], torch.from_numpy(inputs.cond.mask)[None]
    pixel_values, grid = torch.from_numpy(inputs.pixel_values), torch.from_numpy(inputs.grid)[None]
    zero = (ids[0] == 0).nonzero()[:, 0].tolist()
    assert len(zero) == 1 and mask[0, zero[0]] == 0 and mask[0].sum() == ids.shape[1] - 1
    assert inputs.cond.positions[:, zero[0]].tolist() == [1, 1, 1]  # 4.5x fills masked positions with 1
    states = hidden(prompts, encoder, inputs)
    keep = mask[0].bool()
    compact = direct(raw, ids[:, keep], pixel_values, grid)
    torch.testing.assert_close(states[keep], compact, atol=ATOL, rtol=0)
    lm = raw.model.language_model
    with torch.inference_mode():
        h = lm.embed_tokens.weight[0]
        for layer in lm.layers:
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        torch.testing.assert_close(states[zero[0]], lm.norm(h), atol=ATOL, rtol=0)
    embeds, out_mask = encode(prompts, encoder, [img], [text])
    at = zero[0] - prompts.prefix_drop
    assert out_mask[0, at] == 1  # the reference's output mask covers the masked token too
    torch.testing.assert_close(embeds[0, at], states[zero[0]], atol=ATOL, rtol=0)


def test_masked_exclamation_sdpa_semantics(prompts, encoder, raw):
    """zero_masked_queries=False: transformers 4.5x SDPA/eager semantics. Only the masked token
    changes; its state depends on the rope position masked tokens get (1 in 4.5x, 0 in 5.x)."""
    img, text = image(64, 48, seed=5), "make it pop! now"
    inputs = prompts.prepare(img, text, "")
    keep = torch.from_numpy(inputs.cond.mask).bool()
    zero = int((~keep).nonzero()[0])
    flash = hidden(prompts, encoder, inputs)
    encoder.zero_masked_queries = False
    try:
        sdpa = hidden(prompts, encoder, inputs)
    finally:
        encoder.zero_masked_queries = True
    torch.testing.assert_close(sdpa[keep], flash[keep], atol=ATOL, rtol=0)
    assert (sdpa[zero] - flash[zero]).abs().max() > 1e-2
    # transformers 5 left alone (token types + 2-D mask, positions inside): kept tokens agree,
    # the masked token differs because 5.x puts it at position 0.
    v5 = direct(raw, torch.from_numpy(inputs.cond.ids)[None], torch.from_numpy(inputs.pixel_values),
                torch.from_numpy(inputs.grid)[None], mask=torch.from_numpy(inputs.cond.mask)[None])
    torch.testing.assert_close(v5[keep], sdpa[keep], atol=ATOL, rtol=0)
    assert (v5[zero] - sdpa[zero]).abs().max() > 1e-3


def test_image_roundtrip_and_resize_match_reference():
    x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    via_torch = torch.from_numpy(x).permute(2, 0, 1).float().div(255).mul(255).byte().permute(1, 2, 0).numpy()
    assert np.array_equal(C.float_roundtrip_uint8(x), via_torch)
    assert C.qwen_vl_utils_size(512, 512) == (504, 504)
    assert C.qwen_vl_utils_size(1024, 1024) == (1036, 1036)  # up: the processor then brings it to 504
    assert C.qwen_vl_utils_size(768, 1360) == (756, 1372)
    assert C.reference_pil_image(image(64, 48, 0)).size == (56, 56)
    with pytest.raises(ValueError):
        C.reference_pil_image(np.zeros((8, 8), np.uint8))


def test_refuses_pickle_weights(folder, tmp_path):
    """Safetensors only: a folder whose weights are a pickle is refused, never unpickled."""
    import shutil

    from safetensors.torch import load_file

    for f in folder.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, tmp_path / f.name)
    torch.save(load_file(folder / "model.safetensors"), tmp_path / "pytorch_model.bin")
    from step1x_batch.models.loading import WeightsError

    with pytest.raises(WeightsError, match="only pickle checkpoints.*refusing"):
        QwenVLEncoder.from_pretrained(tmp_path, dtype=torch.float32)
