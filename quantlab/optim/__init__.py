"""torch optimizers with block-wise 8-bit states on quantlab's fused kernels: Adam, AdamW, SGD
(momentum, dampening, Nesterov), Lion, RMSprop, Adagrad, LARS and LAMB, for float32, float16 and
bfloat16 parameters on the CPU or a CUDA device.
"""
from .adam import Adam, AdamW
from .lamb import LAMB
from .lars import LARS
from .lion import Lion
from .optimizer import BlockwiseOptimizer, codes_as_data, codes_as_objects, set_options
from .rmsprop import Adagrad, RMSprop
from .sgd import SGD

__all__ = ["Adam", "AdamW", "SGD", "Lion", "RMSprop", "Adagrad", "LARS", "LAMB", "BlockwiseOptimizer", "set_options",
           "codes_as_data", "codes_as_objects"]
