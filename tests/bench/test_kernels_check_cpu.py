"""bench/kernels.py calls mlstm_kernels with our convention: its native torch kernels compute our function (CPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def test_mlstm_kernels_native_twins_compute_our_function(capsys):
    pytest.importorskip("einops")
    pytest.importorskip("mlstm_kernels")
    path = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels)
    # fp64 to 1e-10, fp32 to 1e-3 (max over max) against our fp64 recurrent definition
    assert kernels.check_cpu(S=128) == 0, capsys.readouterr().out
