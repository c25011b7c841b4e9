"""Output dtypes: h has q's dtype; the state has the initial state's dtype (fp32, or fp64 for fp64 inputs, when
none is given); the math runs in fp64 for fp64 inputs and in fp32 otherwise."""

from __future__ import annotations

import pytest
import torch

from fast_xlstm.ops import mlstm_chunkwise, mlstm_quadratic, mlstm_recurrent, mlstm_step

F16, F32, F64 = torch.bfloat16, torch.float32, torch.float64
SEQ_FORMS = {
    "recurrent": mlstm_recurrent,
    "quadratic": mlstm_quadratic,
    "chunkwise": lambda *a: mlstm_chunkwise(*a, chunk_size=8, backend="torch"),
    "packed": lambda *a: mlstm_chunkwise(*a, cu_seqlens=torch.tensor([0, a[0].shape[2]]), chunk_size=8,
                                         backend="torch"),
    "step": lambda q, k, v, i, f, s: mlstm_step(*(t[:, :, 0] for t in (q, k, v, i, f)), s, backend="torch"),
}


@pytest.mark.parametrize("form,S", [(form, 20) for form in SEQ_FORMS]
                         + [(form, 0) for form in SEQ_FORMS if form != "step"])
@pytest.mark.parametrize("in_dtype,state_dtype,expected_state", [
    (F64, None, F64), (F32, None, F32), (F16, None, F32),
    (F64, F32, F32), (F32, F64, F64), (F16, F16, F16), (F32, F16, F16),
], ids=lambda d: str(d).replace("torch.", "") if d is not None else "no_state")
def test_output_dtypes(form, S, in_dtype, state_dtype, expected_state, seed, make_inputs, random_state):
    x = make_inputs(1, 2, S, 8, 4, in_dtype, seed=seed)
    s0 = None if state_dtype is None else random_state(1, 2, 8, 4, state_dtype, seed=seed + 1)
    h, st = SEQ_FORMS[form](*x, s0)
    assert h.dtype == in_dtype
    assert [t.dtype for t in st] == [expected_state] * 3
    if form != "step":
        assert h.shape == (1, 2, S, 4)


@pytest.mark.parametrize("form,tol", [("chunkwise", 0.0), ("packed", 0.0), ("step", 0.0), ("recurrent", 1e-6)])
def test_fp64_inputs_with_fp32_state_compute_in_fp64(form, tol, seed, make_inputs, random_state, state_err):
    """fp64 inputs with an fp32 state: the math runs in fp64 and the state is rounded to fp32 on the way out.

    One call (chunkwise, packed, step) rounds once, so it equals the fp64 run rounded; the recurrent form
    hands an fp32 state from step to step, so it is rounded at every step (fp32-level error).
    """
    x = make_inputs(1, 2, 20, 8, 4, F64, seed=seed)
    s32 = random_state(1, 2, 8, 4, F32, seed=seed + 1)
    _, st = SEQ_FORMS[form](*x, s32)
    _, st_ref = SEQ_FORMS[form](*x, [t.double() for t in s32])
    assert state_err(st, [t.float() for t in st_ref]) <= tol
