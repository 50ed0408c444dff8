"""How a quantlab optimizer keeps one state of one parameter.

A state is a float32 tensor shaped like its parameter (32-bit state), or a :class:`QuantizedState`:
the paper's block-wise 8-bit format, ``code.values[indices] * absmax[block]``. In
``optimizer.state[param]`` each state sits under torch's name for it (``exp_avg``,
``momentum_buffer``, ...) beside the step count ``step``, whichever format it has.

Both are saved as they are. A QuantizedState pickles as its two tensors, its Code (plain floats,
a name and a bit count) and its block size; ``quantlab.optim`` registers both classes with
``torch.serialization.add_safe_globals``, so ``torch.load(weights_only=True)`` (torch's default)
reads a quantlab state dict, and ZeroRedundancyOptimizer, which moves states between ranks
without calling the optimizer, needs nothing converted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels, reference
from ..codes import Code
from ..kernels.lookup import search_tables, step_values
from .bridge import kernel_array


@dataclass(frozen=True, eq=False)
class QuantizedState:
    """One state quantized block-wise: element i is ``code.values[indices[i]] * absmax[i // block_size]``
    (i over the flattened tensor). The kernels update ``indices`` and ``absmax`` in place."""

    indices: torch.Tensor  # uint8, shaped like the parameter
    absmax: torch.Tensor  # float32 [number of blocks]
    code: Code
    block_size: int

    def __post_init__(self):
        if not isinstance(self.code, Code):
            raise TypeError(f"a quantized state's code must be a quantlab Code, got {type(self.code).__name__}")
        reference.check_block_size(self.block_size)
        if not torch.is_tensor(self.indices) or self.indices.dtype != torch.uint8:
            raise TypeError(f"a quantized state's indices must be a uint8 tensor, got {_describe(self.indices)}")
        if not torch.is_tensor(self.absmax) or self.absmax.dtype != torch.float32 or self.absmax.dim() != 1:
            raise TypeError(f"a quantized state's absmax must be a 1-D float32 tensor, got {_describe(self.absmax)}")
        blocks = reference.num_blocks(self.indices.numel(), self.block_size)
        if self.absmax.numel() != blocks:
            raise ValueError(f"a quantized state of {self.indices.numel()} elements in blocks of {self.block_size} "
                             f"needs {blocks} absmax values, got {self.absmax.numel()}")
        if self.indices.device != self.absmax.device:
            raise ValueError(f"a quantized state's indices ({self.indices.device}) and absmax ({self.absmax.device}) "
                             f"must be on one device")

    @classmethod
    def quantize(cls, x: torch.Tensor, code: Code, block_size: int) -> QuantizedState:
        """x (float32, any shape) quantized with nearest rounding."""
        indices, absmax = kernels.quantize_blockwise(x.detach().contiguous().view(-1), code, block_size)
        return cls(indices.view(x.shape), absmax, code, block_size)

    def dequantize(self) -> torch.Tensor:
        """The state's float32 values, shaped like ``indices``."""
        values = kernels.dequantize_blockwise(self.indices.reshape(-1), self.absmax, self.code, self.block_size)
        return values.view(self.indices.shape)

    def to(self, device) -> QuantizedState:
        if self.indices.device == torch.device(device):
            return self
        return QuantizedState(self.indices.to(device), self.absmax.to(device), self.code, self.block_size)

    @property
    def shape(self) -> torch.Size:
        return self.indices.shape

    @property
    def nbytes(self) -> int:
        return self.indices.numel() + 4 * self.absmax.numel()

    def kernel_args(self, start: int, end: int) -> tuple:
        """What the 8-bit kernels take for elements [start, end) (whole blocks): indices, absmax,
        code values, search table, zero index."""
        blocks = slice(start // self.block_size, reference.num_blocks(end, self.block_size))
        return (kernel_array(self.indices)[start:end], kernel_array(self.absmax)[blocks], step_values(self.code),
                search_tables(self.code)[0].args(), self.code.zero_index)

    def __reduce__(self):
        return QuantizedState, (self.indices, self.absmax, self.code, self.block_size)

    def __repr__(self) -> str:
        return (f"QuantizedState({self.code.name}, blocks of {self.block_size}, shape {tuple(self.shape)}, "
                f"{self.indices.device})")


def check_loaded_state(saved, param: torch.Tensor, names: tuple[str, ...], where: str) -> dict:
    """A saved state of ``param`` checked and put in the form the step kernels take: ``{"step": int}``
    plus each state in ``names``, each a contiguous float32 tensor shaped like the parameter or a
    QuantizedState whose indices are shaped like it, index inside its code and whose absmax values
    are finite and >= 0, all copies on the parameter's device. ``saved`` is not modified. Raises ValueError
    or TypeError naming ``where`` (the parameter) and the field."""
    if not isinstance(saved, dict):
        raise TypeError(f"{where}: a saved state must be a dict, got {type(saved).__name__}")
    if not saved:
        return {}
    expected = {"step", *names}
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved), key=str), sorted(set(saved) - expected, key=str)
        raise ValueError(f"{where}: the saved state holds {sorted(saved, key=str)}, this optimizer keeps "
                         f"{sorted(expected)} with these options (missing {missing}, unexpected {extra}: "
                         f"a state of another optimizer, or of other options?)")
    state = {"step": _check_step(saved["step"], where)}
    for name in names:
        state[name] = _check_state_value(saved[name], param, f"{where}, state {name!r}")
    return state


def _check_step(step, where: str) -> int:
    if torch.is_tensor(step) and step.numel() == 1 and not step.dtype.is_complex:  # torch.optim's form
        value = step.item()
        step = int(value) if value == int(value) else value
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{where}: the step count must be a non-negative integer, got {step!r}")
    return step


def _check_state_value(value, param: torch.Tensor, where: str):
    shape = tuple(param.shape)
    if isinstance(value, QuantizedState):
        indices, absmax = value.indices, value.absmax  # re-checked: a tensor may be resized in place
        reference.check_block_size(value.block_size)
        if not (torch.is_tensor(indices) and torch.is_tensor(absmax)) or indices.dtype != torch.uint8 \
                or absmax.dtype != torch.float32 or absmax.dim() != 1:
            raise TypeError(f"{where}: indices must be uint8 and absmax 1-D float32, got "
                            f"{_describe(indices)} and {_describe(absmax)}")
        if tuple(indices.shape) != shape:
            raise ValueError(f"{where}: the indices have shape {tuple(indices.shape)}, the parameter {shape}")
        blocks = reference.num_blocks(indices.numel(), value.block_size)
        if absmax.numel() != blocks:
            raise ValueError(f"{where}: {indices.numel()} elements in blocks of {value.block_size} need {blocks} "
                             f"absmax values, got {absmax.numel()}")
        if indices.numel() and len(value.code) < 256 and int(indices.max()) >= len(value.code):
            raise ValueError(f"{where}: an index is {int(indices.max())}, but code {value.code.name} has "
                             f"{len(value.code)} values")
        if not bool(torch.all(torch.isfinite(absmax) & (absmax >= 0))):
            raise ValueError(f"{where}: absmax values must be finite and >= 0")
        return QuantizedState(_own_copy(indices, param), _own_copy(absmax, param), value.code, value.block_size)
    if type(value) is not torch.Tensor:  # tensor subclasses (another library's states) included
        raise TypeError(f"{where}: a state must be a float32 tensor or a QuantizedState, got {_describe(value)}")
    if value.dtype != torch.float32 or value.layout != torch.strided:
        raise TypeError(f"{where}: a 32-bit state must be a dense float32 tensor, got {_describe(value)}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{where}: the state has shape {tuple(value.shape)}, the parameter {shape}")
    return _own_copy(value, param)


def _own_copy(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A contiguous copy on the parameter's device: the kernels update states in place, and two
    optimizers loaded from one state dict must not share them."""
    return tensor.detach().to(param.device, memory_format=torch.contiguous_format, copy=True)


def check_for_step(param: torch.Tensor, states: dict) -> None:
    """What the step kernels will index, checked in O(1) a state before a step writes anything: each
    state as large as the parameter, in its dtype and on its device (a state changed by hand after
    loading must not reach a kernel)."""
    n = param.numel()
    for name, value in states.items():
        if isinstance(value, QuantizedState):
            blocks = reference.num_blocks(n, value.block_size)
            arrays = ((value.indices, torch.uint8, n), (value.absmax, torch.float32, blocks))
        else:
            arrays = ((value, torch.float32, n),)
        if not all(torch.is_tensor(a) and (a.dtype, a.numel(), a.device) == (dtype, size, param.device)
                   and a.is_contiguous() for a, dtype, size in arrays):
            raise ValueError(f"state {name!r} of a parameter of shape {tuple(param.shape)} does not fit it "
                             f"({_describe(value)}); was it changed after loading?")


def _describe(value) -> str:
    if isinstance(value, QuantizedState):  # field by field: a field changed by hand may be anything
        return (f"a QuantizedState in blocks of {value.block_size!r} with indices {_describe(value.indices)} "
                f"and absmax {_describe(value.absmax)}")
    if torch.is_tensor(value):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def as_float(state) -> torch.Tensor:
    """A state's float32 values, whatever its format."""
    return state.dequantize() if isinstance(state, QuantizedState) else state


def state_tensors(state: dict):
    """Every plain tensor an optimizer keeps for a parameter: a QuantizedState's two, and those a
    tensor subclass is made of (torchao's 8-bit states)."""
    def parts(t):
        if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
            for name in t.__tensor_flatten__()[0]:
                yield from parts(getattr(t, name))
        else:
            yield t

    for value in state.values():
        if isinstance(value, QuantizedState):
            yield from (value.indices, value.absmax)
        elif torch.is_tensor(value):
            yield from parts(value)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state``, each storage counted once: the optimizer's
    memory for its states (any torch optimizer: quantlab's, torch's, bitsandbytes')."""
    storages = {}
    for state in optimizer.state.values():
        for tensor in state_tensors(state):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())
