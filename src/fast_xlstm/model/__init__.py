"""The xLSTM model: layers, the mLSTM layer, the LM, initialisation and checkpoint I/O."""

from .xlstm import MLSTMBlock, ModelState, XLSTMForCausalLM

__all__ = ["XLSTMForCausalLM", "MLSTMBlock", "ModelState"]
