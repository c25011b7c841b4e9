"""Training throughput and MFU at the xLSTM 7B block shape, with the training stack of fast_xlstm.training.

d 4096, 8 heads (qk 256, v 512), FFN 10944, vocab 50304, context 8192; N blocks. The same code as
`fast-xlstm train`: meta-device build, FSDP2 per block (bf16 compute, fp32 master weights, fp32
gates), the 7B init, AdamW + clipping, rows packed from documents (cu_seqlens at document starts),
optional activation checkpointing and compile. Random tokens: no data needed.

    torchrun --standalone --nproc-per-node 2 bench/train_mfu.py --blocks auto --ac --out results/train_mfu.json
    python bench/train_mfu.py --blocks 8 --steps 5                  # one GPU, no torchrun needed
    ... --docs-per-row 0                    # plain [B, S] forward: the cost of the per-document resets
    python bench/train_mfu.py --device cpu --shape tiny --blocks 2 --seq-len 256 --steps 2   # smoke test

tokens/s per GPU = rows x seq_len x accumulation / step time (median of the timed steps), and
MFU = 6 x parameters x tokens/s per GPU / peak (989e12 = H100/H200 dense bf16; --peak-flops).
The 6N count leaves out the mLSTM cell's own FLOPs (reported separately as `cell_flops_per_token`).
--blocks auto picks the most blocks whose weights, grads and AdamW state (16 bytes per parameter,
sharded) plus an activation estimate fit in 85% of the GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
try:
    import fast_xlstm  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT / "src"))

from fast_xlstm import ops  # noqa: E402
from fast_xlstm.config import XLSTMConfig, xlstm_tiny  # noqa: E402
from fast_xlstm.training.config import OptimSection  # noqa: E402
from fast_xlstm.training.metrics import device_peak_flops  # noqa: E402
from fast_xlstm.training.optim import build_optimizer, grad_norm_and_clip  # noqa: E402
from fast_xlstm.training.packing import loss_sum, packed_loss_sum  # noqa: E402
from fast_xlstm.training.parallelize import (  # noqa: E402
    build_model,
    destroy_distributed,
    init_distributed,
    init_model_,
    sync_replicated_grads,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", default="auto", help="number of mLSTM blocks, or auto (most that fit)")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--micro-batch", type=int, default=1, help="rows per GPU per forward")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--docs-per-row", type=int, default=4,
                   help="documents packed per row (state reset at each start); 0 = plain [B, S] forward")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, autotune)")
    p.add_argument("--ac", action="store_true", help="activation checkpointing on every block")
    p.add_argument("--ac-blocks", default=None,
                   help="checkpoint only the first N blocks, or auto: the fewest with which the blocks fit")
    p.add_argument("--compile", action="store_true", help="torch.compile the norms and FFNs")
    p.add_argument("--no-reshard", action="store_true", help="keep block weights gathered between fwd and bwd")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--reduce-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="gradient reduce-scatter dtype (parallel.reduce_dtype)")
    p.add_argument("--peak-flops", type=float, default=None, help="per-GPU peak (default: known GPUs, else 989e12)")
    p.add_argument("--out", default=None, help="JSON result file (rank 0)")
    p.add_argument("--profile", action="store_true",
                   help="after the timed steps, profile two more: device time per step by kind and top kernels")
    p.add_argument("--trace", default=None, help="with --profile: keep the host+device trace of one step (.json.gz)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: smoke test of this script only")
    p.add_argument("--shape", default="7b", choices=("7b", "tiny"), help="tiny: smoke test of this script only")
    return p.parse_args(argv)


def model_shape(args: argparse.Namespace, blocks: int) -> XLSTMConfig:
    """The 7B block shape with `blocks` blocks (or, --shape tiny, a CPU smoke-test shape)."""
    if args.shape == "tiny":
        return xlstm_tiny().replace(num_blocks=blocks)
    return XLSTMConfig(num_blocks=blocks)


def memory_need(args: argparse.Namespace, world: int, blocks: int, ac_blocks: int) -> float:
    """Estimated peak bytes per GPU with `blocks` blocks, the first `ac_blocks` of them checkpointed:
    sharded fp32 weights + grads + AdamW state (16 bytes per parameter), the gathered bf16 weights,
    the head's bf16 logits and their gradient, and activations. Per token and block that is ~15 d-wide
    bf16 values kept for the backward (q, k, v, o, norms, FFN) plus the cell's chunk-start states
    (NH x DK x DV bf16 per chunk), calibrated on 8 blocks at 8k (d565d2e: 1.2 GiB per block at 8,192
    tokens); a checkpointed block keeps its input only, and the recompute holds one block at a time."""
    one, two = model_shape(args, 1), model_shape(args, 2)
    per_block = two.num_parameters() - one.num_parameters()
    base = one.num_parameters() - per_block  # embedding, head, out norm
    tokens = args.micro_batch * args.seq_len
    d = one.embedding_dim
    logits = tokens * one.vocab_size * 2 * 3
    inside = 2 * 15 * d + 2 * one.num_heads * one.qk_head_dim * one.v_head_dim / one.chunk_size
    gathered = 2 * per_block * (blocks if args.no_reshard else 2)
    states = 16 * (base + blocks * per_block) / world
    act = tokens * (2 * d * ac_blocks + inside * (blocks - ac_blocks + (1 if ac_blocks else 0)))
    return states + gathered + logits + act


def free_bytes() -> float:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory * 0.85


def auto_blocks(world: int, args: argparse.Namespace) -> int:
    """Most blocks (<= 32) that fit (`memory_need` in 85% of the GPU memory), checkpointing every block
    when --ac or --ac-blocks is given, else none."""
    free = free_bytes()
    for n in range(32, 0, -1):
        if memory_need(args, world, n, n if (args.ac or args.ac_blocks) else 0) < free:
            return n
    raise SystemExit("not even one block fits: use more GPUs or a shorter --seq-len")


def auto_ac_blocks(world: int, args: argparse.Namespace, blocks: int) -> int:
    """Fewest checkpointed blocks with which `blocks` blocks fit: recompute only what memory needs."""
    free = free_bytes()
    for k in range(blocks + 1):
        if memory_need(args, world, blocks, k) < free:
            return k
    return blocks


def cell_flops_per_token(cfg: XLSTMConfig, chunk: int) -> float:
    """Forward + backward FLOPs of the chunkwise mLSTM cell per token (all blocks), roughly:
    intra-chunk q.k and scores.v (causal half), inter-chunk q.C and the k v^T state update; x3 for bwd."""
    dk, dv, nh = cfg.qk_head_dim, cfg.v_head_dim, cfg.num_heads
    fwd = nh * (2 * chunk * (dk + dv) / 2 + 2 * dk * dv * 2)
    return 3 * fwd * cfg.num_blocks


def make_batch(args: argparse.Namespace, vocab: int, device: torch.device, gen: torch.Generator):
    ids = torch.randint(1, vocab, (args.micro_batch, args.seq_len), generator=gen, device=device)
    starts = torch.zeros(ids.shape, dtype=torch.bool)  # host memory, as the training loader gives it
    if args.docs_per_row:
        step = max(1, args.seq_len // args.docs_per_row)
        starts[:, ::step] = True
        ids[:, ::step] = 0  # every document begins with BOS 0
    labels = torch.roll(ids, -1, dims=1)
    return ids, starts, labels


_KINDS = (("gemm", ("nvjet", "gemm", "cutlass", "xmma", "cublas", "splitKreduce")),
          ("mlstm", ("_fwd_states_kernel", "_fwd_out_kernel", "_bwd_", "_rowdot")),
          ("nccl", ("nccl",)),
          ("optimizer", ("multi_tensor_apply", "foreach")),
          ("inductor", ("triton_",)),
          ("copy", ("Memcpy", "Memset", "copy_kernel", "CatArray")))


def _kind(name: str) -> str:
    for kind, keys in _KINDS:
        if any(k in name for k in keys):
            return kind
    return "other"


def profile_steps(step, sync, steps: int = 2, keep_trace: str | None = None) -> dict:
    """Device time per training step by kind of kernel (GEMMs, the mLSTM kernels, compiled glue, the optimizer,
    collectives, copies, other) and the top kernels, from torch.profiler over `steps` steps; `wall_ms` is
    the step's host-measured time under the profiler, so wall minus the kinds' sum bounds the GPU's idle
    time on one stream (collectives may overlap)."""
    sync()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = (time.perf_counter() - t0) / steps
    by_name: dict[str, list[float]] = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if us > 0:
            acc = by_name.setdefault(ev.key[:100], [0.0, 0.0])
            acc[0] += us / 1e3 / steps
            acc[1] += ev.count / steps
    by_kind: dict[str, float] = {}
    for name, (ms, _) in by_name.items():
        by_kind[_kind(name)] = by_kind.get(_kind(name), 0.0) + ms
    top = sorted(({"name": n, "ms": v[0], "calls": v[1], "kind": _kind(n)} for n, v in by_name.items()),
                 key=lambda r: -r["ms"])[:40]
    return {"wall_ms": wall * 1e3, "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "kernel_ms": sum(by_kind.values()), "top": top, "idle": idle_profile(step, sync, keep_trace)}


def idle_profile(step, sync, keep_trace: str | None = None) -> dict:
    """One more step traced with host activity too: the device's idle gaps and their causes
    (`trace_gaps.idle_gaps`: a host sync, or launches slower than the device). Host tracing slows the
    host, so launch-bound gaps read longer than unprofiled; sync-caused gaps are the ones to remove."""
    import tempfile

    from trace_gaps import idle_gaps  # (bench/ is the script's folder)

    sync()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        step()
        sync()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        if keep_trace:
            import gzip
            import shutil

            with open(path, "rb") as src, gzip.open(keep_trace, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return idle_gaps(path, min_gap_us=20.0, top=25)


def git_commit() -> str:
    """$FAST_XLSTM_COMMIT when set (a copied working tree may carry stale git metadata), else git's HEAD."""
    if os.environ.get("FAST_XLSTM_COMMIT"):
        return os.environ["FAST_XLSTM_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("FAST_XLSTM_COMMIT", "unknown")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs CUDA GPUs")
    env = init_distributed(args.device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    try:
        blocks = auto_blocks(env.world_size, args) if args.blocks == "auto" else int(args.blocks)
        if args.ac_blocks is None:
            ac_blocks = blocks if args.ac else 0
        elif args.ac_blocks == "auto":
            ac_blocks = auto_ac_blocks(env.world_size, args, blocks) if cuda else blocks
        else:
            ac_blocks = min(int(args.ac_blocks), blocks)
        cfg = model_shape(args, blocks)
        dtype = getattr(torch, args.dtype) if cuda else torch.float32
        model = build_model(cfg, env, dtype=dtype, activation_checkpointing=ac_blocks, compile=args.compile,
                            reshard_after_forward=not args.no_reshard, reduce_dtype=getattr(torch, args.reduce_dtype))
        init_model_(model, recipe="7b", seed=0)
        model.train()
        optimizer = build_optimizer(model, OptimSection())
        gen = torch.Generator(device=env.device).manual_seed(1234 + env.rank)
        tokens_per_step = args.micro_batch * args.seq_len * args.accum  # per GPU
        backend = ops.resolve_backend(torch.empty(1, device=env.device)).name

        def step() -> float:
            total = torch.zeros((), device=env.device)
            for _ in range(args.accum):
                ids, starts, labels = make_batch(args, cfg.vocab_size, env.device, gen)
                if args.docs_per_row:
                    loss = packed_loss_sum(model, ids, starts, labels)
                else:
                    loss = loss_sum(model(ids)[0], labels)
                loss = loss / labels.numel()
                loss.backward()
                total += loss.detach()  # on the device: a read-back per micro-batch would idle the GPU
            sync_replicated_grads(model, env)
            grad_norm_and_clip(model, 0.5)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(total) / args.accum

        times, losses = [], []
        for k in range(args.warmup + args.steps):
            sync()
            t0 = time.perf_counter()
            losses.append(step())
            sync()
            if k >= args.warmup:
                times.append(time.perf_counter() - t0)
        trace = args.trace if env.is_main else None
        prof = profile_steps(step, sync, keep_trace=trace) if args.profile and cuda else None
        # The slowest rank sets the pace: take each step's max over ranks.
        t = torch.tensor(times, device=env.device)
        if env.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times = t.tolist()
        med = statistics.median(times)
        tps_gpu = tokens_per_step / med
        params = cfg.num_parameters()
        peak = args.peak_flops or device_peak_flops(env.device) or 989e12
        result = {
            "benchmark": "train_mfu",
            "device": torch.cuda.get_device_name(env.device) if cuda else platform.processor() or "cpu",
            "gpus": env.world_size,
            "commit": git_commit(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "mlstm_backend": backend,
            "shape": {"blocks": blocks, "embedding_dim": cfg.embedding_dim, "num_heads": cfg.num_heads,
                      "ffn_dim": cfg.ffn_dim, "vocab_size": cfg.vocab_size, "seq_len": args.seq_len},
            "parameters": params,
            "checkpointed_blocks": ac_blocks,
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "step_time_s": {"median": med, "min": min(times), "max": max(times), "all": times},
            "tokens_per_s_per_gpu": tps_gpu,
            "tokens_per_s": tps_gpu * env.world_size,
            "peak_flops_per_gpu": peak,
            "mfu": 6 * params * tps_gpu / peak,
            "cell_flops_per_token": cell_flops_per_token(cfg, cfg.chunk_size),
            "mfu_with_cell_flops": (6 * params + cell_flops_per_token(cfg, cfg.chunk_size)) * tps_gpu / peak,
            "max_memory_allocated_gib": torch.cuda.max_memory_allocated(env.device) / 2**30 if cuda else None,
            "losses": losses,
        }
        if prof is not None:
            result["profile"] = prof
        if env.is_main:
            print(f"{result['device']} x{env.world_size}, {blocks} blocks ({params / 1e9:.2f}B params, "
                  f"{ac_blocks} checkpointed), "
                  f"seq {args.seq_len}, backend {backend}: {tps_gpu:,.0f} tokens/s per GPU, "
                  f"MFU {result['mfu']:.1%} (step {med * 1e3:.0f} ms, peak mem "
                  f"{result['max_memory_allocated_gib'] or 0:.1f} GiB)", flush=True)
            if prof is not None:
                print(f"profile, ms per step: wall {prof['wall_ms']:.1f}, "
                      + ", ".join(f"{k} {v:.1f}" for k, v in prof["by_kind_ms"].items()), flush=True)
                for row in prof["top"][:12]:
                    print(f"  {row['ms']:8.2f} ms  {row['calls']:5.0f}x  {row['name']}", flush=True)
                idle = prof["idle"]
                print(f"one step traced with the host: window {idle['window_ms']:.1f} ms, device busy "
                      f"{idle['busy_ms']:.1f}, idle {idle['idle_ms']:.1f} in {idle['gaps']} gaps; by cause:", flush=True)
                for row in idle["by_cause"][:15]:
                    print(f"  {row['ms']:8.2f} ms  {row['gaps']:5d}x  {row['cause']}", flush=True)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        return 0
    finally:
        destroy_distributed(env)


if __name__ == "__main__":
    sys.exit(main())
