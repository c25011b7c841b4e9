"""Model configuration: the hub `config.json` fields, the `xlstm` package's `config.yaml`, presets.

`XLSTMConfig` uses the field names of the released checkpoint's `config.json` (model_type "xlstm").
`hidden_size`/`num_hidden_layers` (transformers' names) are accepted as aliases of
`embedding_dim`/`num_blocks`. Keys that older hub configs carry but that do not change the model
are tolerated; anything else unknown, or a value that makes no sense, raises `ValueError` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

# Keys written by transformers' PretrainedConfig or by hub tooling: not part of the model.
_HF_GENERIC_KEYS = frozenset(
    {
        "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
        "use_cache", "auto_map", "output_hidden_states", "output_attentions", "return_dict",
        "is_encoder_decoder", "chunk_size_feed_forward", "id2label", "label2id", "problem_type",
        "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
        "finetuning_task", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
        "tf_legacy_loss", "pruned_heads", "torchscript", "use_bfloat16", "max_length", "min_length",
        "num_beams", "num_return_sequences", "output_scores", "return_dict_in_generate",
        "temperature", "top_k", "top_p", "repetition_penalty", "do_sample",
    }
)

# Keys of older xLSTM hub configs (and of kernel selection) that we accept and ignore, because they
# either name a kernel of the reference package or describe an option whose only supported value
# is the one checked in `_LEGACY_REQUIRED`.
_LEGACY_IGNORED_KEYS = frozenset(
    {
        "chunkwise_kernel", "sequence_kernel", "step_kernel", "mode", "chunk_size", "return_last_states",
        "autocast_kernel_dtype", "inference_state_dtype", "max_inference_chunksize",
        "forward_backend_name", "step_kernel_name", "sequence_kernel_name", "chunkwise_kernel_name",
        "cell_norm_eps", "head_dim", "igate_bias_init_range", "mlstm_round_up_to_multiple_of",
        "add_embedding_dropout", "add_forward_backend_padding", "add_post_blocks_norm",
        "backend_mode",
    }
)

# Legacy options that we tolerate only with the value the xLSTM 7B architecture uses.
_LEGACY_REQUIRED: dict[str, Any] = {"add_post_norm": False, "add_qk_norm": False, "norm_type": "rms_norm"}

# Field aliases used by transformers' xLSTMConfig.
_ALIASES = {"hidden_size": "embedding_dim", "num_hidden_layers": "num_blocks"}

# The fields that the `xlstm` package's xLSTMLargeConfig accepts in config.yaml.
_YAML_FIELDS = (
    "embedding_dim", "num_heads", "num_blocks", "vocab_size", "use_bias", "norm_eps",
    "norm_reduction_force_float32", "add_out_norm", "qk_dim_factor", "v_dim_factor", "chunkwise_kernel",
    "sequence_kernel", "step_kernel", "mode", "chunk_size", "return_last_states", "autocast_kernel_dtype",
    "eps", "inference_state_dtype", "ffn_proj_factor", "ffn_round_up_to_multiple_of", "gate_soft_cap",
    "output_logit_soft_cap", "weight_mode",
)


def round_up_to_multiple(x: float, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= x (the reference package's FFN width rule)."""
    return int(((x + multiple - 1) // multiple) * multiple)


@dataclass
class XLSTMConfig:
    """Architecture of an xLSTM language model built from mLSTM blocks (xLSTM 7B design).

    Defaults are the released xLSTM 7B values.
    """

    vocab_size: int = 50304
    embedding_dim: int = 4096
    num_blocks: int = 32
    num_heads: int = 8
    use_bias: bool = False
    norm_eps: float = 1e-6
    norm_reduction_force_float32: bool = True
    add_out_norm: bool = True
    qk_dim_factor: float = 0.5
    v_dim_factor: float = 1.0
    ffn_proj_factor: float = 2.667
    ffn_round_up_to_multiple_of: int = 64
    gate_soft_cap: float | None = 15.0
    output_logit_soft_cap: float | None = 30.0
    eps: float = 1e-6
    weight_mode: str = "single"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 1
    force_bos_token_insert: bool = True
    # Kernel names of the reference package: kept only so a round trip writes them back.
    chunkwise_kernel: str = field(default="chunkwise--triton_limit_chunk", compare=False)
    sequence_kernel: str = field(default="native_sequence__triton", compare=False)
    step_kernel: str = field(default="triton", compare=False)
    chunk_size: int = 64
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"XLSTMConfig.{name}: {msg} (got {getattr(self, name)!r})")

        for name in ("vocab_size", "embedding_dim", "num_blocks", "num_heads", "ffn_round_up_to_multiple_of",
                     "chunk_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, "must be a positive integer")
        for name in ("norm_eps", "eps", "qk_dim_factor", "v_dim_factor", "ffn_proj_factor"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0, name,
                 "must be a positive finite number")
        for name in ("gate_soft_cap", "output_logit_soft_cap"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, (int, float)) and math.isfinite(v) and v > 0), name,
                 "must be a positive number or null")
        for name in ("use_bias", "norm_reduction_force_float32", "add_out_norm", "tie_word_embeddings",
                     "force_bos_token_insert"):
            need(isinstance(getattr(self, name), bool), name, "must be true or false")
        need(self.weight_mode in ("single", "fused"), "weight_mode", "must be 'single' or 'fused'")
        need(self.qk_dim >= self.num_heads and self.qk_dim % self.num_heads == 0, "qk_dim_factor",
             f"embedding_dim*qk_dim_factor = {self.qk_dim} must be a positive multiple of num_heads={self.num_heads}")
        need(self.v_dim >= self.num_heads and self.v_dim % self.num_heads == 0, "v_dim_factor",
             f"embedding_dim*v_dim_factor = {self.v_dim} must be a positive multiple of num_heads={self.num_heads}")
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, int) and 0 <= v < self.vocab_size), name,
                 f"must be a token id in [0, {self.vocab_size}) or null")
        eos = self.eos_token_id
        eos_list = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
        need(all(isinstance(e, int) and 0 <= e < self.vocab_size for e in eos_list), "eos_token_id",
             f"must be token ids in [0, {self.vocab_size})")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def qk_dim(self) -> int:
        """Width of q and k over all heads (2048 for the 7B)."""
        return int(self.embedding_dim * self.qk_dim_factor)

    @property
    def v_dim(self) -> int:
        """Width of v, the output gate and the cell output over all heads (4096 for the 7B)."""
        return int(self.embedding_dim * self.v_dim_factor)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_dim // self.num_heads

    @property
    def v_head_dim(self) -> int:
        return self.v_dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        """SwiGLU inner width (10944 for the 7B)."""
        return round_up_to_multiple(self.embedding_dim * self.ffn_proj_factor, self.ffn_round_up_to_multiple_of)

    @property
    def hidden_size(self) -> int:
        return self.embedding_dim

    @property
    def num_hidden_layers(self) -> int:
        return self.num_blocks

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end generation: the configured eos ids plus the BOS/EOD id 0 used in training."""
        eos = self.eos_token_id
        ids = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
        if self.bos_token_id is not None:
            ids.append(self.bos_token_id)
        return sorted(set(ids))

    def state_numel_per_sequence(self) -> int:
        """Number of state elements one sequence needs over all blocks: C, n and m."""
        per_head = self.qk_head_dim * self.v_head_dim + self.qk_head_dim + 1
        return self.num_blocks * self.num_heads * per_head

    def num_parameters(self) -> int:
        """Parameter count implied by the config (embedding and head counted once if tied)."""
        d, qk, v, ffn, nh = self.embedding_dim, self.qk_dim, self.v_dim, self.ffn_dim, self.num_heads
        bias = 1 if self.use_bias else 0
        per_block = (
            d  # norm_mlstm
            + 2 * (qk * d + bias * qk) + 2 * (v * d + bias * v)  # q, k, v, ogate
            + 2 * (nh * d + nh)  # igate, fgate (always with bias)
            + v  # multihead_norm
            + (d * v + bias * d)  # out_proj
            + d  # norm_ffn
            + 2 * (ffn * d + bias * ffn) + (d * ffn + bias * d)
        )
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_blocks * per_block + (d if self.add_out_norm else 0) + head

    # ---- (de)serialisation ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "XLSTMConfig":
        """Builds a config from hub `config.json` or `config.yaml` content.

        Legacy keys are tolerated, unknown keys raise ValueError naming them.
        """
        if not isinstance(data, dict):
            raise ValueError(f"config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        unknown: list[str] = []
        for key, value in data.items():
            if key == "model_type" and value not in ("xlstm", None):
                raise ValueError(f"config.model_type: expected 'xlstm', got {value!r}")
            if key in _ALIASES:
                target = _ALIASES[key]
                if target in data and data[target] is not None and value is not None and data[target] != value:
                    raise ValueError(f"config.{key}={value!r} disagrees with config.{target}={data[target]!r}")
                if value is not None:
                    kwargs.setdefault(target, value)
            elif key in known:
                if value is None and key in ("embedding_dim", "num_blocks"):
                    continue  # transformers writes null for the alias it did not use
                kwargs[key] = value
            elif key in _LEGACY_REQUIRED:
                if value != _LEGACY_REQUIRED[key]:
                    raise ValueError(
                        f"config.{key}={value!r} is not supported (only {_LEGACY_REQUIRED[key]!r} is)")
                extra[key] = value
            elif key in _LEGACY_IGNORED_KEYS or key in _HF_GENERIC_KEYS:
                extra[key] = value
            else:
                unknown.append(key)
        if unknown:
            raise ValueError(f"config has unknown field(s): {', '.join(sorted(unknown))}")
        if isinstance(kwargs.get("eos_token_id"), list) and len(kwargs["eos_token_id"]) == 1:
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        for name in ("norm_eps", "eps", "qk_dim_factor", "v_dim_factor", "ffn_proj_factor",
                     "gate_soft_cap", "output_logit_soft_cap"):
            if isinstance(kwargs.get(name), int) and not isinstance(kwargs.get(name), bool):
                kwargs[name] = float(kwargs[name])
        cfg = cls(**kwargs)
        cfg.extra = extra
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Hub `config.json` content (readable by transformers' xLSTMConfig)."""
        out: dict[str, Any] = {"architectures": ["xLSTMForCausalLM"], "model_type": "xlstm"}
        for f in fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        out["hidden_size"] = self.embedding_dim
        out["num_hidden_layers"] = self.num_blocks
        # transformers' own (non-`xlstm`-package) code needs these kernel names to exist there.
        out.update({"chunkwise_kernel": "chunkwise--native_autograd", "sequence_kernel": "native_sequence__native",
                    "step_kernel": "native", "mode": "inference", "return_last_states": True,
                    "inference_state_dtype": "float32", "autocast_kernel_dtype": "bfloat16",
                    "max_inference_chunksize": 16384, "use_cache": True})
        return out

    def to_yaml_dict(self) -> dict[str, Any]:
        """The `xlstm` package's config.yaml content (exactly the fields xLSTMLargeConfig takes)."""
        vals = {f.name: getattr(self, f.name) for f in fields(self)}
        out = {k: vals[k] for k in _YAML_FIELDS if k in vals}
        out.update({"mode": "inference", "return_last_states": True, "autocast_kernel_dtype": "bfloat16",
                    "inference_state_dtype": "float32"})
        out["weight_mode"] = "single"  # the reference loader only reads single weights
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> "XLSTMConfig":
        """Reads `config.json` or `config.yaml` (a file, or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            for name in ("config.json", "config.yaml"):
                if (path / name).exists():
                    path = path / name
                    break
            else:
                raise FileNotFoundError(f"{path}: no config.json or config.yaml in this directory")
        if not path.exists():
            raise FileNotFoundError(f"{path}: config file not found")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
            raise ValueError(f"{path}: not a valid {path.suffix[1:]} file: {exc}") from exc
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc

    def save(self, directory: str | Path, yaml_layout: bool = False) -> Path:
        """Writes config.json (hub layout) or config.yaml (`xlstm` package layout) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if yaml_layout:
            import yaml

            target = directory / "config.yaml"
            target.write_text(yaml.safe_dump(self.to_yaml_dict(), sort_keys=False), encoding="utf-8")
        else:
            target = directory / "config.json"
            target.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return target

    def replace(self, **changes: Any) -> "XLSTMConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


# ---- presets -------------------------------------------------------------------------------------
def xlstm_7b() -> XLSTMConfig:
    """The released xLSTM 7B (NX-AI/xLSTM-7b): 6.87B parameters."""
    return XLSTMConfig()


def xlstm_tiny() -> XLSTMConfig:
    """2 blocks, d=128, 4 heads (qk head 16, v head 32): for tests and the CPU demo."""
    return XLSTMConfig(vocab_size=1024, embedding_dim=128, num_blocks=2, num_heads=4)


def xlstm_tiny_deep() -> XLSTMConfig:
    """12 blocks of the tiny width: catches per-block bugs that appear past 10 blocks."""
    return XLSTMConfig(vocab_size=1024, embedding_dim=128, num_blocks=12, num_heads=4)


def xlstm_small() -> XLSTMConfig:
    """About 25M parameters with a 16k vocabulary: the size of the bundled demo model."""
    return XLSTMConfig(vocab_size=16384, embedding_dim=384, num_blocks=6, num_heads=4)


def xlstm_7b_shape_2blocks() -> XLSTMConfig:
    """The 7B block shape with 2 blocks: kernel and benchmark shapes without 27 GB of weights."""
    return XLSTMConfig(num_blocks=2)


PRESETS: dict[str, Callable[[], XLSTMConfig]] = {
    "xlstm-7b": xlstm_7b,
    "xlstm-7b-2blocks": xlstm_7b_shape_2blocks,
    "xlstm-small": xlstm_small,
    "xlstm-tiny": xlstm_tiny,
    "xlstm-tiny-deep": xlstm_tiny_deep,
}


def get_preset(name: str) -> XLSTMConfig:
    """Returns a fresh config for a preset name (see `PRESETS`)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
