"""The torch <-> kernel bridge: what the Numba kernels are handed for a parameter, its gradient and
its states, on the CPU or CUDA, whole or in float32 chunks, plain or sharded by FSDP2.

CPU float32 tensors are handed to the CPU kernels as zero-copy NumPy views; CUDA tensors go to the
CUDA kernels as they are (through ``__cuda_array_interface__``), launched on torch's current stream.
"""
from __future__ import annotations

import sys
from functools import partial
from types import SimpleNamespace

import numpy as np
import torch

from .. import kernels
from ..kernels import cpu
from ..kernels.lookup import search_tables, step_values
from ..kernels.scalar import INF_BITS
from ..reference import indices_per_byte

PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# float16/bfloat16 parameters are stepped in float32 chunks of this many elements (rounded to whole
# blocks): the extra memory of a step is bounded by a chunk, not by the parameter.
CHUNK_ELEMENTS = 1 << 18
STEP_KERNELS = ("step_32bit", "step_8bit", "step_rank1", "lamb_norms_32bit", "lamb_norms_8bit", "lamb_apply_32bit",
                "lamb_apply_8bit")


def check_param(param: torch.Tensor) -> None:
    """What the kernels take: dense, contiguous float32/float16/bfloat16 parameters on the CPU or
    a CUDA device, with a gradient of the same shape, dtype and device."""
    if param.grad.is_sparse:
        raise RuntimeError("quantlab optimizers do not support sparse gradients")
    if param.device.type not in ("cpu", "cuda"):
        raise NotImplementedError(f"quantlab optimizers run on the CPU and CUDA, got {param.device}")
    if param.dtype not in PARAM_DTYPES:
        raise NotImplementedError("quantlab optimizers take float32, float16 or bfloat16 parameters, "
                                  f"got {param.dtype}")
    if param.grad.shape != param.shape:  # torch checks `p.grad = g`, but not `p.grad.data = g`
        raise ValueError(f"a gradient must have its parameter's shape: parameter {tuple(param.shape)}, "
                         f"gradient {tuple(param.grad.shape)}")
    if (param.grad.dtype, param.grad.device) != (param.dtype, param.device):
        raise ValueError(f"a gradient must have its parameter's dtype and device: parameter {param.dtype} on "
                         f"{param.device}, gradient {param.grad.dtype} on {param.grad.device}")
    if not param.is_contiguous():
        raise ValueError("quantlab optimizers take contiguous parameters")


def is_dtensor(t) -> bool:
    """Whether t is a torch.distributed DTensor (FSDP2's parameters). Looked up in sys.modules so
    that quantlab does not import torch.distributed.tensor (over a second), which any DTensor has."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local_shard(p: torch.Tensor) -> torch.Tensor:
    """What a rank steps of a DTensor parameter: its local shard, a plain tensor sharing the
    parameter's memory, with the local shard of the gradient as ``.grad``. Any other tensor: itself."""
    if not is_dtensor(p):
        return p
    if any(placement.is_partial() for placement in p.placements):
        raise ValueError(f"a DTensor parameter must be sharded or replicated, got placements {p.placements}")
    if p.grad is not None and p.grad.placements != p.placements:
        raise ValueError(f"a DTensor gradient must be placed as its parameter ({p.placements}), "
                         f"got {p.grad.placements}: reduce it first")
    shard = p.detach().to_local()
    shard.grad = None if p.grad is None else p.grad.detach().to_local()
    return shard


def finite_on_every_rank(finite: bool, params) -> bool:
    """A rank sees only its shards' gradients, but all must skip (or raise on) the same steps: for
    DTensor parameters the verdict is all-reduced (min) over each device mesh, in parameter order."""
    meshes = dict.fromkeys(p.device_mesh for p in params if is_dtensor(p))
    for mesh in meshes:
        verdict = torch.tensor([int(finite)], device=mesh.device_type)
        for dim in range(mesh.ndim):
            torch.distributed.all_reduce(verdict, op=torch.distributed.ReduceOp.MIN, group=mesh.get_group(dim))
        finite = bool(verdict)
    return finite


def kernels_for(t: torch.Tensor):
    """The step kernels for a tensor's device: kernels.cpu, or kernels.cuda's launched on torch's
    current stream (numba.cuda is imported only for CUDA tensors)."""
    if t.device.type != "cuda":
        return cpu
    from ..kernels import cuda

    with torch.cuda.device(t.device):
        stream = kernels._cuda_stream()
    return SimpleNamespace(**{name: partial(getattr(cuda, name), stream=stream) for name in STEP_KERNELS})


def kernel_array(t: torch.Tensor):
    """What the kernels take for a contiguous tensor: its flat zero-copy NumPy view on the CPU, the
    flat tensor itself on CUDA (passed by __cuda_array_interface__)."""
    if not t.is_contiguous():
        raise ValueError("quantlab optimizer states and parameters must be contiguous")
    flat = t.detach().view(-1)
    return flat if flat.is_cuda else flat.numpy()


class StepBatch:
    """The fused steps of CPU float32 parameters with float32 or block-wise states, gathered during
    an optimizer step and launched together: one launch per (kind, states, codes, block size,
    hyperparameters), not one per parameter (a launch costs more than most of a model's tensors'
    steps; see kernels.cpu)."""

    def __init__(self):
        self._launches = {}

    @staticmethod
    def takes(p: torch.Tensor) -> bool:
        return p.device.type == "cpu" and p.dtype == torch.float32

    def add(self, kind: int, p: torch.Tensor, states: list, hyper: np.ndarray, block_size: int) -> None:
        """p (checked by check_param) and its states (checked by check_for_step), stepped at run()."""
        grad = p.grad if p.grad.is_contiguous() else p.grad.contiguous()
        row = [p.data_ptr(), grad.data_ptr()]
        if not states or torch.is_tensor(states[0]):
            key = (kind, len(states), None, None, hyper.tobytes())
            row += [s.data_ptr() for s in states] + [0] * (2 - len(states))
        else:
            key = (kind, len(states), block_size, tuple(s.code for s in states), hyper.tobytes())
            for s in states:
                row += [s.indices.data_ptr(), s.absmax.data_ptr()]
            row += [0, 0] * (2 - len(states))
        rows, sizes, alive = self._launches.setdefault(key, ([], [], [hyper]))
        rows.append(row)
        sizes.append(p.numel())
        alive.append((p, grad, states))  # the memory behind the addresses, until run()

    def run(self) -> None:
        for (kind, n_states, block_size, codes, _), (rows, sizes, alive) in self._launches.items():
            addresses, sizes, hyper = np.array(rows, np.int64), np.array(sizes, np.int64), alive[0]
            if codes is None:
                cpu.step_32bit_many(kind, n_states, addresses, sizes, hyper)
                continue
            per_code = [(step_values(c), search_tables(c)[0].args(), c.zero_index) for c in codes]
            per_byte = tuple(indices_per_byte(c.bits) for c in (codes[0], codes[-1]))
            cpu.step_8bit_many(kind, n_states, addresses, sizes, hyper, block_size, *per_code[0], *per_code[-1],
                               per_byte=per_byte)
        self._launches.clear()


def float32_chunks(p: torch.Tensor, align: int):
    """(start, end, param, grad): float32 kernel arrays over p's flat elements [start, end).

    A float32 parameter is one chunk of zero-copy views. A float16/bfloat16 one comes in chunks
    of whole ``align``-element blocks, converted to float32 temporaries; each parameter chunk is
    written back (rounded to nearest even, as torch's ``copy_``) when the caller asks for the next.
    """
    grad = p.grad if p.grad.is_contiguous() else p.grad.contiguous()
    if p.dtype == torch.float32:
        yield 0, p.numel(), kernel_array(p), kernel_array(grad)
        return
    flat_param, flat_grad = p.detach().view(-1), grad.detach().view(-1)
    chunk = max(align, CHUNK_ELEMENTS // align * align)
    for start in range(0, flat_param.numel(), chunk):
        end = min(start + chunk, flat_param.numel())
        param32 = flat_param[start:end].float()
        yield start, end, kernel_array(param32), kernel_array(flat_grad[start:end].float())
        flat_param[start:end].copy_(param32)


def gradients_finite(params) -> bool:
    """CPU float32 gradients: one integer-max pass over all of them in one launch (see
    kernels.cpu.largest_magnitude_bits); CUDA: torch.isfinite (one synchronisation each); CPU
    16-bit: torch.isfinite by chunks, so that the check's temporaries stay chunk-sized."""
    cpu_float32 = []
    for p in params:
        g = p.grad.detach()
        if g.is_cuda:
            finite = bool(torch.isfinite(g).all())
        elif g.dtype != torch.float32:
            flat = g.reshape(-1)
            finite = all(bool(torch.isfinite(flat[i:i + CHUNK_ELEMENTS]).all())
                         for i in range(0, flat.numel(), CHUNK_ELEMENTS))
        else:
            cpu_float32.append((g if g.is_contiguous() else g.contiguous()).view(-1).view(torch.int32).numpy())
            continue
        if not finite:
            return False
    return cpu.largest_magnitude_bits(*cpu_float32) < INF_BITS
