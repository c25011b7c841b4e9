"""Helpers shared by the Triton mLSTM kernels: device-side math, dtype choices, sequence/chunk tables, launches.

Layout conventions used by every kernel (all tensors contiguous, except that the forward kernels read
q, k, v and the gates through their batch/head/position strides: see `chunkwise_fwd`):
  q, k [B, NH, S, DK]; v, h [B, NH, S, DV]; gates and per-position fp32 buffers [B, NH, S].
  A "sequence" r is a run of positions of one batch row: dense input has N = B sequences of length S,
  packed input (cu_seqlens, B = 1) has N sequences. `seq_base[r]` is the flat row index of the sequence's
  first position for head 0 (b * NH * S + start); head h adds h * S. Positions then index rows of DK / DV.
  Chunks never straddle sequences: sequence r owns global chunks chunk_off[r] .. chunk_off[r] + nc_r - 1.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..transfer import device_ints  # noqa: F401  (also re-exported by the package)

log = logging.getLogger(__name__)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
"""Kernels were decorated for the CPU interpreter (fixed when this module is first imported)."""

if INTERPRET:
    # Triton <= 3.6's CPU interpreter turns a run-time loop bound into an int with int(array of shape (1,)),
    # which numpy >= 2.4 rejects (triton-lang/triton#9171, fixed upstream by the same one-line change).
    from triton.runtime import interpreter as _interp

    if not getattr(_interp._patch_lang_tensor, "_fast_xlstm_shim", False):
        _orig_patch = _interp._patch_lang_tensor

        def _patch_lang_tensor(tensor, scope):
            _orig_patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        _patch_lang_tensor._fast_xlstm_shim = True
        _interp._patch_lang_tensor = _patch_lang_tensor

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def tl_dtype(dtype: torch.dtype):
    if dtype not in _TL_DTYPES:
        raise ValueError(f"the Triton mLSTM kernels take fp32, bf16 or fp16 inputs, got {dtype} "
                         "(use backend='torch' for float64)")
    return _TL_DTYPES[dtype]


def dot_dtypes(dtype: torch.dtype):
    """(IN_DT, DOT_DT, input_precision) for inputs of `dtype`.

    fp32 inputs use exact fp32 products ("ieee", no tf32) so fp32 results match the reference to ~1e-5.
    16-bit inputs feed the tensor cores in their own dtype. The CPU interpreter multiplies 16-bit
    operands wrongly (raw bits), so there the operands are rounded to the input dtype and then
    multiplied in fp32: the same rounding as on the GPU.
    """
    in_dt = tl_dtype(dtype)
    dot_dt = tl.float32 if (INTERPRET or dtype == torch.float32) else in_dt
    return in_dt, dot_dt, "ieee" if dtype == torch.float32 else "tf32"


def pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, int(x))))


def chunk_len(chunk_size: int, S: int) -> int:
    """Kernel chunk length: a power of two in [16, 128] (tl.dot needs >= 16), no longer than needed.

    Any chunk length computes the same function (up to rounding); it is a speed knob only.
    """
    return min(128, pow2(chunk_size), pow2(S))


@dataclass
class SeqTables:
    """Where each sequence and chunk lives (see the module docstring). All int tensors on the device."""

    N: int  # sequences
    NCT: int  # chunks in all
    seq_base: torch.Tensor  # int64 [N]
    seq_len: torch.Tensor  # int32 [N]
    chunk_off: torch.Tensor  # int32 [N]: first global chunk of each sequence
    chunk_seq: torch.Tensor  # int32 [NCT]: sequence of each chunk
    chunk_j: torch.Tensor  # int32 [NCT]: index of the chunk inside its sequence
    offsets: list[int] | None  # host copy of cu_seqlens (None for dense input)


_DENSE_TABLES: dict[tuple, SeqTables] = {}


def seq_tables(B: int, NH: int, S: int, L: int, offsets: list[int] | None, device) -> SeqTables:
    """Builds the tables for dense input (offsets None) or packed input (offsets = cu_seqlens as ints)."""
    if offsets is None:
        key = (B, NH, S, L, str(device))
        tabs = _DENSE_TABLES.get(key)
        if tabs is None:  # cached: repeated prefills of one shape launch nothing here
            nc = triton.cdiv(S, L)
            ar = torch.arange(B, device=device, dtype=torch.int64)
            tabs = SeqTables(B, B * nc, ar * (NH * S), torch.full((B,), S, dtype=torch.int32, device=device),
                             (ar * nc).to(torch.int32), ar.to(torch.int32).repeat_interleave(nc),
                             torch.arange(nc, dtype=torch.int32, device=device).repeat(B), None)
            if len(_DENSE_TABLES) > 64:
                _DENSE_TABLES.clear()
            _DENSE_TABLES[key] = tabs
        return tabs
    key = (tuple(offsets), NH, L, str(device))
    tabs = _PACKED_TABLES.get(key)
    if tabs is not None:  # every layer of one forward packs the same way: build the tables once
        return tabs
    if len(_PACKED_TABLES) > 64:
        _PACKED_TABLES.clear()
    tabs = _PACKED_TABLES[key] = _packed_tables(offsets, L, device)
    return tabs


_PACKED_TABLES: dict[tuple, SeqTables] = {}


TABLE_ALIGN = 4  # entries: 16 bytes of int32


def aligned(n: int) -> int:
    """n rounded up to a multiple of TABLE_ALIGN."""
    return -(-n // TABLE_ALIGN) * TABLE_ALIGN


def aligned_sections(sections: list[list[int]]) -> list[int]:
    """The sections end to end, each zero-padded to a multiple of TABLE_ALIGN entries.

    Triton specializes a kernel on whether each pointer argument is 16-byte aligned. Table slices at
    offsets that follow the sequence and chunk counts would flip that from one packing to the next,
    and each new combination compiles new variants (about a second each, mid-request); slices that
    start at multiples of 4 entries of an aligned buffer are always aligned."""
    return [x for sec in sections for x in sec + [0] * (aligned(len(sec)) - len(sec))]


def tables_from_aligned(N: int, NCT: int, packed: torch.Tensor, offsets: list[int] | None) -> SeqTables:
    """SeqTables over a buffer laid out by `aligned_sections` (int64, aligned; sections seq_base,
    seq_len, chunk_off [N], chunk_seq, chunk_j [NCT]); the int32 tables come from one conversion."""
    a, c = aligned(N), aligned(NCT)
    i32 = packed.to(torch.int32)
    return SeqTables(N, NCT, packed[:N], i32[a:a + N], i32[2 * a:2 * a + N], i32[3 * a:3 * a + NCT],
                     i32[3 * a + c:3 * a + c + NCT], offsets)


def _packed_tables(offsets: list[int], L: int, device) -> SeqTables:
    N = len(offsets) - 1
    lens = [offsets[r + 1] - offsets[r] for r in range(N)]
    ncs = [triton.cdiv(n, L) for n in lens]
    offs, cs, cj, acc = [], [], [], 0
    for r, nc in enumerate(ncs):
        offs.append(acc)
        cs += [r] * nc
        cj += list(range(nc))
        acc += nc
    # One host-to-device copy for all the small tables.
    packed = device_ints(aligned_sections([offsets[:-1], lens, offs, cs, cj]), device)
    return tables_from_aligned(N, acc, packed, list(offsets))


# ---- device-side helpers ----

@triton.jit
def logsigmoid(x):
    """log(sigmoid(x)) in fp32 = min(x, 0) - log1p(exp(-|x|)), with an exact log1p.

    log(1 + e) loses all digits of a tiny e (f~ near 15 gives log-decays ~3e-7 that add up over long
    sequences); Goldberg's trick log1p(e) = log(u) * e / (u - 1), u = 1 + e, keeps them. x = +inf gives 0.
    """
    e = tl.exp(-tl.abs(x))
    u = 1.0 + e
    l1p = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.minimum(x, 0.0) - l1p


_INTERP = tl.constexpr(INTERPRET)


@triton.jit
def rtne(x, DT: tl.constexpr):
    """Casts fp32 x to DT, rounding to nearest even (the GPU's rounding).

    The CPU interpreter truncates fp32 -> bf16 whatever the rounding mode asked for, which made its bf16
    results drift from the GPU's; there the rounding is done on the bits (exactly representable after).
    """
    if DT == tl.float32:
        y = x.to(tl.float32)
    elif _INTERP and DT == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True).to(DT)
    else:
        y = x.to(DT)
    return y


@triton.jit
def dotcast(x, IN_DT: tl.constexpr, DOT_DT: tl.constexpr):
    """Rounds x to the input dtype (as the tensor cores see it) and casts it to the dot operand dtype."""
    if IN_DT == tl.float32:
        y = x.to(tl.float32)
    else:
        y = rtne(x, IN_DT).to(DOT_DT)
    return y


# ---- launching with fallbacks ----

_OOR_ERRORS: tuple[type[BaseException], ...]
try:
    from triton.runtime.errors import OutOfResources, PTXASError
    _OOR_ERRORS = (OutOfResources, PTXASError)
except ImportError:  # pragma: no cover - older Triton
    from triton.runtime.autotuner import OutOfResources
    _OOR_ERRORS = (OutOfResources,)

_CHOSEN: dict[tuple, dict] = {}


def launch(kernel, grid_for, args_for, configs: list[dict], fixed: dict, key: tuple) -> None:
    """Launches `kernel` with the first config that compiles on this device.

    configs: dicts of constexpr tile sizes (BK, BV, ...) plus num_warps/num_stages, best guess first.
    grid_for(cfg) and args_for(cfg) give the grid and the positional arguments for a config (tile counts
    depend on it); `fixed` holds the remaining constexpr keywords. A config that runs out of shared memory
    or registers is skipped and the working one is remembered per `key`. With FAST_XLSTM_TRITON_TUNE=1
    (CUDA only) every config is timed once per key and the fastest kept; use it only for kernels whose
    outputs are fresh buffers (re-running them is harmless).
    """
    full_key = (getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel)),) + key
    cfg = _CHOSEN.get(full_key)
    if cfg is not None:
        kernel[grid_for(cfg)](*args_for(cfg), **cfg, **fixed)
        return
    if INTERPRET:
        configs = configs[:1]
    tune = os.environ.get("FAST_XLSTM_TRITON_TUNE") == "1" and not INTERPRET and len(configs) > 1
    errors, timings = [], []
    for cfg in configs:
        def run(cfg=cfg):
            kernel[grid_for(cfg)](*args_for(cfg), **cfg, **fixed)
        try:
            run()
        except _OOR_ERRORS as e:  # too big for this GPU: try the next config
            errors.append(f"{cfg}: {type(e).__name__}")
            continue
        if not tune:
            _CHOSEN[full_key] = cfg
            return
        timings.append((triton.testing.do_bench(run, warmup=5, rep=25), cfg))
    if not timings:
        raise RuntimeError(f"no launch config fits for {full_key}: {errors}")
    _CHOSEN[full_key] = min(timings, key=lambda x: x[0])[1]
    log.debug("tuned %s: %s", full_key, timings)
