"""Bad input is rejected with a helpful ValueError; backends are chosen by name, env var or "auto"."""

from __future__ import annotations

import pytest
import torch

import fast_xlstm.ops as ops
from fast_xlstm.ops import (Backend, available_backends, mlstm_chunkwise, mlstm_quadratic, mlstm_recurrent,
                            mlstm_step, register_backend, resolve_backend)

B, NH, S, DK, DV = 2, 2, 10, 8, 4
SEQ_FORMS = {
    "recurrent": mlstm_recurrent,
    "quadratic": mlstm_quadratic,
    "chunkwise": lambda *a, **kw: mlstm_chunkwise(*a, backend="torch", **kw),
}


@pytest.fixture
def x(make_inputs, seed):
    return make_inputs(B, NH, S, DK, DV, seed=seed)


def _replace(x, name, value):
    out = dict(zip("qkvif", x))
    out[name] = value
    return tuple(out[c] for c in "qkvif")


BAD_SHAPES = [  # (input, bad shape, message)
    ("q", (B, NH, S), r"q must have shape \[B, NH, S, DK\]"),
    ("k", (B, NH, S, DK + 1), r"k must have the shape of q \(2, 2, 10, 8\), got \(2, 2, 10, 9\)"),
    ("k", (B, NH, S + 1, DK), r"k must have the shape of q"),
    ("v", (B, NH, S - 1, DV), r"v must have shape \[2, 2, 10, DV\], got \(2, 2, 9, 4\)"),
    ("v", (B, NH, S), r"v must have shape"),
    ("i", (B, NH, S, 1), r"i \(gate pre-activation\) must have shape \[2, 2, 10\], got \(2, 2, 10, 1\)"),
    ("f", (B, NH + 1, S), r"f \(gate pre-activation\) must have shape \[2, 2, 10\]"),
]


@pytest.mark.parametrize("name,shape,match", BAD_SHAPES, ids=[n + '-' + 'x'.join(map(str, s)) for n, s, _ in BAD_SHAPES])
@pytest.mark.parametrize("form", list(SEQ_FORMS))
def test_mismatched_input_shapes(form, name, shape, match, x):
    bad = _replace(x, name, torch.randn(*shape, dtype=torch.float64))
    with pytest.raises(ValueError, match=match):
        SEQ_FORMS[form](*bad)


def _bad_states():
    C, n, m = torch.zeros(B, NH, DK, DV), torch.zeros(B, NH, DK), torch.zeros(B, NH, 1)
    return [
        ((C, n), r"initial_state must be a tuple \(C, n, m\)"),
        ((C.transpose(-1, -2), n, m), r"initial_state: C must have shape \[2, 2, 8, 4\], got \(2, 2, 4, 8\)"),
        ((C, n[..., :-1], m), r"initial_state: n must have shape \[2, 2, 8\], got \(2, 2, 7\)"),
        ((C, n, m.squeeze(-1)), r"initial_state: m must have shape \[2, 2, 1\], got \(2, 2\)"),
        ((C[:1], n[:1], m[:1]), r"initial_state: C must have shape \[2, 2, 8, 4\], got \(1, 2, 8, 4\)"),
    ]


@pytest.mark.parametrize("k", range(len(_bad_states())))
@pytest.mark.parametrize("form", list(SEQ_FORMS))
def test_wrong_initial_state(form, k, x):
    state, match = _bad_states()[k]
    with pytest.raises(ValueError, match=match):
        SEQ_FORMS[form](*x, state)


def test_step_rejects_bad_shapes(x):
    q, k, v, i, f = (t[:, :, 0] for t in x)
    with pytest.raises(ValueError, match=r"step expects q, k \[B, NH, DK\] and v \[B, NH, DV\]"):
        mlstm_step(q, k[..., :-1], v, i, f, backend="torch")
    with pytest.raises(ValueError, match=r"step expects gates i, f of shape \[2, 2\]"):
        mlstm_step(q, k, v, i.unsqueeze(-1), f, backend="torch")
    with pytest.raises(ValueError, match=r"state: m must have shape \[2, 2, 1\]"):
        mlstm_step(q, k, v, i, f, (torch.zeros(B, NH, DK, DV), torch.zeros(B, NH, DK), torch.zeros(B, NH)),
                   backend="torch")


@pytest.fixture
def packed(make_inputs, seed):
    return make_inputs(1, NH, S, DK, DV, seed=seed)


@pytest.mark.parametrize("cu,match", [
    (torch.tensor([0, 6, 4, 10]), r"cu_seqlens must rise from 0 to the packed length 10, got \[0, 6, 4, 10\]"),
    (torch.tensor([0, 4, 9]), r"cu_seqlens must rise from 0 to the packed length 10, got \[0, 4, 9\]"),
    (torch.tensor([0, 4, 11]), r"rise from 0 to the packed length 10"),
    (torch.tensor([1, 4, 10]), r"rise from 0 to the packed length 10"),
    (torch.tensor([0.0, 4.0, 10.0]), r"cu_seqlens must hold integers, got torch.float32"),
    (torch.tensor([0]), r"cu_seqlens must be a 1-D tensor of N\+1 >= 2 offsets"),
    (torch.tensor([[0, 10]]), r"cu_seqlens must be a 1-D tensor"),
], ids=["non-monotonic", "ends-short", "ends-past", "starts-at-1", "float", "too-short", "2-D"])
def test_bad_cu_seqlens(cu, match, packed):
    with pytest.raises(ValueError, match=match):
        mlstm_chunkwise(*packed, cu_seqlens=cu, backend="torch")


def test_cu_seqlens_needs_batch_1(x):
    with pytest.raises(ValueError, match=r"packed \(cu_seqlens\) input must have batch size 1, got 2"):
        mlstm_chunkwise(*x, cu_seqlens=torch.tensor([0, 4, 10]), backend="torch")


def test_packed_state_needs_one_row_per_sequence(packed, random_state):
    cu = torch.tensor([0, 3, 10])  # two sequences, but a state for one
    with pytest.raises(ValueError, match=r"initial_state: C must have shape \[2, 2, 8, 4\], got \(1, 2, 8, 4\)"):
        mlstm_chunkwise(*packed, random_state(1, NH, DK, DV), cu_seqlens=cu, backend="torch")


@pytest.mark.parametrize("chunk_size", [0, -16, 16.0, None])
def test_bad_chunk_size(chunk_size, x):
    with pytest.raises(ValueError, match=r"chunk_size must be a positive integer"):
        mlstm_chunkwise(*x, chunk_size=chunk_size, backend="torch")


# ---- dispatch ----

@pytest.fixture
def backends(monkeypatch):
    """A private copy of the backend registry (register_backend in a test does not leak)."""
    monkeypatch.setattr(ops, "_BACKENDS", dict(ops._BACKENDS))


def test_unknown_backend(x, no_backend_env):
    with pytest.raises(ValueError, match=r"unknown mLSTM backend 'nope'; available: auto, .*torch"):
        resolve_backend(x[0], "nope")
    with pytest.raises(ValueError, match=r"unknown mLSTM backend 'nope'"):
        mlstm_chunkwise(*x, backend="nope")
    with pytest.raises(ValueError, match=r"unknown mLSTM backend 'nope'"):
        mlstm_step(*(t[:, :, 0] for t in x), backend="nope")


def test_unknown_backend_from_env(x, monkeypatch):
    monkeypatch.setenv("FAST_XLSTM_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"unknown mLSTM backend 'nope'"):
        mlstm_chunkwise(*x)


@pytest.mark.parametrize("env", ["torch", "auto", None])
def test_env_and_auto_pick_torch_on_cpu(env, x, monkeypatch, rel_err):
    if env is None:
        monkeypatch.delenv("FAST_XLSTM_BACKEND", raising=False)
    else:
        monkeypatch.setenv("FAST_XLSTM_BACKEND", env)
    assert "torch" in available_backends()
    assert resolve_backend(x[0]).name == "torch"
    assert resolve_backend(x[0], "auto").name == "torch"
    h, _ = mlstm_chunkwise(*x)
    assert rel_err(h, mlstm_recurrent(*x)[0]) < 1e-9


def _recording_backend(name, calls, supports, priority):
    def chunkwise(*a, **kw):
        calls.append((name, "chunkwise"))
        return ops.mlstm_chunkwise_torch(*a, **kw)

    def step(*a, **kw):
        calls.append((name, "step"))
        return ops.mlstm_step_torch(*a, **kw)

    return Backend(name, chunkwise, step, supports, priority)


def test_auto_skips_backends_that_do_not_support_the_device(x, backends, no_backend_env):
    calls = []
    register_backend(_recording_backend("gpu_only", calls, lambda t: t.is_cuda, priority=10))
    assert resolve_backend(x[0]).name == "torch"
    mlstm_chunkwise(*x)
    assert calls == []
    with pytest.raises(ValueError, match=r"mLSTM backend 'gpu_only' does not support tensors on cpu"):
        mlstm_chunkwise(*x, backend="gpu_only")


def test_auto_prefers_priority_and_env_or_argument_override(x, backends, monkeypatch):
    calls = []
    register_backend(_recording_backend("fast_cpu", calls, lambda t: True, priority=5))
    monkeypatch.delenv("FAST_XLSTM_BACKEND", raising=False)
    mlstm_chunkwise(*x)
    mlstm_step(*(t[:, :, 0] for t in x))
    assert calls == [("fast_cpu", "chunkwise"), ("fast_cpu", "step")]

    calls.clear()
    monkeypatch.setenv("FAST_XLSTM_BACKEND", "torch")
    mlstm_chunkwise(*x)
    assert calls == []  # the env var forces torch
    mlstm_chunkwise(*x, backend="fast_cpu")
    assert calls == [("fast_cpu", "chunkwise")]  # an explicit argument beats the env var
