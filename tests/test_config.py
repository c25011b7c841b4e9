"""XLSTMConfig: presets, hub/yaml round trips, legacy keys, and validation errors naming the field."""

from __future__ import annotations

import json

import pytest
import yaml

from fast_xlstm.config import PRESETS, XLSTMConfig, get_preset

# The released checkpoint's config.json, with the legacy keys that older hub configs carry.
HUB_7B_CONFIG = {
    "architectures": ["xLSTMForCausalLM"], "model_type": "xlstm", "transformers_version": "4.48.0.dev0",
    "torch_dtype": "float32", "add_embedding_dropout": False, "add_forward_backend_padding": False,
    "add_out_norm": True, "add_post_blocks_norm": True, "add_post_norm": False, "add_qk_norm": False,
    "bos_token_id": 0, "cell_norm_eps": 1e-6, "chunk_size": 64, "chunkwise_kernel": "chunkwise--triton_xl_chunk",
    "embedding_dim": 4096, "eos_token_id": 2, "ffn_proj_factor": 2.667, "ffn_round_up_to_multiple_of": 64,
    "force_bos_token_insert": True, "forward_backend_name": "chunkwise--triton_limit_chunk", "gate_soft_cap": 15.0,
    "head_dim": 512, "igate_bias_init_range": -10.0, "inference_state_dtype": "float32",
    "max_inference_chunksize": 16384, "mlstm_round_up_to_multiple_of": 64, "mode": "inference",
    "norm_eps": 1e-6, "norm_reduction_force_float32": True, "norm_type": "rms_norm", "num_blocks": 32,
    "num_heads": 8, "output_logit_soft_cap": 30.0, "pad_token_id": 1, "qk_dim_factor": 0.5,
    "return_last_states": True, "sequence_kernel": "native_sequence__triton", "step_kernel": "triton",
    "tie_word_embeddings": False, "use_bias": False, "use_cache": True, "v_dim_factor": 1.0,
    "vocab_size": 50304, "weight_mode": "single",
}


def test_7b_preset_matches_the_released_model():
    cfg = get_preset("xlstm-7b")
    assert cfg.num_parameters() == 6_865_424_896
    assert (cfg.qk_head_dim, cfg.v_head_dim, cfg.ffn_dim) == (256, 512, 10944)
    assert cfg.state_numel_per_sequence() * 4 == 134_480_896  # 134 MB of fp32 state per sequence
    assert cfg.stop_token_ids == [0, 2]


def test_hub_config_with_legacy_keys_loads_as_the_7b():
    cfg = XLSTMConfig.from_dict(HUB_7B_CONFIG)
    assert cfg == get_preset("xlstm-7b")


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_json_and_yaml(tmp_path, name):
    cfg = get_preset(name)
    cfg.save(tmp_path / "json")
    cfg.save(tmp_path / "yaml", yaml_layout=True)
    assert XLSTMConfig.from_file(tmp_path / "json") == cfg
    back = XLSTMConfig.from_file(tmp_path / "yaml")
    for field in ("embedding_dim", "num_blocks", "num_heads", "vocab_size", "ffn_proj_factor", "gate_soft_cap"):
        assert getattr(back, field) == getattr(cfg, field)


def test_yaml_has_exactly_the_reference_fields(tmp_path):
    pytest.importorskip("xlstm")
    from xlstm.xlstm_large.model import xLSTMLargeConfig

    get_preset("xlstm-tiny").save(tmp_path, yaml_layout=True)
    xLSTMLargeConfig(**yaml.safe_load((tmp_path / "config.yaml").read_text()))  # raises on unknown keys


def test_transformers_aliases():
    cfg = XLSTMConfig.from_dict({"hidden_size": 256, "num_hidden_layers": 3, "embedding_dim": None,
                                 "num_blocks": None, "num_heads": 4, "vocab_size": 100})
    assert (cfg.embedding_dim, cfg.num_blocks) == (256, 3)
    with pytest.raises(ValueError, match="hidden_size=256 disagrees"):
        XLSTMConfig.from_dict({"hidden_size": 256, "embedding_dim": 128})


@pytest.mark.parametrize("changes, field", [
    ({"embedding_dim": 0}, "embedding_dim"),
    ({"num_heads": -2}, "num_heads"),
    ({"num_heads": 3}, "qk_dim_factor"),
    ({"vocab_size": 1.5}, "vocab_size"),
    ({"norm_eps": float("nan")}, "norm_eps"),
    ({"gate_soft_cap": -1.0}, "gate_soft_cap"),
    ({"weight_mode": "mixed"}, "weight_mode"),
    ({"eos_token_id": 99999}, "eos_token_id"),
    ({"bos_token_id": -1}, "bos_token_id"),
    ({"use_bias": "yes"}, "use_bias"),
])
def test_nonsense_values_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        XLSTMConfig.from_dict({**HUB_7B_CONFIG, **changes})


def test_unknown_and_unsupported_fields():
    with pytest.raises(ValueError, match="unknown field.*rope_theta"):
        XLSTMConfig.from_dict({**HUB_7B_CONFIG, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="add_qk_norm"):
        XLSTMConfig.from_dict({**HUB_7B_CONFIG, "add_qk_norm": True})
    with pytest.raises(ValueError, match="model_type"):
        XLSTMConfig.from_dict({**HUB_7B_CONFIG, "model_type": "llama"})
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("xlstm-70b")


def test_bad_files(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid json"):
        XLSTMConfig.from_file(tmp_path)
    with pytest.raises(FileNotFoundError):
        XLSTMConfig.from_file(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="mapping"):
        XLSTMConfig.from_file(tmp_path)
