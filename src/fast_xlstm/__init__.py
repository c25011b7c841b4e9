"""fast-xlstm: fast, exact inference, serving and training for xLSTM language models."""

from .config import PRESETS, XLSTMConfig, get_preset
from .generation.generate import GenerationOutput, generate, stream_generate, stream_text
from .generation.params import SamplingParams
from .llm import LLM
from .loading import load
from .model import XLSTMForCausalLM
from .tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["XLSTMConfig", "PRESETS", "get_preset", "XLSTMForCausalLM", "Tokenizer", "SamplingParams", "generate",
           "stream_generate", "stream_text", "GenerationOutput", "load", "LLM", "__version__"]
