"""Process group, FSDP2 sharding, activation checkpointing, compile, and sharded weight init/loading.

Kept apart from the model (as in torchtitan): the model file knows nothing of distribution.
- One code path for one CPU process and for many GPUs: a single process is a world of one
  (an in-memory store), so `fully_shard` is always applied.
- The model is built on the meta device, every block is `fully_shard`-ed, then the root (embedding,
  out norm, head); only then is memory allocated (`to_empty`) and each rank fills its own shards.
- bf16 compute with fp32 master weights on GPU (`MixedPrecisionPolicy`); the input/forget gate
  projections stay out of FSDP (`ignored_params`): tiny replicated fp32 tensors, so the gates run
  in fp32 from fp32 weights as in the 7B run (FSDP would hand them to the model in bf16).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from ..config import XLSTMConfig
from ..model import XLSTMForCausalLM
from ..model.init import init_weights
from ..model.mlstm import MLSTMLayer
from ..model.weights import canonical_tensors, checkpoint_files, iter_checkpoint_tensors

logger = logging.getLogger(__name__)


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh
    owns_group: bool  # we created the process group (and destroy it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistEnv:
    """Joins the torchrun process group (env RANK/WORLD_SIZE), or makes a world of one."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("parallel.device is cuda but no CUDA device is available")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        # NCCL for GPU tensors, gloo for the few CPU ones (and for CPU-only runs).
        backend = "cuda:nccl,cpu:gloo" if use_cuda else "gloo"
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, device_id=dev if use_cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        owns = True
    mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, mesh, owns)


def destroy_distributed(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def compute_dtype(env: DistEnv, dtype: str) -> torch.dtype:
    """"auto": bf16 on GPU, fp32 on CPU (bf16 matmuls are slow there)."""
    if dtype == "auto":
        return torch.bfloat16 if env.device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]


def gate_params(module: nn.Module) -> list[nn.Parameter]:
    """The input/forget gate projection weights and biases of every mLSTM layer under `module`."""
    out = []
    for m in module.modules():
        if isinstance(m, MLSTMLayer):
            for name in ("igate_preact", "fgate_preact"):
                out += list(getattr(m, name).parameters())
    return out


# ---- building ------------------------------------------------------------------------------------
def _checkpointed(forward):
    """Block forward under non-reentrant activation checkpointing (module names stay unchanged)."""
    @functools.wraps(forward)
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def _compile_regions(model: XLSTMForCausalLM) -> None:
    """Compiles each block's two regions around the mLSTM cell and the head's loss (fullgraph, forward
    and backward through AOTAutograd).

    - `pre_cell`: norm, projections, fp32 gates and their soft cap;
    - `post_cell`: the cell output's per-head norm, output gate, out projection, residual, norm, SwiGLU
      FFN, residual;
    - `head_loss_sum`: out norm, head, soft cap and cross-entropy, so no fp32 logits are stored.

    The cell stays outside: on GPU it is the Triton kernels' custom op, and its packed input plans
    its launches from host-side offsets. Regions, not single modules, so that inductor fuses the
    residual adds, casts and gate math with the norms and activations between the GEMMs (forward and
    backward), where module by module each was a kernel of its own."""
    for block in model.backbone.blocks:
        block.compile_regions()
    model.head_loss_sum = torch.compile(model.head_loss_sum, fullgraph=True)


def checkpointed_blocks(activation_checkpointing: bool | int, num_blocks: int) -> int:
    """How many blocks (the first ones) run under activation checkpointing: True = all, False = none,
    an int n = min(n, num_blocks)."""
    if isinstance(activation_checkpointing, bool):
        return num_blocks if activation_checkpointing else 0
    if activation_checkpointing < 0:
        raise ValueError(f"activation_checkpointing must be a bool or a block count >= 0, got {activation_checkpointing}")
    return min(int(activation_checkpointing), num_blocks)


def build_model(config: XLSTMConfig, env: DistEnv, *, dtype: torch.dtype, activation_checkpointing: bool | int = False,
                compile: bool = False, reshard_after_forward: bool = True,
                reduce_dtype: torch.dtype = torch.float32) -> XLSTMForCausalLM:
    """A sharded model with allocated but uninitialised weights (call `init_model_` or `load_hub_weights_`).
    activation_checkpointing: True (every block), False, or the number of blocks, from the first, to
    checkpoint (`checkpointed_blocks`). reduce_dtype: the gradient reduce-scatter's dtype under a
    lower-precision compute dtype."""
    if config.tie_word_embeddings:
        raise ValueError("training with tied embeddings is not supported (the xLSTM 7B unties them)")
    if config.weight_mode != "single":
        raise ValueError("training needs weight_mode 'single' (fused projections are an inference format)")
    with torch.device("meta"):
        model = XLSTMForCausalLM(config)
    mp = (MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=reduce_dtype) if dtype != torch.float32
          else MixedPrecisionPolicy())
    replicated = set(gate_params(model))
    n_ac = checkpointed_blocks(activation_checkpointing, config.num_blocks)
    for b, block in enumerate(model.backbone.blocks):
        if b < n_ac:
            block.forward = _checkpointed(block.forward)
        fully_shard(block, mesh=env.mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward,
                    ignored_params=set(gate_params(block)))
    # The root holds embedding, out norm and head; it stays unsharded between forward and backward.
    fully_shard(model, mesh=env.mesh, mp_policy=mp, reshard_after_forward=False, ignored_params=replicated)
    if compile:
        _compile_regions(model)
    model.to_empty(device=env.device)
    return model


class _ShardedCopy(TorchFunctionMode):
    """Makes `dtensor.copy_(full_tensor)` copy this rank's shard of the full tensor. Every rank holds
    the same full tensor (same seed or same file), so no communication is needed."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.copy_ and isinstance(args[0], DTensor) and not isinstance(args[1], DTensor):
            dst, src = args[0], args[1]
            full = src.to(device=dst.device, dtype=dst.dtype)
            local = distribute_tensor(full, dst.device_mesh, dst.placements, src_data_rank=None).to_local()
            dst.to_local().copy_(local)
            return dst
        return func(*args, **kwargs)


@torch.no_grad()
def init_model_(model: XLSTMForCausalLM, *, recipe: str = "7b", seed: int = 0) -> None:
    """Runs `init_weights` on the sharded model: the same values as `XLSTMForCausalLM.from_config(
    config, init=recipe, seed=seed)`, whatever the number of ranks (each draws the full tensor and
    keeps its shard; peak extra memory is the largest single tensor)."""
    with _ShardedCopy():
        init_weights(model, recipe=recipe, seed=seed)


@torch.no_grad()
def load_hub_weights_(model: XLSTMForCausalLM, path: str | Path) -> None:
    """Streams a hub/xlstm-layout checkpoint into the sharded model, one tensor at a time."""
    path = Path(path)
    _, files = checkpoint_files(path)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    with _ShardedCopy():
        for key, tensor in canonical_tensors(iter_checkpoint_tensors(files), model.config):
            if key not in params:
                raise ValueError(f"{path}: unexpected tensor {key}")
            want = params[key].shape
            if tuple(tensor.shape) != tuple(want):
                raise ValueError(f"{path}: tensor {key} has shape {tuple(tensor.shape)}, expected {tuple(want)}")
            params[key].copy_(tensor)
            loaded.add(key)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{path}: checkpoint is missing tensor(s): {', '.join(missing[:8])}")


def sync_replicated_grads(model: nn.Module, env: DistEnv) -> None:
    """Averages the gradients of the replicated (non-FSDP) gate parameters over ranks, as FSDP's
    reduce-scatter does for the others. One flat all-reduce."""
    if env.world_size == 1:
        return
    params = [p for p in gate_params(model) if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)  # SUM: gloo has no AVG
    flat /= env.world_size
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n
