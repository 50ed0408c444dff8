"""torch optimizers with block-wise 8-bit states on quantlab's fused kernels (CPU, float32 parameters).

This release has Adam and AdamW; SGD, RMSprop, Adagrad, Lion, LAMB, LARS, CUDA kernels and 16-bit
parameters are the rest of issue 4.
"""
from .adam import Adam, AdamW
from .optimizer import set_options

__all__ = ["Adam", "AdamW", "set_options"]
