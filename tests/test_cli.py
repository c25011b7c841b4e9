"""The `fast-xlstm` commands, run end to end as real subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fast_xlstm.loading import tiny_tokenizer_dir
from fast_xlstm.model import XLSTMForCausalLM

from modelutil import tiny_model


def run(*args: str, stdin: str | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "fast_xlstm", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt")
    tiny_model(seed=5).save_pretrained(path, max_shard_size="300KB")
    shutil.copy(tiny_tokenizer_dir() / "tokenizer.json", path / "tokenizer.json")
    return path


def test_generate_with_no_model_uses_the_bundled_model():
    r = run("generate", "Hello world", "--max-tokens", "8", "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "bundled default model" in r.stderr and "tok/s" in r.stderr


def test_generate_random_preset_says_it_is_random():
    r = run("generate", "Hello world", "--model", "xlstm-tiny", "--max-tokens", "8", "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "random weights" in r.stderr


def test_generate_from_checkpoint_is_deterministic_when_greedy(checkpoint):
    a = run("generate", "The river", "--model", str(checkpoint), "--temperature", "0", "--max-tokens", "10")
    b = run("generate", "The river", "--model", str(checkpoint), "--temperature", "0", "--max-tokens", "10",
            "--dtype", "float32", "--device", "cpu")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and a.stdout.strip()
    assert "random" not in a.stderr and "loaded checkpoint" in a.stderr


def test_chat_keeps_state_between_turns(checkpoint):
    r = run("chat", "--model", str(checkpoint), "--temperature", "0", "--max-tokens", "6",
            stdin="Hello there\n/reset\nHi\nHow are you today?\n/exit\nnever read\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant:") == 3
    assert "conversation reset" in r.stderr
    turns = [line for line in r.stderr.splitlines() if "prefilled" in line]
    assert len(turns) == 3
    # The third turn prefills only its own message (plus the pending token), not the history.
    prefilled = int(turns[2].split("prefilled ")[1].split()[0])
    history = int(turns[2].split("history ")[1].split()[0])
    from fast_xlstm.tokenizer import Tokenizer

    new = Tokenizer.from_dir(checkpoint).encode("\nUser: How are you today?\nAssistant:", add_bos=False)
    assert prefilled in (len(new), len(new) + 1) and history > prefilled + 6


def test_info_on_checkpoint_and_preset(checkpoint):
    r = run("info", str(checkpoint), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["layout"] == "hub" and info["parameters"] == tiny_model().num_parameters()
    assert info["state_bytes_per_sequence"]["float32"] == 2 * 4 * (16 * 32 + 16 + 1) * 4
    r = run("info", "xlstm-7b")
    assert r.returncode == 0 and "6,865,424,896" in r.stdout and "134.48 MB fp32" in r.stdout


def test_convert_round_trip(checkpoint, tmp_path):
    r = run("convert", str(checkpoint), str(tmp_path / "x"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "x" / "config.yaml").exists() and (tmp_path / "x" / "tokenizer.json").exists()
    r = run("convert", str(tmp_path / "x"), str(tmp_path / "h"), "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "h" / "config.json").exists()
    a = XLSTMForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    b = XLSTMForCausalLM.from_pretrained(tmp_path / "h")
    for (ka, ta), (kb, tb) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
        assert ka == kb and torch.equal(ta, tb)
    r = run("convert", str(checkpoint), str(tmp_path / "h"))
    assert r.returncode == 2 and "not empty" in r.stderr


@pytest.mark.parametrize("args, message", [
    (("generate", "hi", "--model", "/nonexistent/dir"), "neither a checkpoint directory nor a preset"),
    (("generate", "hi", "--temperature", "-1"), "temperature"),
    (("generate", "hi", "--max-tokens", "0"), "max_tokens"),
    (("generate", ""), "empty"),
    (("info", "/nonexistent"), "neither a checkpoint directory nor a preset"),
    (("generate", "hi", "--dtype", "int7"), "unknown dtype"),
])
def test_bad_input_exits_2_with_a_message(args, message):
    r = run(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert message in r.stderr
