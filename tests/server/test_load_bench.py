"""`bench/load.py` against the test server: both arrival modes run, the JSON has the numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "load.py"


@pytest.mark.parametrize("mode", [["--concurrency", "4"], ["--request-rate", "50", "--endpoint", "chat"],
                                  ["--concurrency", "3", "--processes", "2", "--warmup", "2"],
                                  ["--request-rate", "50", "--processes", "2"]],
                         ids=["clients", "poisson-chat", "clients-2-processes", "poisson-2-processes"])
def test_load_generator(server, tmp_path, mode):
    out = tmp_path / "load.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--base-url", f"{server.url}/v1", "--api-key", server.api_key,
                        "--num-requests", "8", "--prompt-tokens", "8", "--output-tokens", "5",
                        "--shared-prefix-tokens", "4", "--output", str(out), *mode],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads(out.read_text())
    assert s["requests"] == {"completed": 8, "failed": 0, "errors": []}
    assert s["output_tokens"] == 40 and s["output_throughput_tok_s"] > 0
    for key in ("ttft_ms", "itl_ms", "e2e_ms"):
        assert set(s[key]) == {"mean", "p50", "p90", "p99"} and s[key]["p50"] > 0
    if "--concurrency" in mode:
        assert s["prompt_tokens"] == 8 * 12  # random token prompts are exact
