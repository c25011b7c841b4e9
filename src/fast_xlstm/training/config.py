"""Training configuration: dataclasses read from YAML, with `--section.key=value` overrides.

A run is described by one `TrainConfig` (sections model, data, train, optim, schedule, parallel,
checkpoint, log, debug). Every section validates itself in `__post_init__` and raises ValueError
naming the offending key, so a typo in a config file or an override fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


def _expand(path: str | None) -> str | None:
    """`~` in a config path means the home directory, as in a shell."""
    return None if path is None else os.path.expanduser(path)


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{where}: {msg}")


@dataclass
class ModelSection:
    """Which model to train. `init_from` (a hub-layout checkpoint dir) fine-tunes its weights and
    uses its config; otherwise the config is `config` (a config.json/.yaml) or `preset`, plus
    `overrides` (XLSTMConfig fields), initialised with `init` ("7b" recipe or "random")."""

    preset: str | None = "xlstm-tiny"
    config: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    init: str = "7b"
    seed: int = 0

    def __post_init__(self) -> None:
        self.config, self.init_from = _expand(self.config), _expand(self.init_from)
        _need(self.init in ("7b", "random"), "model.init", f"must be '7b' or 'random', got {self.init!r}")
        _need(self.preset is not None or self.config is not None or self.init_from is not None, "model",
              "set one of preset, config or init_from")
        _need(isinstance(self.overrides, dict), "model.overrides", "must be a mapping of XLSTMConfig fields")


@dataclass
class DataSection:
    """Token data written by `fast-xlstm prepare-data`: `path` is its output dir (its `train/` split is
    used) or a split dir itself; `val_path` defaults to `<path>/val` when that exists."""

    path: str = ""
    val_path: str | None = None
    seq_len: int = 2048
    shuffle: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        self.path, self.val_path = _expand(self.path), _expand(self.val_path)
        _need(bool(self.path), "data.path", "is required (a directory written by `fast-xlstm prepare-data`)")
        _need(self.seq_len >= 2, "data.seq_len", f"must be >= 2, got {self.seq_len}")


@dataclass
class LoopSection:
    """Steps and batch sizes. `batch_size` is the global number of rows per optimizer step;
    gradient accumulation = batch_size / (micro_batch_size * world_size), which must be whole."""

    steps: int = 100
    batch_size: int = 8
    micro_batch_size: int = 8
    eval_every: int = 0
    eval_rows: int = 16

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "micro_batch_size"):
            _need(getattr(self, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        _need(self.eval_every >= 0 and self.eval_rows >= 1, "train.eval_every/eval_rows", "must be >= 0 / >= 1")


@dataclass
class OptimSection:
    """AdamW as in the xLSTM 7B recipe; weight decay only on matrices (ndim >= 2), and on the input
    embedding only when `weight_decay_on_embedding` (the 7B run: false)."""

    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    weight_decay_on_embedding: bool = False
    grad_clip: float = 0.5
    # "fused": one pass over parameters, gradients and both moments per step; "foreach": several
    # multi-tensor passes (on an H100, 8 blocks of the 7B shape: 58.6 ms of a 432 ms step in 781 kernels,
    # bench/results/h100-train/train_mfu_8blocks_ac_compile_profile-3fcfd4a.json); "auto": fused when
    # every parameter is on a CUDA device, foreach otherwise (the CPU runs that the golden losses pin).
    implementation: str = "auto"

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # YAML gives a list
        _need(self.implementation in ("auto", "fused", "foreach"), "optim.implementation",
              f"must be auto, fused or foreach, got {self.implementation!r}")
        _need(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
              f"must be two numbers in [0, 1), got {self.betas}")
        _need(self.eps > 0 and self.weight_decay >= 0, "optim.eps/weight_decay", "must be > 0 / >= 0")
        _need(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = no clipping)")


@dataclass
class ScheduleSection:
    """LR schedule: linear warmup, then "exp" (exponential decay to final_lr_ratio x lr), "cosine"
    (cosine to final_lr_ratio x lr) or "constant", then a linear cooldown to 0 over the last
    `cooldown_steps` steps (of train.steps)."""

    kind: str = "exp"
    warmup_steps: int = 3000
    final_lr_ratio: float = 0.1
    cooldown_steps: int = 0

    def __post_init__(self) -> None:
        _need(self.kind in ("exp", "cosine", "constant"), "schedule.kind",
              f"must be exp, cosine or constant, got {self.kind!r}")
        _need(self.warmup_steps >= 0 and self.cooldown_steps >= 0, "schedule.warmup_steps/cooldown_steps",
              "must be >= 0")
        _need(0 < self.final_lr_ratio <= 1, "schedule.final_lr_ratio", f"must be in (0, 1], got {self.final_lr_ratio}")


@dataclass
class ParallelSection:
    """Devices and speed options. dtype "auto" = bf16 compute with fp32 master weights on GPU, fp32
    on CPU. FSDP2 (`fully_shard` per block) is always on: one process is a world of one.
    activation_checkpointing: true = every block, false = none, an int n = the first n blocks (the
    recompute costs a block's forward again; checkpoint only as many blocks as memory needs)."""

    device: str = "auto"
    dtype: str = "auto"
    activation_checkpointing: bool | int = False
    compile: bool = False
    reshard_after_forward: bool = True
    # Gradient reduce-scatter dtype under bf16 compute: float32 (exact sums; default, as torchtitan)
    # or bfloat16 (half the traffic of the collectives; the master weights and AdamW stay fp32).
    reduce_dtype: str = "float32"
    cpu_threads: int = 0

    def __post_init__(self) -> None:
        _need(self.device in ("auto", "cpu", "cuda"), "parallel.device", f"must be auto, cpu or cuda, got {self.device!r}")
        _need(self.dtype in ("auto", "bfloat16", "float32"), "parallel.dtype",
              f"must be auto, bfloat16 or float32, got {self.dtype!r}")
        _need(self.cpu_threads >= 0, "parallel.cpu_threads", "must be >= 0 (0 = torch's default)")
        _need(self.reduce_dtype in ("float32", "bfloat16"), "parallel.reduce_dtype",
              f"must be float32 or bfloat16, got {self.reduce_dtype!r}")
        _need(isinstance(self.activation_checkpointing, bool) or self.activation_checkpointing >= 0,
              "parallel.activation_checkpointing", "must be true, false or a number of blocks >= 0")


@dataclass
class CheckpointSection:
    """DCP checkpoints in `dir` (default `<run_dir>/checkpoints`) every `every` steps and at the end;
    the newest `keep` are kept. resume: "auto" (newest complete one, if any), "none", or a path."""

    dir: str | None = None
    every: int = 1000
    keep: int = 2
    resume: str = "auto"

    def __post_init__(self) -> None:
        self.dir = _expand(self.dir)
        if self.resume not in ("auto", "none"):
            self.resume = _expand(self.resume)
        _need(self.every >= 1 and self.keep >= 1, "checkpoint.every/keep", "must be >= 1")


@dataclass
class LogSection:
    """Rank 0 logs every `every` steps to stdout and `<run_dir>/metrics.jsonl` (and tensorboard).
    peak_flops: per-device peak for MFU; null = known GPUs (H100/H200 989e12 bf16 dense), else no MFU."""

    every: int = 1
    tensorboard: bool = False
    progress: bool | str = "auto"
    peak_flops: float | None = None

    def __post_init__(self) -> None:
        _need(self.every >= 1, "log.every", "must be >= 1")
        _need(str(self.progress).lower() in ("auto", "true", "false"), "log.progress", "must be auto, true or false")
        self.progress = str(self.progress).lower()


@dataclass
class DebugSection:
    """Test hooks: `nan_at_step` makes that step's loss NaN; `step_delay_s` sleeps after each step."""

    nan_at_step: int | None = None
    step_delay_s: float = 0.0


@dataclass
class TrainConfig:
    """A whole run. The YAML file has the same shape: top-level `run_dir` (metrics.jsonl, config.yaml,
    checkpoints/, tensorboard/) and one mapping per section; see configs/ for examples."""

    run_dir: str = "runs/default"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)  # data.path is required
    train: LoopSection = field(default_factory=LoopSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    debug: DebugSection = field(default_factory=DebugSection)

    def __post_init__(self) -> None:
        self.run_dir = _expand(self.run_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.run_dir) / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _build(cls, data, "config")

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
        """Reads a YAML file (None = defaults) and applies `section.key=value` overrides."""
        data: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"training config not found: {path}")
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as exc:
                raise ValueError(f"{path}: not valid YAML: {exc}") from exc
            if not isinstance(data, dict):
                raise ValueError(f"{path}: a training config must be a mapping of sections")
        for key, value in parse_overrides(overrides or []):
            set_dotted(data, key, value)
        return cls.from_dict(data)


# ---- overrides -----------------------------------------------------------------------------------
def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """["--optim.lr=1e-3", "--train.steps", "10", "log.every=5"] -> [("optim.lr", 0.001), ...].

    Values are parsed as YAML scalars/lists (numbers, true/false, null, [a, b]).
    """
    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        key = arg.removeprefix("--")
        if "=" in key:
            key, raw = key.split("=", 1)
        elif arg.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            i += 1
            raw = args[i]
        else:
            raise ValueError(f"override {arg!r} must look like --section.key=value or section.key=value")
        if not key or key.startswith(".") or key.endswith("."):
            raise ValueError(f"override {arg!r}: bad key {key!r}")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        # "1e-3" is a string to YAML 1.1; a user means a number.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        out.append((key.replace("-", "_"), value))
        i += 1
    return out


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


# ---- dict -> dataclass ---------------------------------------------------------------------------
def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(known)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        path = name if where == "config" else f"{where}.{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, path)
        else:
            kwargs[name] = _coerce(value, hint, path)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field missing
        raise ValueError(f"{where}: {exc}") from exc


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Light type check against the annotation (unions allowed): ints become floats where a float is
    expected, lists become tuples; anything else of the wrong kind raises ValueError."""
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = list(typing.get_args(hint)) if is_union else [hint]
    if value is None:
        _need(type(None) in options, where, "may not be null")
        return None
    for opt in options:
        kind = typing.get_origin(opt) or opt
        if kind is bool and isinstance(value, bool):
            return value
        if isinstance(value, bool):
            continue  # true/false is never a number or a string here
        if kind is float and isinstance(value, (int, float)):
            return float(value)
        if kind is int and isinstance(value, int):
            return value
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if kind in (str, dict) and isinstance(value, kind):
            return value
        if kind is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
    names = " or ".join(getattr(typing.get_origin(o) or o, "__name__", str(o)) for o in options)
    raise ValueError(f"{where}: expected {names}, got {value!r}")
