"""Offline batch inference shaped like vLLM's: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .engine import LLMEngine
from .generation.params import SamplingParams
from .generation.tracker import GenerationOutput
from .loading import load
from .model.weights import parse_dtype


class LLM:
    """A model, its tokenizer and an engine with a state-slot pool and (on CUDA) CUDA-graph decode.

    Args:
        model: checkpoint directory or preset name (None: the default model).
        dtype: weight dtype (default bf16 on CUDA, fp32 on CPU).
        state_dtype: recurrent state dtype, "float32" (default, exact) or "bfloat16" (half the state
            traffic; the paper's speed runs used it).
        device: "cuda", "cpu", ... (default: cuda if available).
        max_num_seqs: state slots, i.e. the most sequences decoded together.
        max_num_batched_tokens: prompt tokens (plus one per decoding sequence) per engine step;
            bounds prefill activation memory for prompts of any length.
        use_cuda_graph: capture the decode step per batch-size bucket (default: on CUDA).
        async_scheduling: queue each decode step before reading the previous step's tokens, so the
            host's per-token work overlaps the device (default on, as in `fast-xlstm serve`; the same
            tokens either way). In `fast-xlstm bench` runs on H100s, a sync after every step gave the 7B
            158.5 / 5,007 decode tok/s at batch 1 / 64, and reading one step late 165.0 / 5,192
            (two runs: `bench/results/h100-7b-c9f729e`).
        engine_options: passed to `LLMEngine` (prefix cache and session settings).
    """

    def __init__(self, model: str | Path | None = None, *, dtype: str | torch.dtype | None = None,
                 state_dtype: str | torch.dtype = "float32", device: str | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 16384, use_cuda_graph: bool | None = None, fuse: bool = True,
                 seed: int = 0, async_scheduling: bool = True, **engine_options):
        loaded = load(model, device=device, dtype=dtype, fuse=fuse, seed=seed)
        self.model, self.tokenizer, self.source = loaded.model, loaded.tokenizer, loaded.source
        sd = parse_dtype(state_dtype)
        if sd not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype must be float32 or bfloat16, got {state_dtype!r}")
        self.engine = LLMEngine(self.model, self.tokenizer, max_num_seqs=max_num_seqs,
                                max_num_batched_tokens=max_num_batched_tokens, state_dtype=sd,
                                use_cuda_graph=use_cuda_graph, async_scheduling=async_scheduling, **engine_options)

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool = True) -> list[GenerationOutput]:
        """Generates for every prompt (text or token ids); outputs come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)
        if isinstance(sampling_params, SamplingParams) or sampling_params is None:
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        engine = self.engine
        ids = [engine.add_request(p if isinstance(p, str) else list(p), sp) for p, sp in zip(prompts, params)]
        results: dict[str, GenerationOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="req", dynamic_ncols=True)
        before = dict(engine.stats)
        t0 = time.perf_counter()
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out.output
                        if bar is not None:
                            bar.update(1)
                if bar is not None:
                    s = engine.stats
                    pt, gt = s["prefill_time"] - before["prefill_time"], s["decode_time"] - before["decode_time"]
                    bar.set_postfix_str(
                        f"prefill {(s['prompt_tokens'] - before['prompt_tokens']) / max(pt, 1e-9):,.0f} tok/s, "
                        f"decode {(s['generation_tokens'] - before['generation_tokens']) / max(pt + gt, 1e-9):,.0f}"
                        f" tok/s", refresh=False)
        except BaseException:
            for rid in ids:
                engine.abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        self.last_run_seconds = time.perf_counter() - t0
        return [results[rid] for rid in ids]
