"""The device-table (planned) prefill: kernel tables, the kernel against the float64 recurrence, and
the runner's planned prefill against its eager packed prefill (on CPU in the Triton interpreter, on
CUDA through captured graphs)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from torch.utils._python_dispatch import TorchDispatchMode

from fast_xlstm import ops
from fast_xlstm.engine.runner import DecodeMode, ModelRunner
from fast_xlstm.generation.params import SamplingParams
from fast_xlstm.ops import mlstm_recurrent
from fast_xlstm.ops.triton import chunkwise_fwd
from fast_xlstm.ops.triton import PackedLayout, PackedPlan, mlstm_chunkwise_planned, padded_rows, plan_values

from modelutil import random_ids, tiny_model

TOL = {torch.float32: 2e-4, torch.bfloat16: 2e-2}  # as for the host-planned forward (test_chunkwise_fwd)


def _offsets(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def test_plan_values_layout_and_padding():
    layout = PackedLayout(max_seqs=4, num_tokens=80, chunk_size=16)
    # sections padded to multiples of 4 entries (16-byte aligned int32 slices): 4 + 4 + 4 + 12 + 12
    assert layout.L == 16 and layout.max_chunks == 80 // 16 + 4 and layout.size == 3 * 4 + 2 * 12
    offs = _offsets([20, 5, 30])  # chunks: 2, 1, 2
    vals = plan_values(layout, offs)
    assert len(vals) == layout.size
    S, M = 4, layout.max_chunks
    base, lens, coff = vals[:S], vals[S:2 * S], vals[2 * S:3 * S]
    cseq, cj = vals[3 * S:3 * S + M], vals[3 * S + 12:3 * S + 12 + M]
    assert vals[3 * S + M:3 * S + 12] == [0] * 3 and vals[3 * S + 12 + M:] == [0] * 3  # alignment padding
    assert base == [0, 20, 25, 20] and lens == [20, 5, 30, 5] and coff == [0, 2, 3, 2]  # pad repeats the shortest
    assert cseq[:5] == [0, 0, 1, 2, 2] and cj[:5] == [0, 1, 0, 0, 1]
    assert all(j * layout.L >= 30 for j in cj[5:])  # spare chunk entries: past every sequence
    assert padded_rows(layout, offs, [7, 3, 9]) == [7, 3, 9, 3]
    with pytest.raises(ValueError, match="at most 4 sequences"):
        plan_values(layout, _offsets([1] * 5))
    with pytest.raises(ValueError, match="at most 80"):
        plan_values(layout, _offsets([50, 40]))
    with pytest.raises(ValueError, match="rise strictly"):
        plan_values(layout, [0, 5, 5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lengths,max_seqs,tokens", [([37], 1, 64), ([1, 16, 23], 4, 64), ([9, 30], 2, 128)])
def test_planned_forward_matches_recurrent(lengths, max_seqs, tokens, dtype, device, seed, make_inputs,
                                           random_state, rel_err, state_err):
    NH, DK, DV = 2, 16, 32
    layout = PackedLayout(max_seqs, tokens, chunk_size=16)
    offs = _offsets(lengths)
    N = len(lengths)
    q, k, v, i, f = (t.to(device) for t in make_inputs(1, NH, tokens, DK, DV, dtype, seed=seed))
    s_real = [t.to(device) for t in random_state(N, NH, DK, DV, seed=seed + 1)]
    rows = padded_rows(layout, offs, list(range(N)))
    s0 = [t[rows] for t in s_real]
    buf = torch.tensor(plan_values(layout, offs), dtype=torch.long, device=device)
    h, st = mlstm_chunkwise_planned(q, k, v, i, f, s0, PackedPlan.from_buffer(layout, buf))
    assert h.shape == v.shape and st[0].shape == (max_seqs, NH, DK, DV) and st[2].shape == (max_seqs, NH, 1)
    assert h.transpose(1, 2).is_contiguous()  # token-major, as the layer's output norm reads it
    for r, pool_row in enumerate(rows):
        src = min(r, N - 1) if r < N else pool_row
        a, e = offs[src], offs[src + 1]
        h_ref, st_ref = mlstm_recurrent(*(t[:, :, a:e].double().cpu() for t in (q, k, v, i, f)),
                                        [t[src:src + 1].double().cpu() for t in s_real])
        if r < N:
            assert rel_err(h[:, :, a:e].cpu(), h_ref) < TOL[dtype], f"sequence {r}"
        # A padding sequence repeats the shortest real one: it ends in exactly the same state.
        assert state_err([t[r:r + 1].cpu() for t in st], st_ref) < TOL[dtype], f"sequence {r}"
        if r >= N:
            assert all(torch.equal(t[r], t[pool_row]) for t in st)


def _plan(layout: PackedLayout, offs: list[int], device) -> PackedPlan:
    buf = torch.tensor(plan_values(layout, offs), dtype=torch.long, device=device)
    return PackedPlan.from_buffer(layout, buf)


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16], ids=["fp32_pool", "bf16_pool"])
@pytest.mark.parametrize("lengths,max_seqs", [([5, 23, 9], 5), ([40], 2)], ids=["three_of_5", "one_of_2"])
def test_planned_forward_reads_pool_rows(lengths, max_seqs, pool_dtype, device, seed, make_inputs, random_state,
                                         rel_err, state_err):
    """Initial states read in place from shuffled rows of a larger pool (padding sequences included) give
    exactly the forward from the gathered states, and the pool is left as it was."""
    NH, DK, DV, T, P = 2, 16, 32, 64, 9
    layout = PackedLayout(max_seqs, T, chunk_size=16)
    offs = _offsets(lengths)
    N = len(lengths)
    q, k, v, i, f = (t.to(device) for t in make_inputs(1, NH, T, DK, DV, torch.float32, seed=seed))
    pool = [t.to(device, pool_dtype) for t in random_state(P, NH, DK, DV, seed=seed + 1)]
    g = torch.Generator().manual_seed(seed)
    real = torch.randperm(P, generator=g)[:N].tolist()
    real = real if any(r != j for j, r in enumerate(real)) else real[::-1] if N > 1 else [P - 1]
    rows = padded_rows(layout, offs, real)
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    before = [t.clone() for t in pool]
    plan = _plan(layout, offs, device)
    h, st = ops.mlstm_chunkwise_planned(q, k, v, i, f, pool, plan, state_rows=rows_t)  # through the dispatch
    h_ref, st_ref = mlstm_chunkwise_planned(q, k, v, i, f, [t[rows] for t in pool], plan)
    assert all(torch.equal(a, b) for a, b in zip(pool, before)), "the kernel wrote into the pool"
    used = offs[-1]
    assert torch.isfinite(h[:, :, :used]).all() and all(torch.isfinite(t).all() for t in st)
    assert torch.equal(h[:, :, :used], h_ref[:, :, :used])
    assert all(t.shape[0] == max_seqs and t.dtype == torch.float32 for t in st)
    assert all(torch.equal(a, b) for a, b in zip(st, st_ref))
    for r in range(N):  # and both are right: against the recurrence from the pool row
        a, e = offs[r], offs[r + 1]
        h_or, st_or = mlstm_recurrent(*(t[:, :, a:e].double().cpu() for t in (q, k, v, i, f)),
                                      [t[rows[r]:rows[r] + 1].double().cpu() for t in pool])
        assert rel_err(h[:, :, a:e].cpu(), h_or) < TOL[torch.float32], f"sequence {r}"
        assert state_err([t[r:r + 1].cpu() for t in st], st_or) < TOL[torch.float32], f"sequence {r}"

    # final_to_pool: the output kernel writes each real sequence's final state into its row (rounded to
    # the pool's dtype), leaves every other row alone, and h is unchanged.
    written = [t.clone() for t in pool]
    h_w, st_w = ops.mlstm_chunkwise_planned(q, k, v, i, f, written, plan, state_rows=rows_t, final_to_pool=True)
    assert st_w is None and torch.equal(h_w[:, :, :used], h[:, :, :used])
    for t_w, t0, t_st in zip(written, before, st):
        for row in range(P):
            want = t_st[real.index(row)].to(pool_dtype) if row in real else t0[row]
            assert torch.equal(t_w[row], want), f"pool row {row}"


def test_output_tile_width_follows_the_launch_size():
    """The output kernel's DV tiles narrow while a launch has few programs, so a short prefill's
    final-state copy is spread over more SMs, and stay wide for long or many sequences."""
    bv = chunkwise_fwd._out_bv
    assert bv(512, 64, 2 * 8) == 64  # the 7B's 64-token graph prefill of one prompt (2 chunk slots, 8 heads)
    assert bv(512, 64, 1 * 8) == 32  # one 64-token chunk, eager
    assert bv(512, 64, 9 * 8) == 128 and bv(512, 128, 1000) == 64 and bv(32, 16, 4) == 32


@pytest.mark.parametrize("width", [32, 64])
def test_narrow_output_tiles_compute_what_wide_ones_do(width, device, seed, make_inputs, random_state, rel_err,
                                                       state_err, monkeypatch):
    """A short prefill from pool rows with the output kernel's DV tiles at `width` (what the launch-size
    rule picks for few programs) gives the h and written pool rows of the widest tiles: bitwise in the
    interpreter, within the kernels' tolerance on a GPU (a tensor-core tile shape may round differently),
    and both match the float64 recurrence."""
    NH, DK, DV, T, P = 2, 16, 128, 16, 4
    layout = PackedLayout(1, T, chunk_size=16)
    q, k, v, i, f = (t.to(device) for t in make_inputs(1, NH, T, DK, DV, torch.float32, seed=seed))
    start = [t.to(device) for t in random_state(P, NH, DK, DV, seed=seed + 1)]
    rows = torch.tensor([2], dtype=torch.long, device=device)
    plan = _plan(layout, [0, T], device)
    chunk_heads = layout.max_chunks * NH
    assert chunkwise_fwd._out_bv(DV, plan.L, chunk_heads) == 32  # this launch is a narrow one

    from fast_xlstm.ops.triton import _common

    def run(bv: int):
        monkeypatch.setattr(_common, "_CHOSEN", {})  # no config remembered from another test's launch
        monkeypatch.setattr(chunkwise_fwd, "_out_cfgs", lambda *_: [dict(BK=16, BV=bv, num_warps=4, num_stages=1)])
        pool = [t.clone() for t in start]
        h = ops.mlstm_chunkwise_planned(q, k, v, i, f, pool, plan, state_rows=rows, final_to_pool=True)[0]
        return h, pool

    (h_n, pool_n), (h_w, pool_w) = run(width), run(128)
    if device == "cpu":
        assert torch.equal(h_n, h_w) and all(torch.equal(a, b) for a, b in zip(pool_n, pool_w))
    else:
        assert rel_err(h_n.cpu(), h_w.cpu().double()) < TOL[torch.float32]
        assert state_err([t[2:3].cpu() for t in pool_n], [t[2:3].cpu().double() for t in pool_w]) < TOL[torch.float32]
    h_or, st_or = mlstm_recurrent(*(t.double().cpu() for t in (q, k, v, i, f)), [t[2:3].double().cpu() for t in start])
    assert rel_err(h_n.cpu(), h_or) < TOL[torch.float32]
    assert state_err([t[2:3].cpu() for t in pool_n], st_or) < TOL[torch.float32]
    assert all(torch.equal(a[r], b[r]) for a, b in zip(pool_n, start) for r in (0, 1, 3))  # other rows untouched


def test_planned_pool_rows_rejects_bad_input(device, make_inputs, random_state):
    NH, DK, DV, T = 2, 16, 16, 32
    layout = PackedLayout(2, T, chunk_size=16)
    plan = _plan(layout, [0, 10, 20], device)
    x = [t.to(device) for t in make_inputs(1, NH, T, DK, DV, torch.float32)]
    pool = [t.to(device, torch.float32) for t in random_state(4, NH, DK, DV)]
    rows = torch.tensor([3, 1], device=device)
    with pytest.raises(ValueError, match="int64"):
        mlstm_chunkwise_planned(*x, pool, plan, state_rows=rows[:1])
    with pytest.raises(ValueError, match="int64"):
        mlstm_chunkwise_planned(*x, pool, plan, state_rows=rows.int())
    with pytest.raises(ValueError, match="contiguous"):
        mlstm_chunkwise_planned(*x, [pool[0].transpose(2, 3), *pool[1:]], plan, state_rows=rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_rows", [False, True], ids=["gathered_state", "pool_rows"])
def test_planned_forward_reads_projection_views(dtype, with_rows, device, seed, make_inputs, random_state, rel_err,
                                                pack_projection, unpack_projection):
    """q, k, v and gates as the model's strided views of fused projections give the same result as
    contiguous copies (no copy needed)."""
    NH, DK, DV, T = 2, 16, 32, 64
    layout = PackedLayout(3, T, chunk_size=16)
    offs = _offsets([7, 30, 18])
    x = [t.to(device) for t in make_inputs(1, NH, T, DK, DV, dtype, seed=seed)]
    x[3:] = [t.float() for t in x[3:]]  # gates are fp32, as the model computes them
    views = unpack_projection(*pack_projection(*x), NH, DK, DV)
    assert all(torch.equal(a, b) for a, b in zip(views, x))
    pool = [t.to(device) for t in random_state(4, NH, DK, DV, torch.float32, seed=seed + 1)]
    rows = [2, 0, 3]
    plan = _plan(layout, offs, device)
    if with_rows:
        state, kw = pool, {"state_rows": torch.tensor(rows, device=device)}
    else:
        state, kw = [t[rows] for t in pool], {}
    h, st = mlstm_chunkwise_planned(*views, state, plan, **kw)
    h_ref, st_ref = mlstm_chunkwise_planned(*x, state, plan, **kw)
    used = offs[-1]
    assert torch.isfinite(h[:, :, :used]).all()
    assert torch.equal(h[:, :, :used], h_ref[:, :, :used])
    assert all(torch.equal(a, b) for a, b in zip(st, st_ref))
    for r in range(3):  # and right (a stride bug shared by both calls would pass the above)
        a, e = offs[r], offs[r + 1]
        h_or, _ = mlstm_recurrent(*(t[:, :, a:e].double().cpu() for t in x), [t[rows[r]:rows[r] + 1].double().cpu()
                                                                             for t in pool])
        assert rel_err(h[:, :, a:e].cpu(), h_or) < TOL[dtype], f"sequence {r}"


class _AtenLog(TorchDispatchMode):
    """Names of the aten ops run outside kernel launches (the CPU interpreter copies arguments around
    inside a launch, which is not what a GPU launch does)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_planned_forward_copies_nothing(device, seed, make_inputs, random_state, monkeypatch, pack_projection,
                                        unpack_projection):
    """Views of the projections and pool rows go to the kernels as they are: no copy, gather or cast
    (each one would be a kernel launch per layer in the captured prefill)."""
    NH, DK, DV, T = 2, 16, 32, 32
    layout = PackedLayout(2, T, chunk_size=16)
    plan = _plan(layout, [0, 9, 25], device)
    x = [t.to(device) for t in make_inputs(1, NH, T, DK, DV, torch.bfloat16, seed=seed)]
    x[3:] = [t.float() for t in x[3:]]
    views = unpack_projection(*pack_projection(*x), NH, DK, DV)
    pool = [t.to(device, torch.bfloat16) for t in random_state(5, NH, DK, DV, seed=seed + 1)]
    rows = torch.tensor([4, 1], device=device)
    log = _AtenLog()

    def unlogged(real):
        def run(*a, **kw):
            log.paused = True
            try:
                return real(*a, **kw)
            finally:
                log.paused = False
        return run

    monkeypatch.setattr(chunkwise_fwd, "launch", unlogged(chunkwise_fwd.launch))
    with log:
        h, _ = mlstm_chunkwise_planned(*views, pool, plan, state_rows=rows)
    assert torch.isfinite(h[:, :, :25]).all()
    copies = [n for n in log.names if n in ("clone", "copy_", "_to_copy", "index_select", "gather", "index")]
    assert not copies, f"copies outside the kernels: {copies} (all ops: {log.names})"


def _runner(model, max_graph_prefill_tokens, prefill_in_pool=None, num_slots=5):
    runner = ModelRunner(model, num_slots=num_slots, max_graph_prefill_tokens=max_graph_prefill_tokens,
                         prefill_in_pool=prefill_in_pool)
    g = torch.Generator().manual_seed(1)
    for layer in runner.pool.layers:  # start every slot from a random (non-empty) state
        for t in layer:
            t.copy_(torch.rand(t.shape, generator=g) * (2.0 if t.shape[-1] != 1 else 0.5))
    return runner


def _assert_same_prefill(a, b, runner_a, runner_b):
    """Two prefill results and their runners' pools agree: tokens exactly, logits and states to fp32
    rounding of different kernel paths."""
    assert torch.isfinite(a.logits).all()
    assert a.tokens == b.tokens
    assert torch.allclose(a.logits, b.logits, rtol=1e-4, atol=1e-4)
    for la, lb in zip(runner_a.pool.layers, runner_b.pool.layers):
        for ta, tb in zip(la, lb):
            assert torch.allclose(ta, tb, rtol=1e-4, atol=1e-5)


def _assert_untouched(runner, untouched, before):
    for layer, saved in zip(runner.pool.layers, before):
        assert all(torch.equal(t[untouched], s) for t, s in zip(layer, saved))


@pytest.mark.parametrize("lengths", [[7], [3, 40, 1], [20, 20, 20, 20, 5]], ids=["one", "three", "five"])
def test_runner_planned_prefill_equals_eager(lengths, device):
    """Same logits and pool states as the eager packed prefill, for prompts from non-empty slot states;
    slots that take no part stay untouched."""
    model = tiny_model(seed=4).to(device)
    planned, eager = _runner(model, 128), _runner(model, 0, prefill_in_pool=False)
    assert planned.planned_prefill and not eager.planned_prefill
    slots = [4, 0, 2, 1, 3][:len(lengths)]
    pieces = [random_ids((n,), model.config.vocab_size, seed=n + j).tolist() for j, n in enumerate(lengths)]
    params = [SamplingParams(temperature=0)] * len(slots)
    untouched = [s for s in range(5) if s not in slots]
    before = [[t[untouched].clone() for t in layer] for layer in planned.pool.layers]
    for _ in range(2):  # twice: the second call replays the captured graph on CUDA
        a = planned.prefill(slots, pieces, [True] * len(slots), params)
        b = eager.prefill(slots, pieces, [True] * len(slots), params)
        _assert_same_prefill(a, b, planned, eager)
    _assert_untouched(planned, untouched, before)


def test_planned_prefill_never_reads_unset_buffer_tails(device, monkeypatch):
    """The planned path leaves its kernels' buffers unset outside the packed sequences (no fill
    kernels in the graph). With every new float buffer poisoned with NaN, logits and pool states
    still equal the eager prefill's: nothing reads those tails into a real sequence's results."""
    model = tiny_model(seed=5).to(device)
    planned, eager = _runner(model, 128), _runner(model, 0, prefill_in_pool=False)
    slots, lengths = [1, 3], [5, 22]  # 27 tokens in a 32-token bucket of 2 sequences: a tail
    pieces = [random_ids((n,), model.config.vocab_size, seed=n).tolist() for n in lengths]
    params = [SamplingParams(temperature=0)] * len(slots)
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    a = planned.prefill(slots, pieces, [True] * len(slots), params)
    monkeypatch.undo()
    b = eager.prefill(slots, pieces, [True] * len(slots), params)
    assert not torch.isnan(a.logits).any()
    assert a.tokens == b.tokens and torch.allclose(a.logits, b.logits, rtol=1e-4, atol=1e-4)
    for la, lb in zip(planned.pool.layers, eager.pool.layers):
        for ta, tb in zip(la, lb):
            assert not torch.isnan(ta).any() and torch.allclose(ta, tb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lengths,long_alone", [([70], None), ([3, 150, 1, 64, 9], None), ([150], 64)],
                         ids=["one", "five", "one-long-128-chunks"])
def test_prefill_in_pool_equals_the_grouped_prefill(lengths, long_alone, device, monkeypatch):
    """Packs beyond the graph buckets run the device-table kernels eagerly on the pool rows: the same
    sampled tokens, logits and pool states as the grouped path that copies states out and back
    (here in groups of two sequences), and slots that take no part stay untouched. The in-pool path
    copies no state: the pool's read/write helpers are never called. `long_alone`: the length from
    which one prompt takes 128-token chunks, lowered so a short prompt takes that rule too."""
    import fast_xlstm.ops.triton.autograd as autograd_mod

    if long_alone is not None:
        monkeypatch.setattr(autograd_mod, "LONG_ALONE", long_alone)
        assert autograd_mod.inference_chunk_len(64, 1, 4, max(lengths)) == 128
    model = tiny_model(seed=6).to(device)
    in_pool, grouped = _runner(model, 0), _runner(model, 0, prefill_in_pool=False)
    assert in_pool.prefill_in_pool and not in_pool.planned_prefill
    grouped.prefill_state_bytes = 2 * grouped._state_bytes_per_seq
    slots = [4, 0, 2, 1, 3][:len(lengths)]
    pieces = [random_ids((n,), model.config.vocab_size, seed=7 * n + j).tolist() for j, n in enumerate(lengths)]
    params = [SamplingParams(temperature=0)] * len(slots)
    untouched = [s for s in range(5) if s not in slots]
    before = [[t[untouched].clone() for t in layer] for layer in in_pool.pool.layers]

    def no_copies(*args, **kwargs):
        raise AssertionError("the in-pool prefill copied states")

    with monkeypatch.context() as m:
        m.setattr(in_pool.pool, "read", no_copies)
        m.setattr(in_pool.pool, "write", no_copies)
        a = in_pool.prefill(slots, pieces, [True] * len(slots), params)
    b = grouped.prefill(slots, pieces, [True] * len(slots), params)
    _assert_same_prefill(a, b, in_pool, grouped)
    _assert_untouched(in_pool, untouched, before)


def test_prefill_in_pool_needs_the_kernels(monkeypatch):
    import fast_xlstm.engine.runner as runner_mod

    monkeypatch.setattr(runner_mod.ops, "planned_prefill_supported", lambda x: False)
    with pytest.raises(ValueError, match="prefill_in_pool needs the Triton kernels"):
        ModelRunner(tiny_model(seed=1), num_slots=2, prefill_in_pool=True)
    assert not ModelRunner(tiny_model(seed=1), num_slots=2).prefill_in_pool  # the default follows support


@pytest.mark.parametrize("order", ["decode-first", "interleaved"])
@pytest.mark.parametrize("max_graph", [128, 0], ids=["mixed-graph", "in-pool"])
def test_prefill_feeds_decoding_slots_their_last_token(max_graph, order, device):
    """A None piece is a decoding request riding in the prefill: one token, the slot's last sampled
    one, read on the device. Same sampled tokens, logits and pool states as a decode step for those
    slots plus a prefill of the real pieces: through a mixed-step graph bucket (3 decode rows padded
    to a bucket of 4: the step kernel on the decode rows, the chunkwise kernels on the pieces) and
    through the in-pool path (one-token sequences); the slot nobody uses stays untouched."""
    model = tiny_model(seed=8).to(device)
    mixed, split = _runner(model, max_graph, num_slots=6), _runner(model, max_graph, num_slots=6)
    params = SamplingParams(temperature=0)
    dec_slots, pre_slots = [3, 1, 5], [0, 4]
    pieces = [random_ids((n,), model.config.vocab_size, seed=50 + n).tolist() for n in (5, 19)]
    last = random_ids((3,), model.config.vocab_size, seed=9).tolist()
    for runner in (mixed, split):
        for s in dec_slots + pre_slots:
            runner.start_request(s, [], params, seed=0)
        runner.set_last_tokens(dec_slots, last)
    before = [[t[[2]].clone() for t in layer] for layer in mixed.pool.layers]
    if order == "decode-first":
        slots, mixed_pieces, ends = dec_slots + pre_slots, [None] * 3 + pieces, [True] * 4 + [False]
    else:
        slots, mixed_pieces = [0, 3, 4, 1, 5], [pieces[0], None, pieces[1], None, None]
        ends = [True, True, False, True, True]
    a = mixed.prefill(slots, mixed_pieces, ends, [params] * 5)
    d = split.decode(dec_slots, DecodeMode.of([params] * 3))
    b = split.prefill(pre_slots, pieces, [True, False], [params] * 2)
    by_slot = dict(zip(dec_slots + pre_slots[:1], d.tokens + b.tokens))
    assert a.tokens == [by_slot[s] for s, e in zip(slots, ends) if e]
    # (the last row is the padding slot's: CUDA-graph captures write it, and only `split` decoded)
    assert torch.equal(mixed.last_token[:-1], split.last_token[:-1])
    for la, lb in zip(mixed.pool.layers, split.pool.layers):
        for ta, tb in zip(la, lb):
            assert torch.allclose(ta, tb, rtol=1e-4, atol=1e-5)
    _assert_untouched(mixed, [2], before)
    mixed_graphs = [key for key in mixed._planned if key[0]]
    assert mixed_graphs == ([(4, mixed.mixed_layout(3, [5, 19]))] if max_graph else [])


@pytest.mark.parametrize("lengths", [[7], [3, 40, 1], [5, 6, 7, 8, 9, 10, 11], [33] * 3])
def test_kernel_tables_and_pool_rows_are_16_byte_aligned(lengths, device):
    """Triton specializes kernels on each pointer's 16-byte alignment: every table the kernels read
    (host-planned packing, device-table plan, pool rows) starts aligned whatever the sequence count
    and the (odd) token count, so a new packing never compiles new kernel variants."""
    from fast_xlstm.engine.runner import _plan_buffer_values, _token_span
    from fast_xlstm.ops.transfer import device_ints
    from fast_xlstm.ops.triton._common import seq_tables

    offsets = _offsets(lengths)
    host_planned = seq_tables(1, 2, offsets[-1], 16, offsets, device)
    layout = PackedLayout(len(lengths), offsets[-1], 16)  # T = the exact total, as the in-pool path plans
    pieces = [[1] * n for n in lengths]
    buf = device_ints(_plan_buffer_values(layout, list(range(len(lengths))), pieces), device)
    Tp, N = _token_span(layout), len(lengths)
    plan = PackedPlan.from_buffer(layout, buf[Tp + 2 * N:])
    for tabs in (host_planned, plan.tables):
        for t in (tabs.seq_base, tabs.seq_len, tabs.chunk_off, tabs.chunk_seq, tabs.chunk_j):
            assert t.data_ptr() % 16 == 0
    assert buf[Tp:].data_ptr() % 16 == 0  # the pool rows the kernels read and write
    assert plan.tables.seq_len[:N].tolist() == lengths


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts compiled kernel variants (none in the interpreter)")
def test_in_pool_prefills_of_new_packings_compile_nothing_new():
    model = tiny_model(seed=3).to("cuda", torch.bfloat16)
    runner = _runner(model, 0, prefill_in_pool=True, num_slots=40)
    kernels = (chunkwise_fwd._fwd_states_kernel, chunkwise_fwd._fwd_out_kernel)

    def variants() -> int:
        return sum(len(cache[0]) for k in kernels for cache in k.device_caches.values())

    def prefill(lengths):
        slots = list(range(len(lengths)))
        pieces = [random_ids((n,), model.config.vocab_size, seed=n).tolist() for n in lengths]
        runner.prefill(slots, pieces, [True] * len(slots), [SamplingParams(temperature=0)] * len(slots))

    prefill([300, 301])
    first = variants()
    for lengths in ([511] * 15, [512] * 32, [512] * 32 + [7], [1] * 9 + [500], [77, 3, 1000]):
        prefill(lengths)
    assert variants() == first


def test_padding_chunks_stay_masked_with_128_token_chunks(device, seed, make_inputs, random_state, rel_err,
                                                        state_err):
    """One long prompt takes 128-token chunks in the in-pool prefill (`inference_chunk_len`), and its
    layout has spare chunk entries. Their index times L must stay inside int32: at 2^24 * 128 it wrapped
    to a negative position, the masks let it through, and the H100 faulted on any single prompt of
    4,096+ tokens with a length divisible by 128 (bench TTFT at 4,096 / 16,384 tokens)."""
    NH, DK, DV, T = 2, 16, 16, 256
    layout = PackedLayout(2, T, chunk_size=128)
    assert layout.L == 128 and layout.max_chunks > 2  # spare chunk entries
    offs = [0, 200]
    q, k, v, i, f = (t.to(device) for t in make_inputs(1, NH, T, DK, DV, torch.float32, seed=seed))
    s0 = [t.to(device) for t in random_state(layout.max_seqs, NH, DK, DV, seed=seed + 1)]
    s0 = [t[[0, 0]].clone() for t in s0]  # the padding sequence repeats sequence 0's state
    h, st = mlstm_chunkwise_planned(q, k, v, i, f, s0, _plan(layout, offs, device))
    h_ref, st_ref = mlstm_recurrent(*(t[:, :, :200].double().cpu() for t in (q, k, v, i, f)),
                                    [t[:1].double().cpu() for t in s0])
    assert rel_err(h[:, :, :200].cpu(), h_ref) < TOL[torch.float32]
    assert state_err([t[:1].cpu() for t in st], st_ref) < TOL[torch.float32]
