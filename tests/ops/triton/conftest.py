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
