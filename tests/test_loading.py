"""The safe loader: safetensors only, strict keys with complete messages, fp8 storage, meta build."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from step1x_batch.models.step1x.connector import Connector, ConnectorParams
from step1x_batch.models.step1x.dit import DiTParams, Step1XDiT
from step1x_batch.models.loading import WeightsError, header_shapes, load_into, read_header
from step1x_batch.models.step1x.tiny import TINY_DIT, tiny_dit_state_dict


@pytest.fixture
def dit_file(tmp_path):
    path = tmp_path / "step1x-edit-v1p1-official.safetensors"
    sd = tiny_dit_state_dict(seed=0)
    save_file(sd, str(path))
    return path, sd


def meta_dit(params=TINY_DIT):
    with torch.device("meta"):
        return Step1XDiT(params)


def test_loads_dit_and_connector_exactly(dit_file):
    path, sd = dit_file
    shapes = header_shapes(read_header(path))
    assert DiTParams.from_state_dict(shapes) == TINY_DIT
    dit = load_into(meta_dit(), path, others=("connector.",), dtype=torch.bfloat16)
    with torch.device("meta"):
        connector = Connector(ConnectorParams.from_state_dict(shapes))
    load_into(connector, path, prefix="connector.", dtype=torch.bfloat16)
    for k, v in dit.state_dict().items():
        assert torch.equal(v, sd[k]), k
    for k, v in connector.state_dict().items():
        assert torch.equal(v, sd["connector." + k]), k
    assert not any(p.is_meta for p in list(dit.parameters()) + list(connector.parameters()))


def rewrite(path, sd):
    save_file(sd, str(path))
    return path


def test_missing_unexpected_and_wrong_shape_keys_all_named(dit_file):
    path, sd = dit_file
    sd = dict(sd)
    del sd["double_blocks.1.txt_mlp.2.bias"]
    del sd["final_layer.linear.weight"]
    sd["double_blocks.0.img_attn.extra"] = torch.zeros(3)
    sd["img_in.bias"] = torch.zeros(65)
    rewrite(path, sd)
    with pytest.raises(WeightsError) as e:
        load_into(meta_dit(), path, others=("connector.",))
    msg = str(e.value)
    assert str(path) in msg
    assert "missing (2): double_blocks.1.txt_mlp.2.bias, final_layer.linear.weight" in msg
    assert "unexpected (1): double_blocks.0.img_attn.extra" in msg
    assert "wrong shape (1): img_in.bias: file (65,) vs model (64,)" in msg


def test_truncated_file_is_reported_by_name(dit_file):
    path, _ = dit_file
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    with pytest.raises(WeightsError, match="truncated"):
        load_into(meta_dit(), path, others=("connector.",))
    path.write_bytes(data[:5])
    with pytest.raises(WeightsError, match="too short"):
        read_header(path)


def test_corrupt_header(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 10)
    with pytest.raises(WeightsError, match="corrupt safetensors header"):
        read_header(path)


def test_pickle_checkpoints_are_refused(tmp_path):
    pt = tmp_path / "weights.pt"
    torch.save({"img_in.weight": torch.zeros(1)}, pt)
    with pytest.raises(WeightsError, match="pickle"):
        read_header(pt)
    # the same bytes renamed: refused by content, never unpickled
    disguised = tmp_path / "weights.safetensors"
    disguised.write_bytes(pt.read_bytes())
    with pytest.raises(WeightsError, match="pickle"):
        read_header(disguised)
    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(WeightsError, match="pickle"):
        read_header(raw)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="no such weights file"):
        read_header(tmp_path / "nope.safetensors")


def test_fp8_storage_loads_and_computes_in_bf16(dit_file):
    path, sd = dit_file
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in sd.items()}
    fp8_path = rewrite(path.with_name("step1x-edit-i1258-FP8.safetensors"), fp8)
    assert read_header(fp8_path)["img_in.weight"]["dtype"] == "F8_E4M3"
    dit = load_into(meta_dit(), fp8_path, others=("connector.",), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in dit.parameters())
    assert torch.equal(dit.img_in.weight, fp8["img_in.weight"].to(torch.bfloat16))
    # computes, and stays close to the bf16 model (fp8 rounding only)
    ref = load_into(meta_dit(), path, others=("connector.",), dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 8, 64, generator=g), torch.zeros(1, 8, 3), torch.randn(1, 5, 64, generator=g),
            torch.zeros(1, 5, 3), torch.tensor([0.5]), torch.randn(1, 32, generator=g))
    args = tuple(a.to(torch.bfloat16) for a in args)
    with torch.inference_mode():
        a, b = dit(*args).float(), ref(*args).float()
    assert torch.isfinite(a).all()
    assert ((a - b).norm() / b.norm()).item() < 0.2


def test_non_strict_leaves_nothing_on_meta(dit_file):
    path, sd = dit_file
    sd = dict(sd)
    del sd["img_in.bias"]
    rewrite(path, sd)
    with pytest.raises(WeightsError, match="no weights for img_in.bias"):
        load_into(meta_dit(), path, others=("connector.",), strict=False)


def test_truncated_qwen_shard_is_named(tmp_path):
    from step1x_batch.models.qwen_vl.encoder import QwenVLEncoder
    from step1x_batch.models.qwen_vl.tiny import write_tiny_qwen

    folder = tmp_path / "qwen"
    write_tiny_qwen(folder, seed=0)
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(WeightsError, match="model.safetensors.*truncated"):
        QwenVLEncoder.from_pretrained(folder, dtype=torch.float32)
    with pytest.raises(WeightsError, match="no Qwen2.5-VL folder"):
        QwenVLEncoder.from_pretrained(tmp_path / "absent", dtype=torch.float32)
