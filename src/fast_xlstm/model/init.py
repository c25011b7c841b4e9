"""Weight initialisation: the xLSTM 7B training recipe, and a fully random one for tests."""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import FeedForward, MultiHeadLayerNorm, RMSNorm
from .mlstm import MLSTMLayer


@torch.no_grad()
def init_weights(model: nn.Module, *, recipe: str = "7b", seed: int | None = 0) -> None:
    """Initialises every parameter of an `XLSTMForCausalLM` in place (works after `to_empty`).

    recipe "7b": q, k, v, FFN up and embedding ~ N(0, 2/(5d)); out_proj and proj_down
    ~ N(0, (2/(num_blocks*sqrt(d)))^2); gate and o-gate weights 0; input-gate bias -10; forget-gate
    bias linspace(3, 6) over heads; norms 1.
    recipe "random": every weight, bias and norm weight random, gates spread so the cell's
    stabiliser, normaliser and both gates all matter: for parity tests.
    """
    if recipe not in ("7b", "random"):
        raise ValueError(f"unknown init recipe {recipe!r}; use '7b' or 'random'")
    device = next(model.parameters()).device
    # Draw on the parameters' device: a 7B model initialises in seconds on a GPU. Values depend on
    # the device's generator, so the same seed gives the same model per device type.
    gen = torch.Generator(device=device)
    gen.manual_seed(0 if seed is None else seed)
    cfg = model.config
    d, nb = cfg.embedding_dim, cfg.num_blocks
    small = math.sqrt(2 / (5 * d))
    wang = 2 / (nb * math.sqrt(d))

    def normal_(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32, device=t.device).mul_(std).add_(mean))

    normal_(model.backbone.embeddings.weight, small if recipe == "7b" else 1.0)
    if model.lm_head.weight is not model.backbone.embeddings.weight:
        normal_(model.lm_head.weight, small)
    for module in model.modules():
        if isinstance(module, (RMSNorm, MultiHeadLayerNorm)):
            if recipe == "7b":
                module.weight.fill_(1.0)
            else:
                normal_(module.weight, 0.2, 1.0)
        elif isinstance(module, MLSTMLayer):
            _init_mlstm(module, recipe, small, wang, normal_)
        elif isinstance(module, FeedForward):
            for lin in (module.proj_up_gate, module.proj_up):
                normal_(lin.weight, small)
            normal_(module.proj_down.weight, wang if recipe == "7b" else small)
            for lin in (module.proj_up_gate, module.proj_up, module.proj_down):
                if lin.bias is not None:
                    lin.bias.zero_() if recipe == "7b" else normal_(lin.bias, 0.1)


def _init_mlstm(layer: MLSTMLayer, recipe: str, small: float, wang: float, normal_) -> None:
    for lin in (layer.q, layer.k, layer.v):
        normal_(lin.weight, small)
    nh = layer.num_heads
    if recipe == "7b":
        layer.ogate_preact.weight.zero_()
        layer.igate_preact.weight.zero_()
        layer.fgate_preact.weight.zero_()
        layer.igate_preact.bias.fill_(-10.0)
        layer.fgate_preact.bias.copy_(torch.linspace(3.0, 6.0, nh))
        normal_(layer.out_proj.weight, wang)
    else:
        normal_(layer.ogate_preact.weight, small)
        # Gate pre-activations of a few units: input gates around 0, forget gates around 2, with
        # enough spread that some steps forget strongly and the max-stabiliser switches branches.
        normal_(layer.igate_preact.weight, 3 * small)
        normal_(layer.fgate_preact.weight, 3 * small)
        normal_(layer.igate_preact.bias, 1.0)
        normal_(layer.fgate_preact.bias, 1.0, 2.0)
        normal_(layer.out_proj.weight, small)
    for lin in (layer.q, layer.k, layer.v, layer.ogate_preact, layer.out_proj):
        if lin.bias is not None:
            lin.bias.zero_() if recipe == "7b" else normal_(lin.bias, 0.1)
