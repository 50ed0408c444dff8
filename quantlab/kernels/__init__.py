"""Fast block-wise quantization: Numba kernels for the CPU and CUDA, bit-identical to the reference.

``quantize_blockwise`` / ``dequantize_blockwise`` take the reference's arguments and accept NumPy
arrays, CPU torch tensors (zero-copy) and CUDA torch tensors (zero-copy through
``__cuda_array_interface__``, launched on torch's current stream). Results live where the input
lives and have its array type. The backend follows the input; ``backend=`` or the environment
variable ``QUANTLAB_BACKEND`` ("cpu", "cuda" or "reference") forces one, copying data across if
needed.

Non-finite input is detected from the block absmax the kernel computes anyway (its bit pattern is
Inf or NaN), so checking costs nothing on the CPU; on a GPU the check is one device-to-host read,
which ``check_finite=False`` skips (a bad block then has a non-finite absmax).
"""
from __future__ import annotations

import os

import numpy as np

from .. import reference
from ..codes import Code
from .lookup import SearchTable, search_tables

BACKENDS = ("cpu", "cuda", "reference")
_HALF_DTYPES = ("float16", "bfloat16", "float64")


def _is_torch(a) -> bool:
    return type(a).__module__.split(".")[0] == "torch"


def _resolve_backend(x, backend) -> str:
    backend = backend or os.environ.get("QUANTLAB_BACKEND") or None
    if backend is None:
        return "cuda" if _is_torch(x) and x.is_cuda else "cpu"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _torch_to_float32(x):
    """A contiguous float32 torch tensor on x's device (16-bit and float64 input converted)."""
    import torch

    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"x must be one of {', '.join(reference.ACCEPTED_FLOAT_DTYPES)}, got {x.dtype}")
    return x.detach().to(torch.float32).contiguous()


def _raise_if_nonfinite(absmax: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(absmax))
    if bad.size:
        raise ValueError(f"x contains NaN or Inf (first in block {int(bad[0])}; after conversion to float32)")


# --- CPU ------------------------------------------------------------------------------------------

def _check_out(array, dtype, size: int, what: str):
    """A caller-supplied output buffer: right dtype and size, contiguous; returned flat."""
    if array.dtype != dtype or array.size != size or not array.flags.c_contiguous:
        raise ValueError(f"out {what} must be a contiguous {np.dtype(dtype).name} array of {size} elements, "
                         f"got {array.dtype} with shape {array.shape}")
    return array.reshape(-1)


def _quantize_cpu(x32: np.ndarray, code: Code, block_size: int, noise, out=None):
    from . import cpu

    nearest, floor = search_tables(code)
    flat = x32.reshape(-1)
    nb = reference.num_blocks(flat.size, block_size)
    if out is None:
        q, absmax = np.empty(flat.size, np.uint8), np.empty(nb, np.float32)
    else:
        q, absmax = _check_out(out[0], np.uint8, flat.size, "q"), _check_out(out[1], np.float32, nb, "absmax")
    if noise is None:
        cpu.quantize_blockwise(flat, flat.view(np.int32), block_size, nearest.args(), code.zero_index, q, absmax)
    else:
        cpu.quantize_blockwise_stochastic(flat, flat.view(np.int32), noise.reshape(-1), block_size,
                                          floor.args(), code.values, code.zero_index, q, absmax)
    _raise_if_nonfinite(absmax)
    return q.reshape(x32.shape), absmax


def _dequantize_cpu(q: np.ndarray, absmax: np.ndarray, code: Code, block_size: int, out=None) -> np.ndarray:
    from . import cpu

    out = np.empty(q.size, np.float32) if out is None else _check_out(out, np.float32, q.size, "")
    cpu.dequantize_blockwise(q.reshape(-1), absmax, code.values, block_size, out)
    return out.reshape(q.shape)


# --- CUDA -----------------------------------------------------------------------------------------

def _cuda_stream():
    """torch's current stream when torch has CUDA, so launches order with torch's work."""
    from numba import cuda

    try:
        import torch

        if torch.cuda.is_available():
            return cuda.external_stream(torch.cuda.current_stream().cuda_stream)
    except ImportError:
        pass
    return 0  # Numba's default stream


def _quantize_cuda(x, code: Code, block_size: int, noise, q, absmax):
    """x, noise, q, absmax: device arrays (numba); writes q and absmax."""
    from . import cuda as kernels

    nearest, floor = search_tables(code)
    stream = _cuda_stream()
    threads = kernels.threads_for(block_size)
    grid = absmax.size
    if noise is None:
        table = _to_device(nearest, stream)
        kernels.quantize_blockwise[grid, threads, stream](
            x, x.view(np.int32), block_size, *table, code.zero_index, q, absmax)
    else:
        table = _to_device(floor, stream)
        values = kernels.constant_on_device(code.values, stream)
        kernels.quantize_blockwise_stochastic[grid, threads, stream](
            x, x.view(np.int32), noise, block_size, *table, values, code.zero_index, q, absmax)


def _to_device(t: SearchTable, stream):
    from . import cuda as kernels

    return kernels.constant_on_device(t.table, stream), kernels.constant_on_device(t.points, stream), t.shift, t.bias


def _dequantize_cuda(q, absmax, code: Code, block_size: int, out):
    from . import cuda as kernels

    stream = _cuda_stream()
    values = kernels.constant_on_device(code.values, stream, pad_to=256)
    kernels.dequantize_blockwise[absmax.size, kernels.threads_for(block_size), stream](
        q, absmax, values, block_size, out)


# --- public API -----------------------------------------------------------------------------------

def quantize_blockwise(x, code: Code, block_size: int = 256, noise=None, backend: str | None = None,
                       check_finite: bool = True, out=None):
    """Block-wise quantization, bit-identical to ``quantlab.reference.quantize_blockwise``.

    Returns ``(q, absmax)`` of x's array type and device: uint8 indices shaped like ``x`` and one
    float32 absmax per block. ``noise`` (float32 uniform in [0, 1), shaped like x) selects
    stochastic rounding. ``out=(q, absmax)`` writes into existing contiguous buffers of x's type
    and device instead of allocating (CPU and CUDA backends; they may be written to before a
    non-finite input raises).
    """
    code = reference.check_code(code)
    block_size = reference.check_block_size(block_size)
    backend = _resolve_backend(x, backend)
    if _is_torch(x):
        return _quantize_torch(x, code, block_size, noise, backend, check_finite, out)
    x32 = reference.as_float32(x, check_finite=False)
    if x32.size == 0:
        raise ValueError("cannot quantize an empty array")
    if noise is not None:
        noise = reference.check_noise(noise, x32.shape)
    if backend == "cpu":
        return _quantize_cpu(x32, code, block_size, noise, out)
    if out is not None:
        raise ValueError(f"out= is supported by the cpu backend for host arrays, not by {backend!r}")
    if backend == "reference":
        return reference.quantize_blockwise(x32, code, block_size, noise)
    from numba import cuda

    q = cuda.device_array(x32.size, np.uint8)
    absmax = cuda.device_array(reference.num_blocks(x32.size, block_size), np.float32)
    _quantize_cuda(cuda.to_device(x32.reshape(-1)), code, block_size,
                   None if noise is None else cuda.to_device(noise.reshape(-1)), q, absmax)
    absmax = absmax.copy_to_host()
    _raise_if_nonfinite(absmax)
    return q.copy_to_host().reshape(x32.shape), absmax


def dequantize_blockwise(q, absmax, code: Code, block_size: int = 256, backend: str | None = None, out=None):
    """``code.values[q] * absmax[block]`` in float32, shaped like ``q``; bit-identical to the reference.

    ``out``: an existing contiguous float32 buffer of q's size, type and device to write into.
    """
    code = reference.check_code(code)
    block_size = reference.check_block_size(block_size)
    backend = _resolve_backend(q, backend)
    if _is_torch(q):
        return _dequantize_torch(q, absmax, code, block_size, backend, out)
    q = np.ascontiguousarray(reference.check_indices(q, code))
    absmax = np.ascontiguousarray(reference.check_absmax(absmax, q.size, block_size))
    if backend == "cpu":
        return _dequantize_cpu(q, absmax, code, block_size, out)
    if out is not None:
        raise ValueError(f"out= is supported by the cpu backend for host arrays, not by {backend!r}")
    if backend == "reference":
        return reference.dequantize_blockwise(q, absmax, code, block_size)
    from numba import cuda

    out = cuda.device_array(q.size, np.float32)
    _dequantize_cuda(cuda.to_device(q.reshape(-1)), cuda.to_device(absmax), code, block_size, out)
    return out.copy_to_host().reshape(q.shape)


# --- torch tensors --------------------------------------------------------------------------------

def _quantize_torch(x, code, block_size, noise, backend, check_finite, out):
    import torch

    x32 = _torch_to_float32(x)
    if x32.numel() == 0:
        raise ValueError("cannot quantize an empty array")
    if noise is not None:
        if not _is_torch(noise) or noise.dtype != torch.float32 or noise.shape != x.shape:
            raise ValueError("noise must be a float32 tensor shaped like x")
        noise = noise.detach().to(x.device).contiguous()
    if out is not None and (not all(_is_torch(o) and o.device == x.device for o in out)):
        raise ValueError("out must be a pair of tensors on x's device")
    if backend != "cuda" or not x.is_cuda:
        if out is not None and x.is_cuda:
            raise ValueError("out= with CUDA tensors needs the cuda backend")
        q, absmax = quantize_blockwise(x32.cpu().numpy(), code, block_size,
                                       None if noise is None else noise.cpu().numpy(), backend,
                                       out=None if out is None else (out[0].numpy(), out[1].numpy()))
        return (out if out is not None else
                (torch.from_numpy(q).to(x.device), torch.from_numpy(absmax).to(x.device)))
    from numba import cuda

    nb = reference.num_blocks(x.numel(), block_size)
    if out is None:
        q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
        absmax = torch.empty(nb, dtype=torch.float32, device=x.device)
    else:
        q, absmax = out
        if (q.dtype != torch.uint8 or q.numel() != x.numel() or not q.is_contiguous() or absmax.dtype != torch.float32
                or absmax.numel() != nb or not absmax.is_contiguous()):
            raise ValueError(f"out must be contiguous uint8 ({x.numel()}) and float32 ({nb}) tensors")
    _quantize_cuda(cuda.as_cuda_array(x32.reshape(-1)), code, block_size,
                   None if noise is None else cuda.as_cuda_array(noise.reshape(-1)),
                   cuda.as_cuda_array(q.reshape(-1)), cuda.as_cuda_array(absmax))
    if check_finite and not bool(torch.isfinite(absmax).all()):
        _raise_if_nonfinite(absmax.cpu().numpy())
    return q, absmax


def _dequantize_torch(q, absmax, code, block_size, backend, out):
    import torch

    if not _is_torch(absmax) or absmax.device != q.device:
        raise TypeError("q and absmax must be torch tensors on the same device")
    if out is not None and (not _is_torch(out) or out.device != q.device):
        raise ValueError("out must be a tensor on q's device")
    if backend != "cuda" or not q.is_cuda:
        if out is not None and q.is_cuda:
            raise ValueError("out= with CUDA tensors needs the cuda backend")
        values = dequantize_blockwise(q.detach().cpu().numpy(), absmax.detach().cpu().numpy(), code,
                                      block_size, backend, out=None if out is None else out.numpy())
        return out if out is not None else torch.from_numpy(values).to(q.device)
    from numba import cuda

    if q.dtype != torch.uint8 or absmax.dtype != torch.float32 or absmax.dim() != 1:
        raise TypeError("q must be uint8 and absmax a 1-D float32 tensor")
    if absmax.numel() != reference.num_blocks(q.numel(), block_size):
        raise ValueError(f"absmax has {absmax.numel()} entries; {q.numel()} elements in blocks of "
                         f"{block_size} need {reference.num_blocks(q.numel(), block_size)}")
    q, absmax = q.contiguous(), absmax.contiguous()
    if out is None:
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    elif out.dtype != torch.float32 or out.numel() != q.numel() or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of {q.numel()} elements")
    _dequantize_cuda(cuda.as_cuda_array(q.reshape(-1)), cuda.as_cuda_array(absmax), code, block_size,
                     cuda.as_cuda_array(out.reshape(-1)))
    return out


# --- states below 8 bits: packed indices, rank-1 normalisation ------------------------------------
# NumPy arrays, CPU torch tensors (zero-copy) and CUDA torch tensors; results have the input's type
# and device. These serve conversions and inspection: the optimizer steps read and write packed and
# rank-1 states inside their fused kernels.

def _kernel_side(a):
    """(flat contiguous array the kernels take, the kernel module, extra keyword arguments)."""
    if _is_torch(a):
        flat = a.detach().contiguous().view(-1)
        if flat.is_cuda:
            from . import cuda

            return flat, cuda, {"stream": _cuda_stream()}
        a = flat.numpy()
    from . import cpu

    return np.ascontiguousarray(a).reshape(-1), cpu, {}


def _new(like, size: int, dtype):
    """An empty flat array of ``like``'s type and device, and its kernel-side view."""
    if _is_torch(like):
        import torch

        out = torch.empty(size, dtype=getattr(torch, np.dtype(dtype).name), device=like.device)
        return out, (out if out.is_cuda else out.numpy())
    out = np.empty(size, dtype)
    return out, out


def pack_indices(q, bits: int):
    """``reference.pack_indices``: flat uint8 of ``packed_size(q.size, bits)`` bytes."""
    flat, module, extra = _kernel_side(q)
    if str(flat.dtype) not in ("uint8", "torch.uint8"):
        raise TypeError(f"q must be uint8 code indices, got {flat.dtype}")
    out, kernel_out = _new(q, reference.packed_size(flat.shape[0], bits), np.uint8)
    module.pack_indices(flat, reference.indices_per_byte(bits), kernel_out, **extra)
    return out


def unpack_indices(packed, bits: int, n: int):
    """``reference.unpack_indices``: the n indices (flat uint8) that pack_indices packed."""
    flat, module, extra = _kernel_side(packed)
    if flat.shape[0] != reference.packed_size(n, bits):
        raise ValueError(f"{n} indices of {bits} bits fill {reference.packed_size(n, bits)} bytes, got {flat.shape[0]}")
    out, kernel_out = _new(packed, n, np.uint8)
    module.unpack_indices(flat, reference.indices_per_byte(bits), kernel_out, **extra)
    return out


def quantize_rank1(x, code: Code, packed: bool = False):
    """``reference.quantize_rank1`` of x (2 or more dimensions): (indices, row_max, col_max), the
    indices shaped like x, or flat and packed (``pack_indices``) when ``packed``."""
    code = reference.check_code(code)
    rows, cols = reference.rank1_shape(x.shape)
    x32 = _torch_to_float32(x) if _is_torch(x) else reference.as_float32(x, check_finite=False)
    flat, module, extra = _kernel_side(x32)
    per_byte = reference.indices_per_byte(code.bits) if packed else 1
    (q, q_k), (row_max, row_k), (col_max, col_k) = (_new(x32, size, dtype) for size, dtype in (
        (-(-flat.shape[0] // per_byte), np.uint8), (rows, np.float32), (cols, np.float32)))
    bits = flat.view(np.int32) if isinstance(flat, np.ndarray) else flat.view(_torch_dtype("int32"))
    module.quantize_rank1(flat, bits, search_tables(code)[0].args(), code.zero_index, per_byte, q_k, row_k, col_k,
                          **extra)
    _raise_if_nonfinite(row_max.cpu().numpy() if _is_torch(row_max) else row_max)
    return (q if packed else q.reshape(x.shape)), row_max, col_max


def dequantize_rank1(q, row_max, col_max, code: Code, shape, packed: bool = False):
    """``reference.dequantize_rank1``: float32 of ``shape`` from the indices (packed when ``packed``)."""
    from .lookup import step_values

    code = reference.check_code(code)
    rows, cols = reference.rank1_shape(shape)
    flat, module, extra = _kernel_side(q)
    (row_k, _, _), (col_k, _, _) = _kernel_side(row_max), _kernel_side(col_max)
    if (row_k.shape[0], col_k.shape[0]) != (rows, cols):
        raise ValueError(f"shape {tuple(shape)} needs {rows} row and {cols} column maxima, got "
                         f"{row_k.shape[0]} and {col_k.shape[0]}")
    out, out_k = _new(q, rows * cols, np.float32)
    module.dequantize_rank1(flat, row_k, col_k, step_values(code), reference.indices_per_byte(code.bits) if packed
                            else 1, out_k, **extra)
    return out.reshape(tuple(shape))


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)
