"""quantlab: a research sandbox for low-bit (block-wise quantized) optimizer states.

``import quantlab`` loads NumPy only; the Numba kernels load with ``quantlab.kernels`` and torch
with ``quantlab.optim`` / ``quantlab.nn``.
"""
from . import metrics, reference, tables
from .codes import FAMILIES, Code, dynamic_code, float_code, fp8_code, linear_code, make_code, quantile_code
from .reference import dequantize, dequantize_blockwise, quantize, quantize_blockwise

__version__ = "0.1.0"

__all__ = [
    "Code", "dynamic_code", "linear_code", "quantile_code", "fp8_code", "float_code", "make_code", "FAMILIES",
    "quantize", "dequantize", "quantize_blockwise", "dequantize_blockwise",
    "metrics", "reference", "tables", "__version__",
]
