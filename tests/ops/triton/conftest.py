"""Triton kernel tests: on CPU they run in Triton's interpreter (TRITON_INTERPRET=1) at tiny sizes.

The interpreter is chosen when a kernel is decorated, so the variable is set before triton and the kernels
are imported. It is then removed again for the rest of the session (and re-set around each test in this
directory): the ops dispatch routes CPU tensors to Triton when it is set, which other test directories
must not see. On a CUDA machine nothing is changed and the kernels compile for the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    _had_env = "TRITON_INTERPRET" in os.environ
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    import triton  # noqa: F401

    import fast_xlstm.ops.triton  # noqa: F401  (decorates the kernels now, with the setting above)
except ImportError:  # the test modules skip themselves via pytest.importorskip
    pass
finally:
    if not CUDA and not _had_env:
        del os.environ["TRITON_INTERPRET"]


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> str:
    return "cuda" if CUDA else "cpu"


def _pack_projection(q, k, v, i, f) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, NH, S, DK], v [B, NH, S, DV], i, f [B, NH, S] laid out as the model's fused projections:
    proj [B, S, 2 * NH * DK + NH * DV + DV] (q | k | v | an o-gate-like filler) and gates [B, S, 2 * NH]."""
    B, _, S, _ = q.shape
    flat = lambda x: x.transpose(1, 2).reshape(B, S, -1)
    filler = torch.randn(B, S, v.shape[-1], generator=torch.Generator().manual_seed(7)).to(q)
    proj = torch.cat([flat(q), flat(k), flat(v), filler], -1)
    return proj, torch.cat([i.transpose(1, 2), f.transpose(1, 2)], -1)


def _unpack_projection(proj, gates, NH: int, DK: int, DV: int) -> list[torch.Tensor]:
    """The [B, NH, S, D] / [B, NH, S] views of `_pack_projection`'s tensors that `MLSTMLayer.cell` makes
    (none contiguous; q, k, v with a contiguous last dim)."""
    B, S, _ = proj.shape
    q, k, v, _ = proj.split([NH * DK, NH * DK, NH * DV, DV], -1)
    out = [x.reshape(B, S, NH, -1).transpose(1, 2) for x in (q, k, v)]
    out += [g.transpose(1, 2) for g in gates.split(NH, -1)]
    assert not any(x.is_contiguous() for x in out)
    return out


@pytest.fixture
def pack_projection():
    return _pack_projection


@pytest.fixture
def unpack_projection():
    return _unpack_projection
