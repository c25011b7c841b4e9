"""Config and CLI parsing, the LR schedule, weight-decay groups, sharded init, activation checkpointing."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch

from fast_xlstm.config import xlstm_tiny
from fast_xlstm.model import XLSTMForCausalLM
from fast_xlstm.training.config import ScheduleSection, TrainConfig, parse_overrides
from fast_xlstm.training.optim import lr_at, param_groups

from trainutil import golden_config, run_in_process, step_records, threads

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_overrides_and_validation(tmp_path):
    assert parse_overrides(["--optim.lr=1e-3", "--train.steps", "7", "log.every=2", "--optim.betas=[0.9, 0.99]"]) == [
        ("optim.lr", 1e-3), ("train.steps", 7), ("log.every", 2), ("optim.betas", [0.9, 0.99])]
    (tmp_path / "c.yaml").write_text("data: {path: /d}\ntrain: {steps: 3}\n")
    cfg = TrainConfig.load(tmp_path / "c.yaml", ["--train.steps=9", "--optim.lr=0.01"])
    assert cfg.train.steps == 9 and cfg.optim.lr == 0.01 and cfg.data.path == "/d"
    with pytest.raises(ValueError, match="unknown key.*lrr"):
        TrainConfig.load(tmp_path / "c.yaml", ["--optim.lrr=1"])
    with pytest.raises(ValueError, match="train.steps: expected int"):
        TrainConfig.load(tmp_path / "c.yaml", ["--train.steps=many"])
    with pytest.raises(ValueError, match="data.path"):
        TrainConfig.load(None, [])


@pytest.mark.parametrize("name", ["tiny-cpu.yaml", "xlstm-7b-pretrain.yaml", "sft-chat.yaml"])
def test_example_configs_are_valid(name):
    cfg = TrainConfig.load(CONFIGS / name)
    assert cfg.train.batch_size % cfg.train.micro_batch_size == 0 and "~" not in (cfg.model.init_from or "")


def test_register_adds_commands_that_accept_overrides():
    from fast_xlstm.training import cli

    parser = argparse.ArgumentParser(prog="fast-xlstm")  # as fast_xlstm.cli builds it
    sub = parser.add_subparsers(dest="command", required=True)
    cli.register(sub)
    args = parser.parse_args(["train", "--config", "c.yaml", "--optim.lr=1e-3", "--train.steps", "5"])
    assert args.func is cli.cmd_train and args.config == "c.yaml"
    assert args.overrides == ["--optim.lr=1e-3", "--train.steps", "5"]
    assert parser.parse_args(["export", "a", "b"]).func is cli.cmd_export
    assert parser.parse_args(["prepare-data", "--input", "x", "--tokenizer", "t", "--output", "o"]).func \
        is cli.cmd_prepare_data


def test_schedule_warmup_exponential_decay_cooldown():
    s = ScheduleSection(kind="exp", warmup_steps=10, final_lr_ratio=0.1, cooldown_steps=20)
    lrs = [lr_at(t, 100, 1.0, s) for t in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup
    assert lrs[10] == pytest.approx(1.0) and lrs[79] == pytest.approx(0.1)  # decayed to 0.1x
    assert lrs[80] == pytest.approx(0.1 * 20 / 21)  # then the cooldown
    assert lrs[45] == pytest.approx(0.1 ** (35 / 69))  # exponential in between
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and 0 < lrs[99] < 0.01  # cooldown towards 0
    cos = ScheduleSection(kind="cosine", warmup_steps=0, final_lr_ratio=0.1, cooldown_steps=0)
    assert lr_at(50, 101, 1.0, cos) == pytest.approx(0.55) and lr_at(100, 101, 1.0, cos) == pytest.approx(0.1)


def test_optimizer_implementation_follows_the_config_and_device():
    """auto: foreach on CPU (the golden runs), fused where every parameter is on CUDA; explicit choices win."""
    from fast_xlstm.training.config import OptimSection
    from fast_xlstm.training.optim import build_optimizer
    model = XLSTMForCausalLM.from_config(xlstm_tiny())
    auto = build_optimizer(model, OptimSection())
    assert auto.defaults["foreach"] and not auto.defaults["fused"]
    fused = build_optimizer(model, OptimSection(implementation="fused"))
    assert fused.defaults["fused"] and not fused.defaults["foreach"]
    if torch.cuda.is_available():
        assert build_optimizer(model.cuda(), OptimSection()).defaults["fused"]


def test_grad_clipping_scales_to_the_max_norm_and_skips_non_finite():
    """The global norm equals the fp64 norm over every gradient; clipping scales all of them by
    max_norm / norm (only when above it); a non-finite norm leaves them as they were."""
    from fast_xlstm.training.optim import grad_norm_and_clip
    torch.manual_seed(0)
    model = XLSTMForCausalLM.from_config(xlstm_tiny())
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 0.1
    before = [p.grad.clone() for p in model.parameters()]
    want = torch.cat([g.double().flatten() for g in before]).norm().item()
    norm = grad_norm_and_clip(model, 0.0)  # no clipping
    assert norm.item() == pytest.approx(want, rel=1e-5)
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))
    norm = grad_norm_and_clip(model, want * 2)  # below the bound: untouched
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))
    norm = grad_norm_and_clip(model, 0.5)
    after = torch.cat([p.grad.double().flatten() for p in model.parameters()]).norm().item()
    assert after == pytest.approx(0.5, rel=1e-4) and norm.item() == pytest.approx(want, rel=1e-5)
    first = next(model.parameters())
    first.grad[0].fill_(float("nan"))
    kept = [p.grad.clone() for p in model.parameters()]
    assert not torch.isfinite(grad_norm_and_clip(model, 0.5))
    assert all(torch.equal(p.grad.nan_to_num(), k.nan_to_num()) for p, k in zip(model.parameters(), kept))


def test_weight_decay_only_on_matrices_and_not_the_embedding():
    model = XLSTMForCausalLM.from_config(xlstm_tiny())
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.1)
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed | plain == set(names.values()) and not decayed & plain
    assert "lm_head.weight" in decayed and "backbone.blocks.0.mlstm_layer.fgate_preact.weight" in decayed
    assert "backbone.embeddings.weight" in plain and "backbone.blocks.0.mlstm_layer.fgate_preact.bias" in plain
    assert all(".norm" in n or "bias" in n or n.endswith("_norm.weight") or "embeddings" in n for n in plain)
    assert "backbone.embeddings.weight" in {names[id(p)] for g in param_groups(model, 0.1, decay_embedding=True)
                                            if g["weight_decay"] > 0 for p in g["params"]}


def test_sharded_init_equals_the_7b_recipe():
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    from fast_xlstm.training.parallelize import (
        build_model,
        destroy_distributed,
        init_distributed,
        init_model_,
    )

    with threads():
        env = init_distributed("cpu")
        try:
            model = build_model(xlstm_tiny(), env, dtype=torch.float32)
            init_model_(model, recipe="7b", seed=5)
            got = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            gate = model.backbone.blocks[0].mlstm_layer.fgate_preact.weight
            assert gate.dtype == torch.float32 and type(gate) is torch.nn.Parameter  # kept out of FSDP
        finally:
            destroy_distributed(env)
    want = XLSTMForCausalLM.from_config(xlstm_tiny(), init="7b", seed=5).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(want["backbone.blocks.1.mlstm_layer.igate_preact.bias"], torch.full((4,), -10.0))


@pytest.mark.parametrize("ac", [True, 1], ids=["every-block", "first-block"])
def test_activation_checkpointing_gives_the_same_steps(tiny_data, tmp_path, ac):
    base = golden_config(tiny_data, tmp_path / "a", **{"train.steps": 2, "train.eval_every": 0})
    ac = golden_config(tiny_data, tmp_path / "b", **{"train.steps": 2, "train.eval_every": 0,
                                                      "parallel.activation_checkpointing": ac})
    assert run_in_process(base) == 0 and run_in_process(ac) == 0
    a, b = step_records(tmp_path / "a"), step_records(tmp_path / "b")
    for s in (1, 2):
        assert math.isclose(a[s]["loss"], b[s]["loss"], abs_tol=1e-6)
        assert math.isclose(a[s]["grad_norm"], b[s]["grad_norm"], rel_tol=1e-5)


def test_checkpointed_block_count_and_parallel_validation(tmp_path):
    from fast_xlstm.training.parallelize import checkpointed_blocks

    assert [checkpointed_blocks(x, 4) for x in (True, False, 0, 3, 9)] == [4, 0, 0, 3, 4]
    with pytest.raises(ValueError, match="activation_checkpointing"):
        checkpointed_blocks(-1, 4)
    (tmp_path / "c.yaml").write_text("data: {path: /d}\n")
    cfg = TrainConfig.load(tmp_path / "c.yaml", ["--parallel.activation_checkpointing=6",
                                                 "--parallel.reduce_dtype=bfloat16"])
    assert cfg.parallel.activation_checkpointing == 6 and cfg.parallel.reduce_dtype == "bfloat16"
    assert TrainConfig.load(tmp_path / "c.yaml", ["--parallel.activation_checkpointing=true"]).parallel.activation_checkpointing is True
    with pytest.raises(ValueError, match="parallel.activation_checkpointing"):
        TrainConfig.load(tmp_path / "c.yaml", ["--parallel.activation_checkpointing=-2"])
    with pytest.raises(ValueError, match="parallel.reduce_dtype"):
        TrainConfig.load(tmp_path / "c.yaml", ["--parallel.reduce_dtype=fp8"])


def test_tensorboard_logging(tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    cfg = golden_config(tiny_data, tmp_path / "run", **{"train.steps": 2, "train.eval_every": 0,
                                                         "log.tensorboard": True})
    assert run_in_process(cfg) == 0
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_compiled_regions_give_the_same_steps(tiny_data, tmp_path):
    """parallel.compile compiles each block's pre-cell and post-cell regions and the head's loss
    (inductor on CPU here): the same losses and gradient norms as eager, to fp32 rounding."""
    from torch._dynamo.utils import counters  # imported here: collection must not load the compiler

    over = {"train.steps": 2, "train.eval_every": 0, "parallel.activation_checkpointing": True}
    base = golden_config(tiny_data, tmp_path / "a", **over)
    comp = golden_config(tiny_data, tmp_path / "b", **over, **{"parallel.compile": True})
    assert run_in_process(base) == 0
    captured = counters["stats"]["calls_captured"]
    assert run_in_process(comp) == 0
    assert counters["stats"]["calls_captured"] > captured  # the regions did go through dynamo
    a, b = step_records(tmp_path / "a"), step_records(tmp_path / "b")
    for s in (1, 2):
        assert math.isclose(a[s]["loss"], b[s]["loss"], rel_tol=1e-5)
        assert math.isclose(a[s]["grad_norm"], b[s]["grad_norm"], rel_tol=1e-4)
