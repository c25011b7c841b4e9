"""Document resets through the model's packed-sequence input, and the training loss.

The model has no per-position reset argument, but `forward(input_ids [1, T], cu_seqlens=[N+1])`
runs N packed sequences each from the empty state. A [B, S] batch whose rows hold several documents
is therefore flattened into one row of B*S tokens cut at every row start and document start: each
document sees only its own tokens, exactly (the 7B run's f~ = -25 reset leaves exp(-25) of the old
state; this leaves none). The norms, projections and FFN are per position, so only the mLSTM cell
sees the cuts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX


def segment_offsets(doc_starts: torch.Tensor) -> torch.Tensor:
    """doc_starts bool [B, S] (True at every row start and document start) -> cu_seqlens int32 [N + 1]
    over the flattened B*S positions."""
    if doc_starts.ndim != 2:
        raise ValueError(f"doc_starts must have shape [B, S], got {tuple(doc_starts.shape)}")
    starts = doc_starts.clone()
    starts[:, 0] = True  # a row always starts from the empty state
    idx = torch.nonzero(starts.reshape(-1), as_tuple=False).reshape(-1)
    end = torch.tensor([starts.numel()], dtype=idx.dtype, device=idx.device)
    return torch.cat([idx, end]).to(torch.int32)


def packed_logits(model: nn.Module, input_ids: torch.Tensor, doc_starts: torch.Tensor) -> torch.Tensor:
    """input_ids [B, S], doc_starts [B, S] -> logits fp32 [B, S, V], no state crossing a document start.

    The offsets go to the model as a list of ints, so they stay in host memory even under FSDP (whose
    root moves tensor arguments to the GPU): every mLSTM layer (and its recompute and backward) reads
    them to plan its kernels, which from device memory would wait for the GPU each time."""
    B, S = input_ids.shape
    cu = segment_offsets(doc_starts.cpu()).tolist()
    logits, _ = model(input_ids.reshape(1, B * S), cu_seqlens=cu)
    return logits.reshape(B, S, -1)


def packed_loss_sum(model: nn.Module, input_ids: torch.Tensor, doc_starts: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
    """input_ids, labels [B, S], doc_starts [B, S] -> the summed fp32 cross-entropy over targets that are
    not IGNORE_INDEX, no state crossing a document start. Equal to `loss_sum(packed_logits(...), labels)`,
    but the model computes it from its last hidden states (`forward(labels=...)`), so a compiled model
    never stores the [B*S, V] fp32 logits or their gradient."""
    B, S = input_ids.shape
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    cu = segment_offsets(doc_starts.cpu()).tolist()  # a list: see packed_logits
    loss, _ = model(input_ids.reshape(1, B * S), cu_seqlens=cu, labels=labels.reshape(1, B * S))
    return loss


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy (fp32) over targets that are not IGNORE_INDEX. logits [..., V], labels [...].

    The caller divides by the global number of targets, so micro-batches and ranks with different
    numbers of targets (chat data) weigh every target the same.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
