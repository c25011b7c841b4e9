"""`fast-xlstm bench --quick` on CPU: every measurement of both stacks runs and reports (numbers meaningless)."""

from __future__ import annotations

import json

import pytest

from fast_xlstm.cli import main


def test_bench_quick_writes_json_markdown_and_plots(tmp_path):
    pytest.importorskip("xlstm")
    assert main(["bench", "--model", "xlstm-tiny", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert set(data["results"]) == {"fast-xlstm", "xlstm (official)"}
    for res in data["results"].values():
        assert [r["prompt"] for r in res["ttft"]] == [8, 32] and all(r["ms"] > 0 for r in res["ttft"])
        assert [r["batch"] for r in res["decode_batch"]] == [1, 2, 4]
        assert all(r["tok_s"] > 0 and r["gb_s"] > 0 for r in res["decode_batch"] + res["decode_after_prompt"])
        assert all(r["tok_s"] > 0 for r in res["prefill"]) and len(res["memory"]) == 2
        assert all("warmup_peak_gb" in r and r["seconds"] > 0 for r in res["memory"])
    assert data["meta"]["commit"] and data["meta"]["parameters"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert "Time to first token" in md and "ratio" in md
    pytest.importorskip("matplotlib")
    assert (tmp_path / "decode_batch.png").stat().st_size > 1000


def test_bench_rejects_unknown_model_and_stack(tmp_path, capsys):
    assert main(["bench", "--model", "nope", "--quick", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--model", "xlstm-tiny", "--stacks", "ours,theirs", "--quick", "--out", str(tmp_path)]) == 2
    assert "unknown stack" in capsys.readouterr().err


def test_bench_sections_run_only_what_is_asked(tmp_path, capsys):
    assert main(["bench", "--model", "xlstm-tiny", "--quick", "--stacks", "ours", "--sections", "ttft,memory",
                 "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "bench.json").read_text())["results"]["fast-xlstm"]
    assert len(res["ttft"]) == 2 and len(res["memory"]) == 2
    assert res["decode_batch"] == res["prefill"] == res["decode_after_prompt"] == []
    md = (tmp_path / "bench.md").read_text()
    assert "Time to first token" in md and "Prefill throughput" not in md
    assert main(["bench", "--model", "xlstm-tiny", "--quick", "--sections", "ttft,speed", "--out", str(tmp_path)]) == 2
    assert "unknown bench sections" in capsys.readouterr().err


def test_a_point_out_of_memory_is_recorded_and_the_rest_run():
    """A decode batch or prefill shape that runs out of memory becomes an error row; the other
    points of the same stack are still measured (a real stack, its prefill made to fail at batch 2)."""
    import torch

    from fast_xlstm.bench.stacks import OursStack
    from fast_xlstm.bench.suite import SuiteSizes, run_suite
    from fast_xlstm.llm import LLM

    model = LLM("xlstm-tiny", device="cpu", dtype="float32").model

    class FailsAtTwo(OursStack):
        def prefill(self, prompts):
            if prompts.shape[0] == 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated at batch 2)")
            return super().prefill(prompts)

        def forward_tokens(self, ids):
            if ids.shape[0] == 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated at batch 2)")
            return super().forward_tokens(ids)

    sizes = SuiteSizes.quick()
    out = run_suite(lambda b: FailsAtTwo(model, max_batch=b, state_dtype=torch.float32), model,
                    sizes, torch.float32, sections=("decode_batch", "prefill"))
    assert [r["batch"] for r in out["decode_batch"]] == [1, 2, 4]
    assert out["decode_batch"][1] == {"batch": 2, "error": "out of memory"}
    assert all(r["tok_s"] > 0 for r in out["decode_batch"] if r["batch"] != 2)
    assert out["prefill"][0] == {"batch": 2, "context": 16, "error": "out of memory"} and out["prefill"][1]["tok_s"] > 0
