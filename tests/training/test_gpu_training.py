"""Packed training on a CUDA device (skipped without one): the FSDP-wrapped model's forward and backward
wait for the GPU only where they must."""

from __future__ import annotations

import warnings

import pytest
import torch

from fast_xlstm.config import xlstm_tiny

from modelutil import random_ids

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_packed_step_syncs_once_under_fsdp():
    """One host sync per forward + backward: the token-id range check. FSDP's root moves tensor
    arguments to the GPU, so offsets passed as a tensor came back to the host in every mLSTM layer,
    forward and backward (2 x blocks syncs, 14 ms of idle GPU per 8-block step of the 7B shape)."""
    from fast_xlstm.training.packing import packed_loss_sum
    from fast_xlstm.training.parallelize import build_model, destroy_distributed, init_distributed, init_model_

    env = init_distributed("cuda")
    try:
        cfg = xlstm_tiny()
        model = build_model(cfg, env, dtype=torch.bfloat16)
        init_model_(model, recipe="7b", seed=0)
        ids = random_ids((2, 256), vocab=cfg.vocab_size, seed=1).cuda()
        starts = torch.zeros(2, 256, dtype=torch.bool)
        starts[:, ::64] = True
        labels = torch.roll(ids, -1, dims=1)
        packed_loss_sum(model, ids, starts, labels).backward()  # warm-up: first-call allocations
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                loss = packed_loss_sum(model, ids, starts, labels)
                loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
        assert len(syncs) <= 1, [f"{w.filename}:{w.lineno}: {str(w.message)[:120]}" for w in syncs]
        assert torch.isfinite(loss)
    finally:
        destroy_distributed(env)
