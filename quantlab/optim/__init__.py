"""torch optimizers with block-wise 8-bit (or 2- to 7-bit, or rank-1 normalised) states on quantlab's
fused kernels: Adam, AdamW, SGD
(momentum, dampening, Nesterov), Lion, RMSprop, Adagrad, LARS and LAMB, for float32, float16 and
bfloat16 parameters on the CPU or a CUDA device.
"""
import torch

from ..codes import Code
from .adam import Adam, AdamW
from .lamb import LAMB
from .lars import LARS
from .lion import Lion
from .optimizer import FOUR_BIT, BlockwiseOptimizer, set_options
from .rmsprop import Adagrad, RMSprop
from .sgd import SGD
from .state import QuantizedState, Rank1State, state_bytes

# a quantlab state dict holds Codes (in its param groups) and QuantizedStates: let torch's default
# weights-only unpickler rebuild them (each pickles as tensors and plain values only)
torch.serialization.add_safe_globals([Code, QuantizedState, Rank1State])

__all__ = ["Adam", "AdamW", "SGD", "Lion", "RMSprop", "Adagrad", "LARS", "LAMB", "BlockwiseOptimizer", "set_options",
           "QuantizedState", "Rank1State", "FOUR_BIT", "state_bytes"]
