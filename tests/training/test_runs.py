"""End-to-end runs of the tiny golden config: golden losses, 2 processes = 1 process, kill and resume,
NaN stop, export -> from_pretrained, fine-tuning from a hub checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch

from trainutil import (GOLDEN, golden_config, run_in_process, run_subprocess, step_records, subprocess_env,
                       train_command, write_config)


def test_losses_match_the_golden_file(reference_run):
    golden = json.loads(GOLDEN.read_text())
    tol = golden["tolerance"]
    got = reference_run.records
    assert sorted(got) == golden["steps"]
    for step, loss, norm, lr in zip(golden["steps"], golden["loss"], golden["grad_norm"], golden["lr"]):
        assert abs(got[step]["loss"] - loss) <= tol["loss_abs"], (step, got[step]["loss"], loss)
        assert abs(got[step]["grad_norm"] - norm) <= tol["grad_norm_rel"] * norm, (step, got[step]["grad_norm"], norm)
        assert got[step]["lr"] == pytest.approx(lr, rel=1e-12)
    assert golden["loss"][-1] < golden["loss"][0] - 3  # the run learns: a dead update fails here


def test_two_processes_match_one(reference_run, tmp_path):
    # 2 ranks x 1 row x 2 accumulation steps = the reference's 1 rank x 4 rows: same global batch.
    cfg = golden_config(reference_run.config["data"]["path"], tmp_path / "run",
                        **{"train.micro_batch_size": 1, "checkpoint.every": 100})
    r = run_subprocess(train_command(write_config(tmp_path / "c.yaml", cfg), nproc=2))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got, ref = step_records(tmp_path / "run"), reference_run.records
    assert sorted(got) == sorted(ref)
    for s in ref:  # gloo sums in another order: fp32 rounding only
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], abs=1e-5), s
        assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-4), s
    assert got[10]["val_loss"] == pytest.approx(ref[10]["val_loss"], abs=1e-5)


def test_fused_adamw_on_sharded_parameters_matches_foreach(reference_run, tmp_path):
    """optim.implementation=fused on two processes (FSDP2 DTensor shards, gloo) follows the reference run's
    foreach AdamW: the two compute the same update in another order (fp32 rounding only). The same
    DTensor dispatch runs the CUDA kernel that `auto` picks on GPUs."""
    cfg = golden_config(reference_run.config["data"]["path"], tmp_path / "run",
                        **{"train.micro_batch_size": 1, "checkpoint.every": 100, "optim.implementation": "fused"})
    r = run_subprocess(train_command(write_config(tmp_path / "c.yaml", cfg), nproc=2))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got, ref = step_records(tmp_path / "run"), reference_run.records
    assert sorted(got) == sorted(ref)
    for s in ref:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], abs=1e-4), s
        assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-3), s


def test_optimizer_implementation_is_checked():
    from fast_xlstm.training.config import OptimSection
    with pytest.raises(ValueError, match="optim.implementation"):
        OptimSection(implementation="fast")


def test_kill_and_resume_equals_uninterrupted(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    cfg = golden_config(reference_run.config["data"]["path"], run_dir, **{"debug.step_delay_s": 0.3})
    config = write_config(tmp_path / "c.yaml", cfg)
    proc = subprocess.Popen(train_command(config), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=subprocess_env())
    first = run_dir / "checkpoints" / "step-00000003" / ".metadata"
    deadline = time.time() + 120
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() and still_running, "the run should be mid-way when killed"
    killed_at = max(step_records(run_dir))
    assert 3 <= killed_at < 10

    r = run_subprocess(train_command(config, "--debug.step_delay_s=0"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    resumed_from = [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                    if m.get("event") == "resume"][0]["step"]
    got, ref = step_records(run_dir), reference_run.records
    assert sorted(got) == sorted(ref)
    for s in range(resumed_from + 1, 11):  # the resumed steps: identical numbers
        assert got[s]["loss"] == ref[s]["loss"] and got[s]["grad_norm"] == ref[s]["grad_norm"], s


def test_nan_loss_stops_with_a_checkpoint_of_the_last_good_step(reference_run, tmp_path, capsys):
    cfg = golden_config(reference_run.config["data"]["path"], tmp_path / "run",
                        **{"debug.nan_at_step": 5, "checkpoint.every": 100})
    assert run_in_process(cfg) == 3
    err = capsys.readouterr().err
    assert "non-finite value at step 5: loss is nan" in err and "last good step 4" in err
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000004"
    assert (ckpt / ".metadata").is_file()
    got = step_records(tmp_path / "run")
    assert sorted(got) == [1, 2, 3, 4]
    assert all(got[s]["loss"] == reference_run.records[s]["loss"] for s in got)
    # Resuming from it redoes step 5 from the same data position: the reference's step 5 (no NaN now).
    assert run_in_process({**cfg, "debug": {}, "train": {**cfg["train"], "steps": 5}}) == 0
    assert step_records(tmp_path / "run")[5]["loss"] == reference_run.records[5]["loss"]


def test_export_then_from_pretrained_gives_the_trained_logits(reference_run, tmp_path):
    from fast_xlstm.model import XLSTMForCausalLM
    from fast_xlstm.tokenizer import Tokenizer
    from fast_xlstm.cli import main

    assert main(["export", str(reference_run.run_dir / "checkpoints"), str(tmp_path / "hub")]) == 0
    model = XLSTMForCausalLM.from_pretrained(tmp_path / "hub")
    with torch.no_grad():
        logits = model(reference_run.probe)[0]
    assert torch.allclose(logits, reference_run.logits, atol=1e-5, rtol=0), (logits - reference_run.logits).abs().max()
    assert Tokenizer.from_dir(tmp_path / "hub").vocab_size == 1024  # the run's tokenizer came along


def test_finetune_from_hub_checkpoint_starts_from_its_weights(tiny_data, tmp_path):
    from modelutil import tiny_model

    from fast_xlstm.model import XLSTMForCausalLM
    from fast_xlstm.training.corpus import TokenCorpus, resolve_split
    from fast_xlstm.training.data import PackedLoader
    from fast_xlstm.training.packing import loss_sum, packed_logits

    tiny_model(seed=3).save_pretrained(tmp_path / "base", max_shard_size="200KB")  # sharded hub layout
    cfg = golden_config(tiny_data, tmp_path / "run", **{"model.init_from": str(tmp_path / "base"),
                                                         "model.preset": None, "train.steps": 1})
    assert run_in_process(cfg) == 0
    # Step 1's loss is the checkpoint's own loss on the first batch: its weights were loaded.
    loader = PackedLoader(TokenCorpus(resolve_split(tiny_data)), seq_len=64, micro_batch_size=4)
    batch = loader.next_step(1)[0]
    model = XLSTMForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        want = float(loss_sum(packed_logits(model, batch.input_ids, batch.doc_starts), batch.labels)) / batch.num_targets
    assert step_records(tmp_path / "run")[1]["loss"] == pytest.approx(want, abs=1e-5)
