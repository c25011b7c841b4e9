"""Parity with the reference implementations, run for real on tiny random models.

- the `xlstm` package's `xlstm_large` with its native torch kernels (reads the `xlstm` layout);
- transformers' `xLSTMForCausalLM` running its *own* code (reads the hub layout). transformers
  swaps in the `xlstm` package's blocks when that package is importable, so the module is
  reloaded with that switch off and the test asserts it really runs transformers' code.
Tolerance: fp32, max |diff| / max |reference| <= 1e-4 for logits, states and next-step logits.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from fast_xlstm.config import xlstm_tiny
from fast_xlstm.model import XLSTMForCausalLM

from modelutil import random_ids, rel_err, tiny_model

TOL = 1e-4
CONFIGS = {"tiny-2-blocks": xlstm_tiny(), "tiny-12-blocks": xlstm_tiny().replace(num_blocks=12, num_heads=2)}


def _xlstm_large(path):
    pytest.importorskip("xlstm")
    from xlstm.xlstm_large.from_pretrained import load_from_pretrained

    ref = load_from_pretrained(path, return_last_states=True, chunkwise_kernel_name="chunkwise--native_autograd",
                               sequence_kernel_name="native_sequence__native", step_kernel_name="native",
                               backend_mode="inference", chunk_size=16)
    return ref.eval()


def _transformers_own_xlstm():
    """transformers' xlstm modeling module with its own (non-`xlstm`-package) implementation."""
    pytest.importorskip("transformers")
    import transformers.utils as tutils
    from transformers.models.xlstm import configuration_xlstm, modeling_xlstm

    original = tutils.is_xlstm_available
    tutils.is_xlstm_available = lambda: False
    try:
        importlib.reload(configuration_xlstm)
        mod = importlib.reload(modeling_xlstm)
    finally:
        tutils.is_xlstm_available = original
    assert mod.external_xlstm is False, "transformers would run the xlstm package's code"
    assert not any(c.__module__.startswith("xlstm.") for c in mod.xLSTMBlock.__mro__)
    return mod


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_xlstm_large_reference_parity(tmp_path, name):
    ours = tiny_model(CONFIGS[name], seed=11)
    ours.save_pretrained(tmp_path, layout="xlstm")
    loaded = XLSTMForCausalLM.from_pretrained(tmp_path)
    ref = _xlstm_large(tmp_path)
    assert "xlstm.xlstm_large" in type(ref).__module__

    ids = random_ids((2, 45), vocab=CONFIGS[name].vocab_size, seed=12)
    ref_logits, ref_state = ref(ids)
    logits, state = loaded(ids)
    assert rel_err(logits, ref_logits) < TOL
    for b in range(CONFIGS[name].num_blocks):
        for ours_t, ref_t in zip(state[b], ref_state[b]):
            assert rel_err(ours_t, ref_t) < TOL

    # Hand the state over and take one more step on each side.
    nxt = random_ids((2, 1), vocab=CONFIGS[name].vocab_size, seed=13)
    ref_next, _ = ref(nxt, {b: tuple(t.clone() for t in ref_state[b]) for b in ref_state})
    our_next, _ = loaded.step(nxt[:, 0], state)
    assert rel_err(our_next, ref_next[:, 0]) < TOL


@torch.no_grad()
def test_xlstm_large_fused_layout_loads(tmp_path):
    """A fused-weight `xlstm` checkpoint (qkv_opreact, ifgate_preact, proj_up_gate_z) past 10 blocks."""
    from safetensors.torch import save_file

    cfg = CONFIGS["tiny-12-blocks"]
    ours = tiny_model(cfg, seed=21)
    ours.save_pretrained(tmp_path, layout="xlstm")  # writes config.yaml + single weights
    fused = tiny_model(cfg, seed=21).fuse_projections()
    sd = {k: v.contiguous() for k, v in fused.state_dict().items()}
    sd["embedding.weight"] = sd.pop("backbone.embeddings.weight")
    save_file(sd, str(tmp_path / "model.safetensors"))
    loaded = XLSTMForCausalLM.from_pretrained(tmp_path)
    ids = random_ids((1, 20), seed=22)
    assert rel_err(loaded(ids)[0], ours(ids)[0]) < 1e-6


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_transformers_reference_parity(tmp_path, name):
    mod = _transformers_own_xlstm()
    ours = tiny_model(CONFIGS[name], seed=31)
    ours.save_pretrained(tmp_path, max_shard_size="200KB")  # several shards + index
    assert (tmp_path / "model.safetensors.index.json").exists()
    ref = mod.xLSTMForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    loaded = XLSTMForCausalLM.from_pretrained(tmp_path)

    ids = random_ids((2, 45), vocab=CONFIGS[name].vocab_size, seed=32)
    out = ref(ids, use_cache=True)
    # transformers renamed `cache_params` to `cache` (5.2x); accept both.
    cache_name = "cache" if "cache" in inspect.signature(ref.forward).parameters else "cache_params"
    cache = getattr(out, cache_name)
    logits, state = loaded(ids)
    assert rel_err(logits, out.logits) < TOL
    for b in range(CONFIGS[name].num_blocks):
        for ours_t, ref_t in zip(state[b], cache.rnn_state[b]):
            assert rel_err(ours_t, ref_t) < TOL

    nxt = random_ids((2, 1), vocab=CONFIGS[name].vocab_size, seed=33)
    ref_next = ref(nxt, **{cache_name: cache}, use_cache=True).logits
    our_next, _ = loaded.step(nxt[:, 0], state)
    assert rel_err(our_next, ref_next[:, 0]) < TOL
