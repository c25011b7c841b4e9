"""Checkpoint I/O: bit-exact round trips in every layout, and clear errors for broken checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fast_xlstm.config import xlstm_tiny
from fast_xlstm.model import XLSTMForCausalLM

from modelutil import random_ids, tiny_model


def _assert_same_weights(a: XLSTMForCausalLM, b: XLSTMForCausalLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("layout, shard", [("hub", "5GB"), ("hub", "100KB"), ("xlstm", "5GB"), ("xlstm", "100KB")])
def test_save_load_round_trip_is_bit_exact(tmp_path, layout, shard):
    model = tiny_model(seed=3)
    model.save_pretrained(tmp_path, layout=layout, max_shard_size=shard)
    loaded = XLSTMForCausalLM.from_pretrained(tmp_path)
    _assert_same_weights(model, loaded)
    ids = random_ids((2, 20))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], loaded(ids)[0])


def test_bf16_round_trip_and_on_the_fly_conversion(tmp_path):
    model = tiny_model(seed=4).cast(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    _assert_same_weights(model, XLSTMForCausalLM.from_pretrained(tmp_path / "bf16"))
    # fp32 checkpoint converted to bf16 while loading equals casting after loading.
    tiny_model(seed=4).save_pretrained(tmp_path / "fp32")
    _assert_same_weights(model, XLSTMForCausalLM.from_pretrained(tmp_path / "fp32", dtype="bfloat16"))


def test_fused_model_saves_single_weights(tmp_path):
    model = tiny_model(seed=5).fuse_projections()
    model.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    assert "backbone.blocks.0.mlstm_layer.q.weight" in keys
    assert not any("qkv_opreact" in k or "proj_up_gate_z" in k for k in keys)
    _assert_same_weights(tiny_model(seed=5), XLSTMForCausalLM.from_pretrained(tmp_path))


def test_tied_embeddings(tmp_path):
    model = tiny_model(xlstm_tiny().replace(tie_word_embeddings=True), seed=6)
    assert model.lm_head.weight is model.backbone.embeddings.weight
    model.save_pretrained(tmp_path)
    loaded = XLSTMForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.backbone.embeddings.weight
    _assert_same_weights(model, loaded)


def test_sharded_hub_layout_has_index(tmp_path):
    tiny_model().save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(files) > 1 and set(index["weight_map"].values()) == {f.name for f in files}
    assert index["weight_map"]["backbone.embeddings.weight"]


# ---- broken checkpoints ---------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    tiny_model(seed=7).save_pretrained(tmp_path, max_shard_size="100KB")
    return tmp_path


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        XLSTMForCausalLM.from_pretrained(tmp_path / "nope")


def test_missing_shard_names_the_file(saved):
    victim = sorted(saved.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        XLSTMForCausalLM.from_pretrained(saved)


def test_truncated_safetensors_names_the_file(saved):
    victim = sorted(saved.glob("model-*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=victim.name):
        XLSTMForCausalLM.from_pretrained(saved)


def test_wrong_tensor_shape_names_the_tensor(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["backbone.blocks.1.mlstm_layer.v.weight"] = torch.randn(64, 128)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"blocks\.1\.mlstm_layer\.v\.weight has shape \(64, 128\)"):
        XLSTMForCausalLM.from_pretrained(tmp_path)


def test_config_that_disagrees_with_weights(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["embedding_dim"] = cfg["hidden_size"] = 256
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has shape"):
        XLSTMForCausalLM.from_pretrained(tmp_path)


def test_missing_and_unexpected_tensors(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["backbone.out_norm.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing tensor.*out_norm"):
        XLSTMForCausalLM.from_pretrained(tmp_path)
    sd["backbone.out_norm.weight"] = torch.ones(128)
    sd["backbone.blocks.0.extra.weight"] = torch.ones(3)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected tensor.*extra"):
        XLSTMForCausalLM.from_pretrained(tmp_path)


def test_unknown_config_field_is_named(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_experts"] = 8
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown field.*num_experts"):
        XLSTMForCausalLM.from_pretrained(tmp_path)


def test_pickled_weights_are_refused(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save({"x": torch.ones(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickled weights are never loaded"):
        XLSTMForCausalLM.from_pretrained(tmp_path)


def test_no_config(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        XLSTMForCausalLM.from_pretrained(tmp_path)
