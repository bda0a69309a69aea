"""Our DiT trunk against diffusers' FluxTransformer2DModel (an independent implementation).

Weights are made in the original (Flux) key format and converted with diffusers' own converter,
which hard-codes the release's width (3072, mlp 4x): the trunk is therefore full width with one
block of each kind. Text/vector input widths are reduced; they are read from shapes on both sides.
"""

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from step1x_batch.models.step1x.dit import DiTParams, Step1XDiT
from step1x_batch.models.step1x.tiny import seeded_state_dict

PARAMS = DiTParams(vec_in_dim=32, context_in_dim=48, depth=1, depth_single_blocks=1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def models():
    with torch.device("meta"):
        ours = Step1XDiT(PARAMS)
    sd = seeded_state_dict(ours, seed=7)
    ours.load_state_dict(sd, assign=True)
    assert DiTParams.from_state_dict(sd) == PARAMS
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(sd))
    with torch.device("meta"):
        theirs = FluxTransformer2DModel(
            patch_size=1, in_channels=64, out_channels=64, num_layers=1, num_single_layers=1,
            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=48,
            pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
        )
    theirs.load_state_dict(converted, strict=True, assign=True)
    return ours.eval(), theirs.eval()


def inputs(seed: int, batch: int = 2, h: int = 6, w: int = 8, txt_len: int = 20):
    g = torch.Generator().manual_seed(seed)
    # target tokens (axis0 0) then reference tokens (axis0 1), as the pipeline lays them out
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    grid = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    ref = grid.clone()
    ref[:, 0] = 1
    img_ids = torch.cat([grid, ref])
    return dict(
        img=torch.randn(batch, 2 * h * w, 64, generator=g),
        img_ids=img_ids,
        txt=torch.randn(batch, txt_len, 48, generator=g),
        txt_ids=torch.zeros(txt_len, 3),
        timesteps=torch.rand(batch, generator=g),
        y=torch.randn(batch, 32, generator=g),
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_dit_matches_diffusers_flux(models, seed):
    ours, theirs = models
    x = inputs(seed)
    b = x["img"].shape[0]
    with torch.inference_mode():
        a = ours(
            img=x["img"], img_ids=x["img_ids"].expand(b, -1, -1), txt=x["txt"],
            txt_ids=x["txt_ids"].expand(b, -1, -1), timesteps=x["timesteps"], y=x["y"],
        )
        ref = theirs(
            hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
            timestep=x["timesteps"], img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=None,
        ).sample
    assert a.shape == ref.shape == x["img"].shape
    assert a.std() > 0.1  # a non-trivial output
    err = rel_err(a, ref)
    print(f"DiT vs diffusers Flux: relative error {err:.2e}")
    assert err <= 1e-4


def test_reference_axis_changes_output(models):
    """Rope axis 0 is live: moving the reference tokens to axis0=0 (v1.0 layout) changes the result."""
    ours, _ = models
    x = inputs(3, batch=1)
    ids = x["img_ids"].clone()
    ids_v10 = ids.clone()
    ids_v10[:, 0] = 0
    with torch.inference_mode():
        run = lambda i: ours(x["img"], i[None], x["txt"], x["txt_ids"][None], x["timesteps"], x["y"])
        assert rel_err(run(ids), run(ids_v10)) > 1e-3


def test_params_inferred_from_release_shapes():
    with torch.device("meta"):
        full = Step1XDiT(DiTParams())
    n = sum(p.numel() for p in full.parameters())
    assert DiTParams.from_state_dict(full.state_dict()) == DiTParams()
    assert 11.5e9 < n < 12.5e9  # the released DiT without the connector
