"""bench/train_mfu.py and bench/prefill_in_pool.py at a tiny size on CPU: their code paths run and write
what they promise (the numbers mean nothing here)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str):
    sys.path.insert(0, str(BENCH))  # the scripts import their siblings, as when run from bench/
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def test_train_mfu_runs_packed_steps_with_partial_checkpointing(tmp_path):
    mod = _load("train_mfu")
    out = tmp_path / "mfu.json"
    assert mod.main(["--device", "cpu", "--shape", "tiny", "--blocks", "3", "--seq-len", "128", "--steps", "2",
                     "--warmup", "1", "--ac-blocks", "2", "--accum", "2", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["checkpointed_blocks"] == 2 and r["shape"]["blocks"] == 3
    assert len(r["losses"]) == 3 and all(math.isfinite(x) and x > 0 for x in r["losses"])
    assert r["tokens_per_s_per_gpu"] > 0 and r["step_time_s"]["median"] > 0


def test_memory_model_checkpoints_only_what_does_not_fit():
    mod = _load("train_mfu")
    args = mod.parse_args(["--blocks", "32"])
    gib = 2 ** 30
    full = mod.memory_need(args, 2, 32, 32)
    none = mod.memory_need(args, 2, 32, 0)
    assert full < none  # checkpointing keeps less
    assert [mod.memory_need(args, 2, 32, k) for k in (0, 8, 16, 24)] == sorted(
        (mod.memory_need(args, 2, 32, k) for k in (0, 8, 16, 24)), reverse=True)
    # 7B on two 80 GB cards: the fp32 weights, grads and AdamW state alone are ~51 GiB per card.
    assert 50 * gib < mod.memory_need(args, 2, 32, 32) < 70 * gib


def test_prefill_in_pool_bench_writes_rows(tmp_path):
    mod = _load("prefill_in_pool")
    out = tmp_path / "pool.json"
    assert mod.main(["--model", "xlstm-tiny", "--packs", "2x20,3x8", "--slots", "3", "--repeat", "1",
                     "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [(row["prompts"], row["tokens_each"]) for row in r["rows"]] == [(2, 20), (3, 8)]
    assert all(row["grouped_ms"] > 0 and row["grouped_tok_s"] > 0 for row in r["rows"])


def test_serve_gpu_runs_variants_loads_and_prefix_on_cpu(tmp_path):
    # Real `fast-xlstm serve` processes and the real load generator, tiny model, eager: two server
    # variants over one wave and a longer load, then the prefix TTFT comparison, against one baseline.
    mod = _load("serve_gpu")
    out = tmp_path / "serve"
    assert mod.main(["--out", str(out), "--model", "xlstm-tiny", "--device", "cpu", "--no-compile",
                     "--loads", "2:2,2:5@40", "--prompt-tokens", "16", "--output-tokens", "4", "--client-processes", "1",
                     "--prefix-tokens", "600", "--prefix-requests", "3",
                     "--variant", "base=", "--variant", "mixed=--mixed-steps --max-num-batched-tokens 24",
                     "--fresh-caches"]) == 0
    r = json.loads((out / "serve.json").read_text())
    assert all(r["variants"][v]["server_ready_s"] > 0 for v in ("base", "mixed"))
    assert not list(out.glob("**/inductor"))  # fresh caches live outside the results folder
    assert set(r["variants"]) == {"base", "mixed"} and r["loads"] == ["c2_n2", "c2_n5_r40"]
    assert r["variants"]["mixed"]["server_args"] == ["--mixed-steps", "--max-num-batched-tokens", "24"]
    for name in ("base", "mixed"):
        for key, n in (("c2_n2", 2), ("c2_n5_r40", 5)):
            run = r["variants"][name][key]
            assert run["requests"]["completed"] == n and run["requests"]["failed"] == 0
            assert run["output_tokens"] == 4 * n and run["engine"]["steps"] > 0
    # (mixed steps need the device-table kernels, which CPU servers do not run: the mixed variant
    # here checks the plumbing of server options, tests/ops/triton/test_mixed_engine.py the steps)
    assert r["variants"]["base"]["c2_n5_r40"]["engine"]["mixed_steps"] == 0
    assert r["variants"]["base"]["c2_n5_r40"]["config"]["request_rate"] == 40
    ratios = r["ratios_served_to_static_decode"]
    assert set(ratios) == {f"{v}/{k}" for v in ("base", "mixed") for k in ("c2_n2", "c2_n5_r40")}
    assert all(x["to_static_decode"] > 0 for x in ratios.values()) and r["static_decode_tok_s"]["2"] > 0
    assert r["ttft_shared_prefix_cache_on"]["cached_prompt_tokens"] > 0
    assert r["ttft_shared_prefix_cache_off"]["cached_prompt_tokens"] == 0
    assert r["ttft_p50_ratio_off_over_on"] > 0
    assert (out / "steps-mixed.jsonl").read_text().strip()


def test_serve_gpu_rejects_bad_loads_and_variants():
    mod = _load("serve_gpu")
    import argparse

    import pytest

    assert mod.parse_loads("64:256, 256:1024@30") == [(64, 256, None), (256, 1024, 30.0)]
    for bad in ("64", "64:32", "0:4", "a:b", "2:4@0", "2:4@x"):
        with pytest.raises(argparse.ArgumentTypeError, match="CONCURRENCY:REQUESTS"):
            mod.parse_loads(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=SERVER_ARGS"):
        mod.parse_variant("--mixed-steps")
    assert mod.parse_variant("m=--mixed-steps --x 1") == ("m", ["--mixed-steps", "--x", "1"])


def test_mixed_step_times_both_ways_on_cpu(tmp_path):
    mod = _load("mixed_step")
    out = tmp_path / "mixed.json"
    assert mod.main(["--model", "xlstm-tiny", "--cases", "3:1x20,0:2x9", "--no-compile", "--repeat", "1",
                     "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [(x["decode_rows"], x["prompts"], x["tokens_each"]) for x in r["rows"]] == [(3, 1, 20), (0, 2, 9)]
    for row in r["rows"]:
        assert row["mixed_ms"] > 0 and row["split_ms"] > 0 and 0 < row["mixed_host_launch_ms"] <= row["mixed_ms"]


def test_startup_time_builds_and_warms_a_compiled_engine(tmp_path):
    mod = _load("startup_time")
    out = tmp_path / "startup.json"
    assert mod.main(["--model", "xlstm-tiny", "--device", "cpu", "--max-num-seqs", "2", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["model"] == "xlstm-tiny" and r["device"] == "cpu" and not r["cold"]
    assert r["build_s"] > 0 and r["warm_up_s"] > 0


def test_decode_step_tiles_overrides_the_named_kernel(monkeypatch):
    pytest.importorskip("triton")
    import fast_xlstm.ops.triton.few_rows_linear as few_rows
    import fast_xlstm.ops.triton.step as step

    default = step._tiles
    monkeypatch.setattr(step, "_tiles", default)  # both restored after the test
    monkeypatch.setattr(few_rows, "few_rows_tiling", few_rows.few_rows_tiling)
    mod = _load("decode_step_tiles")
    mod.override("step:256,16,2")
    assert step._tiles(1, 8, 256, 512) == (256, 16, 2)
    assert step._tiles(64, 8, 256, 512) == default(64, 8, 256, 512) != (256, 16, 2)
    mod.override("few:32,512,4,3")
    assert few_rows.few_rows_tiling(4096, 10944) == (32, 512, 4, 3)
    for bad in ("step:1,2", "few:1,2,3", "tiles:1,2,3"):
        with pytest.raises(SystemExit, match="expected step"):
            mod.override(bad)


def test_overlap_probe_times_every_way_on_cpu(tmp_path):
    probe = _load("overlap_probe")
    out = tmp_path / "overlap.json"
    assert probe.main(["--model", "xlstm-tiny", "--cases", "3:2x16:2", "--no-compile", "--repeat", "1",
                       "--green-sms", "8", "--green-capture", "--green-disjoint", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert not any(k.startswith("green") for k in row)  # green contexts are CUDA's: none on CPU
    assert (row["decode_rows"], row["prompts"], row["tokens_each"], row["decode_steps"]) == (3, 2, 16, 2)
    for name in ("decode", "prefill", "serial", "overlap", "overlap_hi"):
        assert row[f"{name}_ms"] > 0
    assert math.isfinite(row["hidden_overlap"]) and math.isfinite(row["hidden_overlap_hi"])
    with pytest.raises(SystemExit, match="DECODE:COUNTxLENGTH:STEPS"):
        probe.parse_cases("3:2x16")
    with pytest.raises(SystemExit, match="DECODE:COUNTxLENGTH:STEPS"):
        probe.parse_cases("0:2x16:1")


def test_engine_steady_runs_each_config_on_cpu(tmp_path):
    steady = _load("engine_steady")
    out = tmp_path / "steady.json"
    assert steady.main(["--model", "xlstm-tiny", "--slots", "3", "--prompt", "12", "--output", "4", "--warm-steps",
                        "4", "--steps", "6", "--no-compile", "--configs", "default,trickle4", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["config"] for r in rows] == ["default", "trickle4"]
    assert rows[1]["options"] == {"mixed_steps": True, "trickle_tokens": 4}
    for r in rows:  # steady arrivals: every timed step produced tokens and new prompts were prefilled
        assert r["output_tokens"] >= r["steps"] and r["output_tok_s"] > 0 and r["prompt_tokens"] > 0
    for bad in ("trickle0", "trickle", "fast"):
        with pytest.raises(SystemExit, match="--configs"):
            steady.parse_config(bad)
