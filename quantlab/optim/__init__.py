"""torch optimizers with block-wise 8-bit states on quantlab's fused kernels (CPU, float32 parameters).

This release has Adam, AdamW, SGD (momentum, dampening, Nesterov), Lion, RMSprop, Adagrad, LARS and
LAMB; the CUDA step kernels and 16-bit parameters are the rest of issue 4.
"""
from .adam import Adam, AdamW
from .lamb import LAMB
from .lars import LARS
from .lion import Lion
from .optimizer import BlockwiseOptimizer, set_options
from .rmsprop import Adagrad, RMSprop
from .sgd import SGD

__all__ = ["Adam", "AdamW", "SGD", "Lion", "RMSprop", "Adagrad", "LARS", "LAMB", "BlockwiseOptimizer", "set_options"]
