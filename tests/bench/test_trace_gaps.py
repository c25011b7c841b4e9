"""bench/trace_gaps.py: idle gaps of a Kineto chrome trace and their causes, on a trace laid out as
torch.profiler writes it (device events, runtime calls with correlation ids, host ops and annotations)."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

PATH = Path(__file__).resolve().parents[2] / "bench" / "trace_gaps.py"


def _module():
    spec = importlib.util.spec_from_file_location("trace_gaps", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _x(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 1, "args": args}


def _trace(rng: random.Random) -> tuple[dict, float, float]:
    """Kernels k1 [0, 100) and k2 [100, 200) back to back; an `item()` sync waits from 150 to 200 and the
    next kernel k3 only starts at 200 + sync_gap; then k4 after a launch-bound gap. Returns the trace and
    the two gap lengths (us)."""
    sync_gap, launch_gap = rng.uniform(100, 400), rng.uniform(50, 90)
    k3 = 200 + sync_gap
    k4 = k3 + 30 + launch_gap
    ev = [
        _x("user_annotation", "step", -50, k4 + 200),
        _x("cpu_op", "aten::mm", -40, 10), _x("cuda_runtime", "cudaLaunchKernel", -38, 5, correlation=1),
        _x("cpu_op", "aten::mm", -20, 10), _x("cuda_runtime", "cudaLaunchKernel", -18, 5, correlation=2),
        _x("user_annotation", "read_loss", 140, 70),
        _x("cpu_op", "aten::item", 145, 60), _x("cpu_op", "aten::_local_scalar_dense", 146, 58),
        _x("cuda_runtime", "cudaStreamSynchronize", 150, 50),
        _x("cpu_op", "aten::add", k3 - 8, 6), _x("cuda_runtime", "cudaLaunchKernel", k3 - 6, 4, correlation=3),
        _x("cpu_op", "aten::gelu", k4 - 4, 3), _x("cuda_runtime", "cudaLaunchKernel", k4 - 3, 2, correlation=4),
        _x("kernel", "k1", 0, 100, tid=7, correlation=1), _x("kernel", "k2", 100, 100, tid=7, correlation=2),
        _x("kernel", "k3", k3, 30, tid=7, correlation=3), _x("kernel", "k4", k4, 40, tid=7, correlation=4),
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "host"}},
    ]
    rng.shuffle(ev)  # the report must not depend on the order events are written in
    return {"traceEvents": ev}, sync_gap, launch_gap


def test_gaps_are_measured_and_blamed(tmp_path):
    mod = _module()
    trace, sync_gap, launch_gap = _trace(random.Random())
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    r = mod.idle_gaps(path, min_gap_us=20)
    assert r["gaps"] == 2
    assert abs(r["idle_ms"] * 1e3 - (sync_gap + launch_gap)) < 1e-6
    assert abs(r["busy_ms"] * 1e3 - 270) < 1e-6
    causes = {row["cause"]: row["ms"] * 1e3 for row in r["by_cause"]}
    assert abs(causes["sync: aten::_local_scalar_dense @ read_loss"] - sync_gap) < 1e-6
    assert abs(causes["launch: aten::gelu @ step"] - launch_gap) < 1e-6
    # Gaps below the threshold are not counted.
    assert mod.idle_gaps(trace, min_gap_us=1e4)["gaps"] == 0


def test_cli_prints_the_causes(tmp_path, capsys):
    mod = _module()
    trace, _, _ = _trace(random.Random(1))
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    assert mod.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "idle" in out and "sync: aten::_local_scalar_dense @ read_loss" in out
