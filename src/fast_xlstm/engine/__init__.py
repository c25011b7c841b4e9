"""The engine: a pure-Python scheduler, a runner that owns tensors and CUDA graphs, and a loop."""

from .engine import LLMEngine, RequestOutput

__all__ = ["LLMEngine", "RequestOutput"]
