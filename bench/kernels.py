"""mLSTM kernel benchmark on one CUDA GPU: fast_xlstm's Triton kernels vs mlstm_kernels 2.0.6.

At the xLSTM 7B head shapes (NH 8, DK 256, DV 512, bf16 q/k/v, fp32 gate pre-activations):
  * chunkwise forward and forward+backward per layer over B*S = 65,536 tokens, contexts 512 .. 65,536,
    ours (chunk 64 and 128) against `chunkwise--triton_limit_chunk` and `chunkwise--triton_xl_chunk`;
  * the fused decode step on a state-slot pool (fp32 and bf16 state) at batch 1, 8, 64, 256: microseconds
    (eager and inside a CUDA graph) and achieved GB/s of state traffic (read + write of C, n, m of B
    sequences plus q, k, v), next to the card's copy bandwidth measured in the same run; also
    mlstm_kernels' functional step kernel ("triton") for reference.
Every implementation runs in its own subprocess (a compiler crash, e.g. an LLVM assertion, or an OOM only
loses that row). Times are medians of triton.testing.do_bench.

  python3 bench/kernels.py --out results/kernels.json [--quick] [--tune]
  python3 bench/kernels.py --summary results/kernels.json     # print the tables of an earlier run
  python3 bench/kernels.py --check-cpu      # same function as mlstm_kernels' native torch twins (CPU, no GPU)
Writes the JSON (device, versions, git commit, a hash of the kernel sources) and, with matplotlib, a PNG.

Accuracy: both packages compute the same function under the call below (raw gate pre-activations, q scaled
by DK**-0.5 inside, eps 1e-6 after max(|n.q|, exp(-m)), m_0 = 0); `--check-cpu` shows it against
mlstm_kernels' native torch kernels. On these random inputs the normalizer n.q often nearly cancels, and the
largest |h| sits exactly at such positions, so "max |h_them - h_ours| / max |h_ours|" measures the worst
conditioned row: mlstm_kernels' bf16 intermediates (limit_chunk rounds S, n and q.n terms to bf16) give
~0.4 there while the median row agrees to ~3e-3. The check therefore also reports both sides against an
fp64 reference, with the median and 99th percentile of the per-position relative error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NH, DK, DV = 8, 256, 512
TOKENS = 65536
CONTEXTS = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
STEP_BATCHES = [1, 8, 64, 256]
SEQ_IMPLS = {  # name -> (kind, chunk size)
    "fast_xlstm_L64": ("ours", 64),
    "fast_xlstm_L128": ("ours", 128),
    # The baselines' backward re-runs their states kernel (limit_chunk always, xl_chunk by default); ours keeps
    # the forward's chunk states unless told to recompute: this row is ours on the baselines' terms.
    "fast_xlstm_L64_recompute": ("ours_recompute", 64),
    "mlstm_kernels_limit_chunk": ("chunkwise--triton_limit_chunk", 64),
    "mlstm_kernels_xl_chunk": ("chunkwise--triton_xl_chunk", 128),
}
BASELINE = "mlstm_kernels_limit_chunk"


def _import_fast_xlstm():
    try:
        import fast_xlstm  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT / "src"))


# ---------------------------------------------------------------- workers (run in subprocesses)

def _seq_inputs(B, S, requires_grad, seed=0, device="cuda"):
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, device=device)
    q, k, v = (rn(B, NH, S, d).to(torch.bfloat16) for d in (DK, DK, DV))
    i = 15 * torch.tanh(3 * rn(B, NH, S) / 15)
    f = 15 * torch.tanh((3 + 2 * rn(B, NH, S)) / 15)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, i, f)]


def _seq_fn(kind: str, chunk: int, gate_dtype):
    import torch
    if kind in ("ours", "ours_recompute"):
        _import_fast_xlstm()
        from fast_xlstm.ops.triton import mlstm_chunkwise_triton
        recompute = kind == "ours_recompute"
        return lambda q, k, v, i, f: mlstm_chunkwise_triton(q, k, v, i, f, chunk_size=chunk,
                                                            recompute_states=recompute)[0]
    from mlstm_kernels.torch import get_mlstm_kernel
    kern = get_mlstm_kernel(kind)
    return lambda q, k, v, i, f: kern(q, k, v, i.to(gate_dtype), f.to(gate_dtype), chunk_size=chunk,
                                      autocast_kernel_dtype=torch.bfloat16, return_last_states=False)


def _errors_vs_ref(h, ref) -> dict:
    """Errors of output h against a reference: the max over the max (dominated by the worst-conditioned
    position) and the median / 99th percentile / max of the per-position relative error."""
    d, ref = h.double() - ref.double(), ref.double()
    row = (d.norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).flatten()
    q = row.quantile(row.new_tensor([0.5, 0.99]))
    return {"max_rel": (d.abs().max() / ref.abs().max()).item(), "row_median": q[0].item(),
            "row_p99": q[1].item(), "row_max": row.max().item()}


def worker_seq(kind: str, chunk: int, contexts: list[int], tokens: int, check_ctx: int | None, emit) -> dict:
    """Times one implementation over the contexts: {"fwd_ms": {ctx: ms}, "fwdbwd_ms": ..., "errors": ...}.

    `emit(partial)` is called after every measurement, so a timeout keeps what was measured."""
    import torch
    import triton.testing
    out = {"fwd_ms": {}, "fwdbwd_ms": {}, "errors": {}, "gate_dtype": None}
    gate_dtype = torch.float32
    fn = _seq_fn(kind, chunk, gate_dtype)
    for ctx in contexts:
        B = max(1, tokens // ctx)
        for mode in ("fwd", "fwdbwd"):
            key = f"{mode}_ms"
            try:
                x = _seq_inputs(B, ctx, requires_grad=(mode == "fwdbwd"))
                if mode == "fwd":
                    def run():
                        with torch.no_grad():
                            fn(*x)
                else:
                    dh = torch.randn(B, NH, ctx, DV, device="cuda", dtype=torch.bfloat16)

                    def run():
                        fn(*x).backward(dh)
                try:
                    run()
                except Exception:
                    if kind.startswith("ours") or gate_dtype != torch.float32:
                        raise
                    gate_dtype = torch.bfloat16  # some kernels want all inputs in one dtype
                    fn = _seq_fn(kind, chunk, gate_dtype)
                    run()
                out["gate_dtype"] = str(gate_dtype)
                torch.cuda.synchronize()
                out[key][ctx] = triton.testing.do_bench(run, warmup=10, rep=60,
                                                        grad_to_none=x if mode == "fwdbwd" else None)
            except Exception as e:  # record and go on (OOM, compile failure, unsupported shape)
                out["errors"][f"{mode}@{ctx}"] = f"{type(e).__name__}: {str(e)[:300]}"
            finally:
                x = dh = None
                torch.cuda.empty_cache()
                emit(out)
    if check_ctx and not kind.startswith("ours"):  # how far apart are they and we, on the same inputs
        try:
            _import_fast_xlstm()
            from fast_xlstm.ops import mlstm_chunkwise_torch
            from fast_xlstm.ops.triton import mlstm_chunkwise_triton
            x = _seq_inputs(1, check_ctx, False, seed=1)
            with torch.no_grad():
                h_them = fn(*x).float()
                h_us = mlstm_chunkwise_triton(*x, chunk_size=64)[0].float()
                ref = mlstm_chunkwise_torch(*(t.double() for t in x), chunk_size=64)[0]
            out["max_rel_diff_vs_ours"] = ((h_them - h_us).abs().max() / h_us.abs().max()).item()
            out["err_vs_fp64"] = {"them": _errors_vs_ref(h_them, ref), "ours": _errors_vs_ref(h_us, ref)}
        except Exception as e:
            out["errors"]["check"] = f"{type(e).__name__}: {str(e)[:300]}"
    return out


def worker_step(batches: list[int], emit) -> dict:
    """Times the in-place slot-pool step (ours) and mlstm_kernels' functional step."""
    import torch
    import triton.testing
    _import_fast_xlstm()
    from fast_xlstm.ops.triton import mlstm_step_slots_
    res = {"copy_GBps": None, "rows": [], "errors": {}}
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")  # a 1 GiB copy: the card's practical bandwidth
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=5, rep=40)
    res["copy_GBps"] = 2 * src.numel() * 4 / ms / 1e6
    src = dst = None
    try:
        from mlstm_kernels.torch import get_mlstm_step_kernel
        theirs = get_mlstm_step_kernel("triton")
    except Exception as e:
        theirs = None
        res["errors"]["mlstm_kernels_step"] = f"{type(e).__name__}: {e}"
    for sd in (torch.float32, torch.bfloat16):
        es = torch.finfo(sd).bits // 8
        for B in batches:
            row = {"batch": B, "state_dtype": str(sd).replace("torch.", "")}
            try:
                g = torch.Generator(device="cuda").manual_seed(B)
                q, k = (torch.randn(B, NH, DK, generator=g, device="cuda").bfloat16() for _ in range(2))
                v = torch.randn(B, NH, DV, generator=g, device="cuda").bfloat16()
                i = torch.randn(B, NH, generator=g, device="cuda")
                f = 3 + torch.randn(B, NH, generator=g, device="cuda")
                pool = [torch.zeros(B, NH, DK, DV, device="cuda", dtype=sd),
                        torch.zeros(B, NH, DK, device="cuda", dtype=sd), torch.zeros(B, NH, 1, device="cuda", dtype=sd)]
                slots = torch.arange(B, dtype=torch.int32, device="cuda")
                step = lambda: mlstm_step_slots_(q, k, v, i, f, *pool, slots)
                step()
                state_bytes = 2 * B * NH * (DK * DV + DK + 1) * es
                io_bytes = B * NH * (2 * DK + DV) * 2
                row["bytes"] = state_bytes + io_bytes
                row["eager_us"] = 1e3 * triton.testing.do_bench(step, warmup=10, rep=50)
                row["graph_us"] = 1e3 * triton.testing.do_bench_cudagraph(step, rep=50)
                row["GBps"] = row["bytes"] / (row["graph_us"] * 1e3)
                row["bound_us"] = row["bytes"] / (res["copy_GBps"] * 1e3)
                row["x_of_bound"] = row["graph_us"] / row["bound_us"]
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            if theirs is not None and "error" not in row:
                try:  # functional: allocates the new state each call
                    C, n, m = pool
                    them = lambda: theirs(q, k, v, i[..., None], f[..., None], C, n, m, dtype_state=sd)
                    them()
                    row["mlstm_kernels_eager_us"] = 1e3 * triton.testing.do_bench(them, warmup=10, rep=50)
                    row["mlstm_kernels_graph_us"] = 1e3 * triton.testing.do_bench_cudagraph(them, rep=50)
                except Exception as e:
                    row["mlstm_kernels_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            res["rows"].append(row)
            emit(res)
            pool = None
            torch.cuda.empty_cache()
    return res


def check_cpu(S: int = 256, seed: int = 1) -> int:
    """On CPU: ours against mlstm_kernels' native torch kernels (the twins of its Triton ones), called as the
    bench calls them, on the bench's input distribution at the 7B head shapes. Returns 0 when all agree.

    fp64: the same function to 1e-10 (a convention mismatch - gate meaning, q scaling, eps, normalizer, m_0 -
    would show as O(1)); fp32: within 1e-3 (max/max) of the fp64 recurrent definition."""
    import torch
    _import_fast_xlstm()
    from mlstm_kernels.torch.chunkwise import native as mk_chunkwise
    from mlstm_kernels.torch.recurrent import native_sequence as mk_recurrent

    from fast_xlstm.ops import mlstm_chunkwise_torch, mlstm_recurrent
    chunkwise = mk_chunkwise.mlstm_chunkwise__native_autograd  # the native twin of chunkwise--triton_*
    recurrent = mk_recurrent.mlstm_recurrent_sequence__native_fw
    x = _seq_inputs(1, S, False, seed=seed, device="cpu")
    ref = mlstm_recurrent(*(t.double() for t in x))[0]
    ok = True
    print(f"B 1, NH {NH}, S {S}, DK {DK}, DV {DV}; errors against our fp64 recurrent definition")
    for dt, tol in ((torch.float64, 1e-10), (torch.float32, 1e-3)):
        xd = [t.to(dt) for t in x]
        ours = mlstm_chunkwise_torch(*xd, chunk_size=64)[0]
        outs = {"fast_xlstm chunkwise L64": ours,
                "mk chunkwise--native_autograd L64": chunkwise(*xd, chunk_size=64),
                "mk chunkwise--native_autograd L128": chunkwise(*xd, chunk_size=128),
                "mk native_sequence__native": recurrent(*xd, dtype_state=dt)}
        for name, h in outs.items():
            e = _errors_vs_ref(h, ref)
            vs_ours = ((h.double() - ours.double()).abs().max() / ours.double().abs().max()).item()
            good = e["max_rel"] <= tol
            ok &= good
            print(f"{str(dt).replace('torch.', ''):>8} {name:36s} max/max {e['max_rel']:.1e} (tol {tol:.0e}) "
                  f"row median {e['row_median']:.1e}  vs ours {vs_ours:.1e}  {'ok' if good else 'MISMATCH'}")
    return 0 if ok else 1


# ---------------------------------------------------------------- orchestration

def _run_worker(spec: dict, timeout: float) -> dict:
    """Runs a worker in a fresh interpreter; returns its JSON or {"crash": ...}."""
    with tempfile.TemporaryDirectory() as d:
        res_path = Path(d) / "res.json"
        cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--worker-out", str(res_path)]
        t0 = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy(),
                               check=False)
        except subprocess.TimeoutExpired as e:
            p = None
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else str(e.stderr or "")
            crash = {"crash": f"timed out after {timeout:.0f} s", "stderr_tail": err[-2000:]}
        else:
            crash = {"crash": f"exit code {p.returncode}", "stderr_tail": (p.stderr or "")[-3000:]}
        res = json.loads(res_path.read_text()) if res_path.exists() else {}
        if p is None or p.returncode != 0:
            res.update(crash)  # keep what the worker measured before it died
        res["wall_s"] = round(time.time() - t0, 1)
        return res


def _meta() -> dict:
    import torch
    meta = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(), "torch": torch.__version__,
            "shapes": {"NH": NH, "DK": DK, "DV": DV, "tokens_per_call": TOKENS, "qkv_dtype": "bfloat16",
                       "gate_dtype": "float32"}}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    try:
        from importlib.metadata import version

        import mlstm_kernels  # noqa: F401
        meta["mlstm_kernels"] = version("mlstm_kernels")
    except Exception as e:
        meta["mlstm_kernels"] = f"unavailable: {type(e).__name__}"
    meta["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    try:
        meta["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                            timeout=10, check=False).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "src/fast_xlstm/ops"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10, check=False).stdout.strip()
        meta["git_dirty_ops"] = bool(dirty)
    except Exception:
        meta["git_commit"] = None
    # A copied tree (e.g. on a remote GPU machine) can carry stale git metadata: a commit named by the
    # caller wins over what git says there.
    meta["git_commit"] = os.environ.get("FAST_XLSTM_COMMIT") or meta["git_commit"] or os.environ.get("GIT_COMMIT")
    h = hashlib.sha256()
    for p in sorted((ROOT / "src/fast_xlstm/ops/triton").glob("*.py")):
        h.update(p.read_bytes())
    meta["kernel_sources_sha256"] = h.hexdigest()[:16]
    meta["tuned"] = os.environ.get("FAST_XLSTM_TRITON_TUNE") == "1"
    return meta


COPY_BOUND_GBPS = 2970.0  # device-to-device copy on the H100 (../shared/spec/anchors.md), read + write
BF16_PEAK_TFLOPS = 989.0


def forward_work(ctx: int, tokens: int = TOKENS, L: int = 64) -> tuple[float, float]:
    """(FLOPs, bytes) of our chunkwise forward over `tokens` tokens at context `ctx`, 7B heads, bf16.

    FLOPs: per token and head, the chunk's scores q k^T (L x DK) and weighted values (L x DV), the
    inter-chunk q C (DK x DV) and the chunk's state update k^T v (DK x DV), 2 FLOPs per multiply-add.
    Bytes: what the two kernels must move: the states kernel reads k, v; the output kernel reads q, k, v and
    writes h (bf16); the chunk-start states C (bf16, DK x DV per chunk and head) are written once and read
    once. Gates and normalizers (fp32 per position and head) are left out (under 2%)."""
    nct = (tokens // ctx) * -(-ctx // L)
    flops = 2.0 * NH * tokens * (L * DK + L * DV + 2 * DK * DV)
    nbytes = 2.0 * NH * tokens * ((DK + DV) + (2 * DK + 2 * DV)) + 2.0 * 2 * nct * NH * DK * DV
    return flops, nbytes


def summary(res: dict) -> str:
    """Plain-text tables of a result dict."""
    lines = [f"device: {res['meta'].get('device')}  torch {res['meta'].get('torch')}  triton "
             f"{res['meta'].get('triton')}  mlstm_kernels {res['meta'].get('mlstm_kernels')}  "
             f"commit {str(res['meta'].get('git_commit'))[:10]}"]
    seq = res.get("seq", {})
    for mode, title in (("fwd_ms", "forward"), ("fwdbwd_ms", "forward+backward")):
        lines.append(f"\n{title}, ms per layer per {TOKENS} tokens (NH {NH}, DK {DK}, DV {DV}, bf16)")
        names = list(seq)
        lines.append(f"{'context':>8} " + " ".join(f"{n.replace('mlstm_kernels_', 'mk_'):>16}" for n in names)
                     + f" {'best ours/limit':>16}")
        ctxs = sorted({int(c) for n in names for c in seq[n].get(mode, {})})
        for c in ctxs:
            vals = [seq[n].get(mode, {}).get(str(c), seq[n].get(mode, {}).get(c)) for n in names]
            cells = " ".join(f"{v:16.3f}" if isinstance(v, (int, float)) else f"{'-':>16}" for v in vals)
            ours = [v for n, v in zip(names, vals) if n.startswith("fast_xlstm") and isinstance(v, (int, float))]
            base = seq.get(BASELINE, {}).get(mode, {})
            base = base.get(str(c), base.get(c))
            sp = f"{base / min(ours):15.2f}x" if ours and isinstance(base, (int, float)) else f"{'-':>16}"
            lines.append(f"{c:>8} {cells} {sp}")
    for n, r in seq.items():
        if r.get("crash"):
            lines.append(f"{n}: CRASH {r['crash']}: {r.get('stderr_tail', '')[-300:]!r}")
        for k, e in (r.get("errors") or {}).items():
            lines.append(f"{n} {k}: {e[:160]}")
        if "max_rel_diff_vs_ours" in r:
            lines.append(f"{n}: max |h_them - h_ours| / max |h_ours| = {r['max_rel_diff_vs_ours']:.2e}")
        for side, e in (r.get("err_vs_fp64") or {}).items():
            lines.append(f"{n}: {side} vs fp64: max/max {e['max_rel']:.2e}, per-position relative error median "
                         f"{e['row_median']:.1e} p99 {e['row_p99']:.1e} max {e['row_max']:.1e}")
    fwd = seq.get("fast_xlstm_L64", {}).get("fwd_ms", {})
    if fwd:
        lines.append(f"\nforward roofline, fast_xlstm_L64 (copy bandwidth {COPY_BOUND_GBPS:.0f} GB/s, bf16 dense "
                     f"{BF16_PEAK_TFLOPS:.0f} TFLOP/s): the two-kernel design's compulsory traffic and its products")
        lines.append(f"{'context':>8} {'ms':>7} {'GB':>6} {'GB/s':>6} {'x bw':>5} {'TFLOP':>6} {'TFLOP/s':>8}")
        for c in sorted(int(x) for x in fwd):
            ms = fwd.get(str(c), fwd.get(c))
            flops, nbytes = forward_work(c)
            lines.append(f"{c:>8} {ms:7.3f} {nbytes / 1e9:6.2f} {nbytes / ms / 1e6:6.0f} "
                         f"{nbytes / ms / 1e6 / COPY_BOUND_GBPS:5.2f} {flops / 1e12:6.3f} {flops / ms / 1e9:8.1f}")
    st = res.get("step", {})
    if st:
        lines.append(f"\ndecode step (slot pool, in place), copy bandwidth {st.get('copy_GBps') or 0:.0f} GB/s")
        lines.append(f"{'state':>9} {'batch':>6} {'eager us':>9} {'graph us':>9} {'GB/s':>7} {'x bound':>8} "
                     f"{'mk eager':>9} {'mk graph':>9}")
        for r in st.get("rows", []):
            if "error" in r:
                lines.append(f"{r['state_dtype']:>9} {r['batch']:>6} ERROR {r['error'][:120]}")
                continue
            lines.append(f"{r['state_dtype']:>9} {r['batch']:>6} {r['eager_us']:9.1f} {r['graph_us']:9.1f} "
                         f"{r['GBps']:7.0f} {r['x_of_bound']:8.2f} "
                         f"{r.get('mlstm_kernels_eager_us', float('nan')):9.1f} "
                         f"{r.get('mlstm_kernels_graph_us', float('nan')):9.1f}")
        if st.get("crash"):
            lines.append(f"step: CRASH {st['crash']}: {st.get('stderr_tail', '')[-300:]!r}")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, mode, title in ((axes[0], "fwd_ms", "forward"), (axes[1], "fwdbwd_ms", "forward+backward")):
        for name, r in res.get("seq", {}).items():
            pts = sorted((int(c), v) for c, v in r.get(mode, {}).items())
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (B * S = 65,536 tokens)")
        ax.set_ylabel("ms per layer")
        ax.set_title(f"{title}, 7B heads, bf16")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[2]
    for sd in ("float32", "bfloat16"):
        rows = [r for r in res.get("step", {}).get("rows", []) if r.get("state_dtype") == sd and "graph_us" in r]
        if rows:
            ax.plot([r["batch"] for r in rows], [r["graph_us"] for r in rows], marker="o", label=f"ours, {sd} state")
            ax.plot([r["batch"] for r in rows], [r.get("bound_us", float("nan")) for r in rows], ls="--",
                    label=f"copy bound, {sd}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch")
    ax.set_ylabel("us per layer step (CUDA graph)")
    ax.set_title("decode step, slot pool")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="JSON result path (a PNG is written beside it)")
    ap.add_argument("--quick", action="store_true", help="two contexts, two batch sizes, no xl_chunk")
    ap.add_argument("--contexts", type=int, nargs="*", help="contexts to time (default: 512 .. 65,536)")
    ap.add_argument("--impls", nargs="*", help=f"chunkwise implementations to time (default: all of {list(SEQ_IMPLS)})")
    ap.add_argument("--no-step", action="store_true", help="skip the decode step kernel")
    ap.add_argument("--tune", action="store_true", help="time every launch config of our kernels once, keep the best")
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop starting new workers after this long")
    ap.add_argument("--summary", type=Path, help="print the tables of an earlier JSON result and exit")
    ap.add_argument("--check-cpu", action="store_true",
                    help="on CPU, check that mlstm_kernels' native torch kernels compute our function and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.worker:
        spec = json.loads(a.worker)
        def emit(partial):
            tmp = a.worker_out.with_suffix(".tmp")
            tmp.write_text(json.dumps(partial))
            tmp.replace(a.worker_out)

        if spec["what"] == "seq":
            emit(worker_seq(spec["kind"], spec["chunk"], spec["contexts"], spec["tokens"], spec.get("check_ctx"), emit))
        else:
            emit(worker_step(spec["batches"], emit))
        return 0
    if a.summary:
        print(summary(json.loads(a.summary.read_text())))
        return 0
    if a.check_cpu:
        return check_cpu()
    if a.out is None:
        ap.error("--out is required")

    import torch
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA device", file=sys.stderr)
        return 2
    if a.tune:
        os.environ["FAST_XLSTM_TRITON_TUNE"] = "1"
    contexts = a.contexts or ([512, 8192] if a.quick else CONTEXTS)
    batches = [1, 64] if a.quick else STEP_BATCHES
    impls = {n: v for n, v in SEQ_IMPLS.items() if not (a.quick and n == "mlstm_kernels_xl_chunk")
             and (not a.impls or n in a.impls)}
    t0 = time.time()
    res = {"meta": _meta(), "seq": {}, "step": {}}
    a.out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        a.out.write_text(json.dumps(res, indent=1))

    seq_jobs = {n: {"what": "seq", "kind": k, "chunk": c, "contexts": contexts, "tokens": TOKENS, "check_ctx": 8192}
                for n, (k, c) in impls.items()}
    # The essential comparison first, so a short time budget still gets it.
    order = ["fast_xlstm_L64", BASELINE, "fast_xlstm_L64_recompute", "step", "fast_xlstm_L128", "mlstm_kernels_xl_chunk"]
    jobs = [(n, {"what": "step", "batches": batches} if n == "step" else seq_jobs[n])
            for n in order if (n == "step" and not a.no_step) or n in seq_jobs]
    for name, spec in jobs:
        left = a.budget_s - (time.time() - t0)
        if left < 20:
            if name != "step":
                res["seq"][name] = {"crash": "skipped: time budget"}
            continue
        print(f"[bench] {name} ({left:.0f} s left)", flush=True)
        r = _run_worker(spec, timeout=max(20.0, min(left, 240.0)))
        if name == "step":
            res["step"] = r
        else:
            res["seq"][name] = r
        save()
    res["meta"]["wall_s"] = round(time.time() - t0, 1)
    save()
    try:
        plot(res, a.out.with_suffix(".png"))
    except Exception as e:  # a plot is a nicety; the JSON is the result
        print(f"[bench] plot failed: {e!r}", file=sys.stderr)
    print(summary(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
