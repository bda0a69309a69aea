"""The connector's token refiner against diffusers' HunyuanVideoTokenRefiner (independent code).

Our original-format keys (``connector.S.*``) are the HunyuanVideo ``txt_in.*`` keys; diffusers'
own HunyuanVideo converter renames them, so both the maths and the key mapping are checked.
"""

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoTokenRefiner

from step1x_batch.models.step1x.connector import Connector, ConnectorParams, masked_mean
from step1x_batch.models.step1x.tiny import seeded_state_dict

PARAMS = ConnectorParams(in_channels=48, hidden_size=64, vec_dim=24, num_heads=8, depth=2)  # heads as inferred for width 64


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def build(params=PARAMS, seed=0):
    with torch.device("meta"):
        ours = Connector(params)
    sd = seeded_state_dict(ours, seed)
    ours.load_state_dict(sd, assign=True)
    return ours.eval(), sd


def diffusers_refiner(sd, params=PARAMS):
    txt_in = {"txt_in." + k[len("S."):]: v for k, v in sd.items() if k.startswith("S.")}
    converted = convert_hunyuan_video_transformer_to_diffusers(txt_in)
    theirs = HunyuanVideoTokenRefiner(
        in_channels=params.in_channels, num_attention_heads=params.num_heads,
        attention_head_dim=params.hidden_size // params.num_heads, num_layers=params.depth,
        mlp_ratio=params.mlp_ratio,
    )
    theirs.load_state_dict({k[len("context_embedder."):]: v for k, v in converted.items()}, strict=True)
    return theirs.eval()


def inputs(seed, b=3, length=24):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, PARAMS.in_channels, generator=g)
    mask = torch.zeros(b, length, dtype=torch.long)
    for i, n in enumerate([length, 13, 5][:b]):
        mask[i, :n] = 1
    mask[1, 4] = 0  # a masked token inside the sequence (the reference masks token id 0, "!")
    t = torch.rand(b, generator=g)
    return x, t, mask


@pytest.mark.parametrize("seed", [0, 1])
def test_refiner_matches_diffusers_hunyuan(seed):
    ours, sd = build(seed=seed)
    theirs = diffusers_refiner(sd)
    x, t, mask = inputs(seed)
    with torch.inference_mode():
        txt, _ = ours(x, t, mask)
        ref = theirs(x, 1000 * t, mask)  # the connector embeds 1000 * t
    assert txt.shape == (3, 24, PARAMS.hidden_size)
    assert torch.isfinite(txt).all()  # padded rows stay finite (key 0 forced valid)
    err = rel_err(txt, ref)
    print(f"connector refiner vs diffusers HunyuanVideoTokenRefiner: relative error {err:.2e}")
    assert err <= 1e-4


def test_pooled_vector_and_v10_scale_factor():
    x, t, mask = inputs(2)
    v11, sd = build()
    params10 = ConnectorParams(**{**PARAMS.__dict__, "scale_factor_shape": (1,)})
    v10, sd10 = build(params10)
    assert ConnectorParams.from_state_dict({"connector." + k: v for k, v in sd10.items()}) == params10
    assert ConnectorParams.from_state_dict({"connector." + k: v for k, v in sd.items()}) == PARAMS
    v10.load_state_dict({**sd, "scale_factor": torch.tensor([-0.91])}, assign=True)
    with torch.inference_mode():
        _, y11 = v11(x, t, mask)
        _, y10 = v10(x, t, mask)
    mean = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    w, b = sd["global_proj_out.weight"], sd["global_proj_out.bias"]
    torch.testing.assert_close(y11, mean @ w.T + b)
    torch.testing.assert_close(y10, (mean * 0.09) @ w.T + b)
    torch.testing.assert_close(masked_mean(x, mask), mean)
