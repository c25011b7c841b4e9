"""bench/step_log_summary.py on a step log the engine really wrote (tiny model, CPU)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import time
from pathlib import Path

from fast_xlstm import LLM, SamplingParams

PATH = Path(__file__).resolve().parents[2] / "bench" / "step_log_summary.py"


def test_summary_of_a_real_step_log(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("step_log_summary", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    log = tmp_path / "steps.jsonl"
    llm = LLM("xlstm-tiny", device="cpu", max_num_seqs=2, max_num_batched_tokens=16, step_log=log)
    start = time.time()
    llm.generate(["Once upon a time", "The river runs", "A"], SamplingParams(temperature=0, max_tokens=6),
                 use_tqdm=False)
    window = (start, time.time())
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    s = mod.summarize(steps, window)
    assert s["steps"] == len(steps) == llm.engine.stats["steps"]
    assert s["prefill_tokens"] == sum(r["prefill_tokens"] for r in steps) > 0
    assert s["prefill_steps"] + s["decode_steps"] <= s["steps"] and s["most_common_batch"] in (1, 2)
    assert s["idle_between_steps_s"] >= 0 and s["decode_s"] > 0
    load = tmp_path / "load.json"
    load.write_text(json.dumps({"window_unix_s": list(window), "output_throughput_tok_s": 1.0, "duration_s": 1.0}))
    assert mod.main([str(log), str(load)]) == 0 and "prefill_tokens" in capsys.readouterr().out
    packed = tmp_path / "steps.jsonl.gz"  # committed step logs are gzipped
    packed.write_bytes(gzip.compress(log.read_bytes()))
    assert mod.main([str(packed), str(load)]) == 0 and f"steps {len(steps)}," in capsys.readouterr().out
