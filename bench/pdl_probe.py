"""Probe: does programmatic dependent launch (PDL) shorten a CUDA-graph chain of few-row GEMMs?

A 64-row, few-row-style Triton GEMM kernel (as `ops/triton/few_rows_linear.py`, without its
epilogues) runs the 7B's four projections per layer for 32 layers as one CUDA graph (12.9 GB of
weights), with and without small eager elementwise kernels between the GEMMs ("glue", as the
compiled regions' norms and adds), in these forms:
  pdl=False pf=0      plain launches;
  pdl=True  pf=0      launched with PDL: each program waits for the previous grid (gdc_wait) and
                      at once lets the next one launch (gdc_launch_dependents);
  pdl=True  pf=P      and, before waiting, prefetches the first P columns of its weight rows to L2.
Every form's output is compared with the plain one's (bitwise). Last, one such kernel launched with
launch_pdl inside a torch.compile'd function (a `triton_op`), to see that inductor takes it.

    python bench/pdl_probe.py      (CUDA; prints one line per form)
"""
import time, statistics, torch, triton, triton.language as tl
from triton.language.extra.cuda import gdc_wait, gdc_launch_dependents
import torch._inductor.config as icfg
print("torch", torch.__version__, "triton", triton.__version__, "inductor enable_pdl:", hasattr(icfg.triton, "enable_pdl"))

@triton.jit
def k(X, W, Y, M, N, sxm, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
      PDL: tl.constexpr, PF: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BN + tl.arange(0, BN)
    cmask = cols < N
    rows = tl.arange(0, BM)
    rmask = rows < M
    ks = tl.arange(0, BK)
    w_ptrs = W + cols[:, None].to(tl.int64) * K + ks[None, :]
    x_ptrs = X + rows[:, None].to(tl.int64) * sxm + ks[None, :]
    if PF > 0:  # L2 prefetch of the first PF columns of this program's weight rows, before waiting
        pr = tl.arange(0, BN)
        pc = tl.arange(0, PF // 64) * 64
        pp = W + (pid * BN + pr)[:, None].to(tl.int64) * K + pc[None, :]
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [pp], dtype=tl.int32,
                                  is_pure=False, pack=1)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        x = tl.load(x_ptrs + k0, mask=rmask[:, None], other=0.0)
        w = tl.load(w_ptrs + k0, mask=cmask[:, None], other=0.0, eviction_policy="evict_first")
        acc += tl.dot(x, tl.trans(w))
    tl.store(Y + rows[:, None].to(tl.int64) * N + cols[None, :], acc.to(tl.bfloat16), mask=rmask[:, None] & cmask[None, :])

def lin(x, w, y, pdl, pf):
    M, K = x.shape[0], w.shape[1]; N = w.shape[0]
    if N <= 4096: bn, bk, nw, ns = 32, 256, 4, 4
    else: bn, bk, nw, ns = 32, 128, 4, 3
    k[(triton.cdiv(N, bn),)](x, w, y, M, N, x.stride(0), K=K, BM=64, BN=bn, BK=bk, PDL=pdl, PF=pf,
                             num_warps=nw, num_stages=ns, launch_pdl=pdl)

dev = "cuda"
L, M, D, F = 32, 64, 4096, 10944
g = torch.Generator(device=dev).manual_seed(0)
Ws = [[torch.randn(n, kk, device=dev, dtype=torch.bfloat16, generator=g) * 0.02 for n, kk in
       ((12288, D), (D, D), (2 * F, D), (D, F))] for _ in range(L)]
x0 = torch.randn(M, D, device=dev, dtype=torch.bfloat16)
ys = [torch.empty(M, n, device=dev, dtype=torch.bfloat16) for n in (12288, D, 2 * F, D)]

def chain(pdl, pf, glue):
    x = x0
    for l in range(L):
        w1, w2, w3, w4 = Ws[l]
        lin(x, w1, ys[0], pdl, pf)
        a = ys[0][:, :D]
        if glue: a = a * 1.001
        lin(a, w2, ys[1], pdl, pf)
        b = ys[1]
        if glue: b = b + x
        lin(b, w3, ys[2], pdl, pf)
        c = ys[2][:, :F]
        if glue: c = torch.nn.functional.silu(c)
        lin(c, w4, ys[3], pdl, pf)
        x = ys[3]
    return x

results = {}
outs = {}
for glue in (False, True):
    for pdl, pf in ((False, 0), (True, 0), (True, 512), (True, 2048), (False, 2048)):
        name = f"glue={glue} pdl={pdl} pf={pf}"
        try:
            chain(pdl, pf, glue); torch.cuda.synchronize()
            s = torch.cuda.Stream()
            with torch.cuda.stream(s):
                chain(pdl, pf, glue)
            torch.cuda.synchronize()
            gr = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gr):
                out = chain(pdl, pf, glue)
            gr.replay(); torch.cuda.synchronize()
            ts = []
            for _ in range(30):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record(); gr.replay(); e1.record(); torch.cuda.synchronize()
                ts.append(e0.elapsed_time(e1))
            ms = statistics.median(ts)
            outs[name] = out.clone()
            ref = outs.get(f"glue={glue} pdl=False pf=0")
            same = None if ref is None else bool(torch.equal(ref, out))
            gbs = sum(w.numel() * 2 for ws in Ws for w in ws) / (ms * 1e-3) / 1e9
            print(f"{name}: {ms:.3f} ms ({gbs:.0f} GB/s of weights) equal_to_base={same}", flush=True)
            del gr
        except Exception as e:
            print(name, "FAILED", repr(e)[:300], flush=True)

# inductor + user kernel under compile with launch_pdl kwarg
try:
    from torch.library import triton_op, wrap_triton
    @triton_op("probe::lin", mutates_args=())
    def plin(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
        wrap_triton(k)[(triton.cdiv(w.shape[0], 32),)](x, w, y, x.shape[0], w.shape[0], x.stride(0), K=w.shape[1], BM=64, BN=32, BK=256, PDL=True, PF=0, num_warps=4, num_stages=4, launch_pdl=True)
        return y
    f = torch.compile(lambda x, w: torch.nn.functional.silu(plin(x * 2, w)) + 1, fullgraph=True)
    r = f(x0, Ws[0][1]); torch.cuda.synchronize()
    print("compiled user kernel with launch_pdl ok", float((r - (torch.nn.functional.silu((x0*2) @ Ws[0][1].T) + 1)).abs().max()))
except Exception as e:
    print("compiled user kernel with launch_pdl FAILED", repr(e)[:600])
