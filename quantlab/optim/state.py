"""How a quantlab optimizer keeps one state of one parameter.

A state is a float32 tensor shaped like its parameter (32-bit state), a :class:`QuantizedState`
(the paper's block-wise format, ``code.values[indices] * absmax[block]``, with codes of 2 to 8
bits) or a :class:`Rank1State` (rank-1 normalisation: a row and a column maximum instead of
blocks). Indices of 2- and 4-bit codes are packed four and two a byte; those of 3, 5, 6 and 7 bits
take a byte each (the memory of 8 bits, the precision of fewer). In ``optimizer.state[param]`` each
state sits under torch's name for it (``exp_avg``, ``momentum_buffer``, ...) beside the step count
``step``, whichever format it has.

All are saved as they are. A quantized state pickles as its tensors, its Code (plain floats, a
name and a bit count), its block size and shape; ``quantlab.optim`` registers the classes with
``torch.serialization.add_safe_globals``, so ``torch.load(weights_only=True)`` (torch's default)
reads a quantlab state dict, and ZeroRedundancyOptimizer, which moves states between ranks
without calling the optimizer, needs nothing converted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import kernels, reference
from ..codes import Code
from ..kernels.lookup import search_tables, step_values
from .bridge import kernel_array


def _shape(shape, indices: torch.Tensor) -> tuple:
    return tuple(indices.shape) if shape is None else tuple(int(d) for d in shape)


def _check_indices(indices, code: Code, shape: tuple, what: str) -> None:
    """Indices shaped like the state (one a byte), or flat and packed for codes of 2 or 4 bits."""
    if not torch.is_tensor(indices) or indices.dtype != torch.uint8:
        raise TypeError(f"{what}'s indices must be a uint8 tensor, got {_describe(indices)}")
    n = math.prod(shape)
    if code.bits in reference.PACKED_BITS:
        if indices.dim() != 1 or indices.numel() != reference.packed_size(n, code.bits):
            raise ValueError(f"{what} of shape {shape} with {code.bits}-bit code {code.name} keeps its indices packed, "
                             f"{reference.packed_size(n, code.bits)} bytes, got {_describe(indices)}")
    elif tuple(indices.shape) != shape:
        raise ValueError(f"{what}'s indices have shape {tuple(indices.shape)}, the state {shape}")


def _largest_index(indices: torch.Tensor, code: Code) -> int:
    """The largest stored index (packed indices: of every field of every byte); -1 when empty."""
    if not indices.numel():
        return -1
    if code.bits in reference.PACKED_BITS:
        mask, fields = 2**code.bits - 1, range(reference.indices_per_byte(code.bits))
        return max(int(((indices >> (k * code.bits)) & mask).max()) for k in fields)
    return int(indices.max())


@dataclass(frozen=True, eq=False)
class QuantizedState:
    """One state quantized block-wise: element i is ``code.values[index i] * absmax[i // block_size]``
    (i over the flattened tensor). Indices are shaped like the state, one a byte, or, for codes of 2
    or 4 bits, packed ``8 // bits`` a byte into a flat tensor (``reference.pack_indices``).
    The kernels update ``indices`` and ``absmax`` in place."""

    indices: torch.Tensor  # uint8
    absmax: torch.Tensor  # float32 [number of blocks]
    code: Code
    block_size: int
    shape: tuple = None  # the state's shape (None: the indices' shape, for indices one a byte)

    def __post_init__(self):
        if not isinstance(self.code, Code):
            raise TypeError(f"a quantized state's code must be a quantlab Code, got {type(self.code).__name__}")
        reference.check_block_size(self.block_size)
        object.__setattr__(self, "shape", _shape(self.shape, self.indices))
        _check_indices(self.indices, self.code, self.shape, "a quantized state")
        if not torch.is_tensor(self.absmax) or self.absmax.dtype != torch.float32 or self.absmax.dim() != 1:
            raise TypeError(f"a quantized state's absmax must be a 1-D float32 tensor, got {_describe(self.absmax)}")
        blocks = reference.num_blocks(self.numel, self.block_size)
        if self.absmax.numel() != blocks:
            raise ValueError(f"a quantized state of {self.numel} elements in blocks of {self.block_size} "
                             f"needs {blocks} absmax values, got {self.absmax.numel()}")
        if self.indices.device != self.absmax.device:
            raise ValueError(f"a quantized state's indices ({self.indices.device}) and absmax ({self.absmax.device}) "
                             f"must be on one device")

    @classmethod
    def quantize(cls, x: torch.Tensor, code: Code, block_size: int) -> QuantizedState:
        """x (float32, any shape) quantized with nearest rounding."""
        indices, absmax = kernels.quantize_blockwise(x.detach().contiguous().view(-1), code, block_size)
        if code.bits in reference.PACKED_BITS:
            return cls(kernels.pack_indices(indices, code.bits), absmax, code, block_size, tuple(x.shape))
        return cls(indices.view(x.shape), absmax, code, block_size)

    def dequantize(self) -> torch.Tensor:
        """The state's float32 values, shaped like the state."""
        values = kernels.dequantize_blockwise(self.unpacked_indices(), self.absmax, self.code, self.block_size)
        return values.view(self.shape)

    def unpacked_indices(self) -> torch.Tensor:
        """The code index of each element, one a byte, flat."""
        if self.code.bits in reference.PACKED_BITS:
            return kernels.unpack_indices(self.indices, self.code.bits, self.numel)
        return self.indices.reshape(-1)

    def to(self, device) -> QuantizedState:
        if self.indices.device == torch.device(device):
            return self
        return QuantizedState(self.indices.to(device), self.absmax.to(device), self.code, self.block_size, self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def per_byte(self) -> int:
        return reference.indices_per_byte(self.code.bits)

    @property
    def nbytes(self) -> int:
        return self.indices.numel() + 4 * self.absmax.numel()

    def tensors(self) -> tuple:
        return self.indices, self.absmax

    def kernel_args(self, start: int, end: int) -> tuple:
        """What the block-wise step kernels take for elements [start, end) (whole blocks): indices,
        absmax, code values, search table, zero index."""
        blocks = slice(start // self.block_size, reference.num_blocks(end, self.block_size))
        indices = slice(start // self.per_byte, -(-end // self.per_byte))
        return (kernel_array(self.indices)[indices], kernel_array(self.absmax)[blocks], step_values(self.code),
                search_tables(self.code)[0].args(), self.code.zero_index)

    def rank1_kernel_args(self) -> tuple:
        """What kernels.step_rank1 takes for this (block-wise) state: an empty second scale."""
        return (kernel_array(self.indices), kernel_array(self.absmax), kernel_array(self.absmax[:0]),
                step_values(self.code), search_tables(self.code)[0].args(), self.code.zero_index, self.per_byte)

    def __reduce__(self):
        return QuantizedState, (self.indices, self.absmax, self.code, self.block_size, self.shape)

    def __repr__(self) -> str:
        return (f"QuantizedState({self.code.name}, blocks of {self.block_size}, shape {self.shape}, "
                f"{self.indices.device})")


@dataclass(frozen=True, eq=False)
class Rank1State:
    """One state under rank-1 normalisation (Li et al. 2023; ``reference.quantize_rank1``): the state
    viewed as a (rows, cols) matrix, element (r, c) is ``code.values[index] * min(row_max[r],
    col_max[c])``. Indices as QuantizedState's (packed for codes of 2 or 4 bits). The step kernels
    update all three tensors in place."""

    indices: torch.Tensor  # uint8
    row_max: torch.Tensor  # float32 [rows]
    col_max: torch.Tensor  # float32 [cols]
    code: Code
    shape: tuple = None

    def __post_init__(self):
        if not isinstance(self.code, Code):
            raise TypeError(f"a rank-1 state's code must be a quantlab Code, got {type(self.code).__name__}")
        object.__setattr__(self, "shape", _shape(self.shape, self.indices))
        rows, cols = reference.rank1_shape(self.shape)
        _check_indices(self.indices, self.code, self.shape, "a rank-1 state")
        for what, t, size in (("row_max", self.row_max, rows), ("col_max", self.col_max, cols)):
            if not torch.is_tensor(t) or t.dtype != torch.float32 or t.dim() != 1 or t.numel() != size:
                raise ValueError(f"a rank-1 state of shape {self.shape} needs a 1-D float32 {what} of {size} values, "
                                 f"got {_describe(t)}")
            if t.device != self.indices.device:
                raise ValueError(f"a rank-1 state's tensors must be on one device ({what}: {t.device})")

    @classmethod
    def quantize(cls, x: torch.Tensor, code: Code) -> Rank1State:
        packed = code.bits in reference.PACKED_BITS
        return cls(*kernels.quantize_rank1(x.detach().contiguous(), code, packed), code, tuple(x.shape))

    def dequantize(self) -> torch.Tensor:
        return kernels.dequantize_rank1(self.indices, self.row_max, self.col_max, self.code, self.shape,
                                        self.code.bits in reference.PACKED_BITS)

    def to(self, device) -> Rank1State:
        if self.indices.device == torch.device(device):
            return self
        return Rank1State(self.indices.to(device), self.row_max.to(device), self.col_max.to(device), self.code,
                          self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def per_byte(self) -> int:
        return reference.indices_per_byte(self.code.bits)

    @property
    def nbytes(self) -> int:
        return self.indices.numel() + 4 * (self.row_max.numel() + self.col_max.numel())

    def tensors(self) -> tuple:
        return self.indices, self.row_max, self.col_max

    def rank1_kernel_args(self) -> tuple:
        """What kernels.step_rank1 takes: indices, row and column maxima, code values, search table,
        zero index, indices a byte."""
        return (kernel_array(self.indices), kernel_array(self.row_max), kernel_array(self.col_max),
                step_values(self.code), search_tables(self.code)[0].args(), self.code.zero_index, self.per_byte)

    def __reduce__(self):
        return Rank1State, (self.indices, self.row_max, self.col_max, self.code, self.shape)

    def __repr__(self) -> str:
        return f"Rank1State({self.code.name}, shape {self.shape}, {self.indices.device})"


QUANTIZED = (QuantizedState, Rank1State)


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
    if isinstance(value, QUANTIZED):
        return _check_quantized(value, param, where)
    if type(value) is not torch.Tensor:  # tensor subclasses (another library's states) included
        raise TypeError(f"{where}: a state must be a float32 tensor, a QuantizedState or a Rank1State, got "
                        f"{_describe(value)}")
    if value.dtype != torch.float32 or value.layout != torch.strided:
        raise TypeError(f"{where}: a 32-bit state must be a dense float32 tensor, got {_describe(value)}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{where}: the state has shape {tuple(value.shape)}, the parameter {shape}")
    return _own_copy(value, param)


def _check_quantized(value, param: torch.Tensor, where: str):
    """A loaded QuantizedState or Rank1State, field by field (a field may have been changed by hand
    after it was built: each tensor is re-checked), rebuilt from copies on the parameter's device."""
    shape = tuple(param.shape)
    if not isinstance(value.code, Code):
        raise TypeError(f"{where}: the code must be a quantlab Code, got {type(value.code).__name__}")
    scales = value.tensors()[1:]
    if not torch.is_tensor(value.indices) or value.indices.dtype != torch.uint8 or not all(
            torch.is_tensor(t) and t.dtype == torch.float32 and t.dim() == 1 for t in scales):
        raise TypeError(f"{where}: indices must be uint8 and scales 1-D float32 tensors, got {_describe(value)}")
    if tuple(value.indices.shape) != shape and value.code.bits not in reference.PACKED_BITS:
        raise ValueError(f"{where}: the indices have shape {tuple(value.indices.shape)}, the parameter {shape}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{where}: the state has shape {tuple(value.shape)}, the parameter {shape}")
    try:
        _check_indices(value.indices, value.code, shape, "the state")
        if isinstance(value, QuantizedState):
            reference.check_block_size(value.block_size)
            blocks = reference.num_blocks(math.prod(shape), value.block_size)
            if value.absmax.numel() != blocks:
                raise ValueError(f"{math.prod(shape)} elements in blocks of {value.block_size} need {blocks} absmax "
                                 f"values, got {value.absmax.numel()}")
        else:
            rows, cols = reference.rank1_shape(shape)
            if (value.row_max.numel(), value.col_max.numel()) != (rows, cols):
                raise ValueError(f"shape {shape} needs {rows} row and {cols} column maxima, got "
                                 f"{value.row_max.numel()} and {value.col_max.numel()}")
    except (TypeError, ValueError) as error:
        raise type(error)(f"{where}: {error}") from None
    largest = _largest_index(value.indices, value.code)
    if largest >= len(value.code):
        raise ValueError(f"{where}: an index is {largest}, but code {value.code.name} has {len(value.code)} values")
    names = ("absmax",) if isinstance(value, QuantizedState) else ("row_max", "col_max")
    for name, t in zip(names, scales):
        if not bool(torch.all(torch.isfinite(t) & (t >= 0))):
            raise ValueError(f"{where}: {name} values must be finite and >= 0")
    tensors = [_own_copy(t, param) for t in value.tensors()]
    if isinstance(value, QuantizedState):
        return QuantizedState(*tensors, value.code, value.block_size, shape)
    return Rank1State(*tensors, value.code, shape)


def _own_copy(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A contiguous copy on the parameter's device: the kernels update states in place, and two
    optimizers loaded from one state dict must not share them."""
    return tensor.detach().to(param.device, memory_format=torch.contiguous_format, copy=True)


def check_for_step(param: torch.Tensor, states: dict) -> None:
    """What the step kernels will index, checked in O(1) a state before a step writes anything: each
    state as large as the parameter needs, in its dtype and on its device (a state changed by hand
    after loading must not reach a kernel)."""
    n = param.numel()
    for name, value in states.items():
        if isinstance(value, QuantizedState):
            arrays = ((value.indices, torch.uint8, reference.packed_size(n, value.code.bits) if value.per_byte > 1
                       else n), (value.absmax, torch.float32, reference.num_blocks(n, value.block_size)))
        elif isinstance(value, Rank1State):
            rows, cols = reference.rank1_shape(param.shape)
            arrays = ((value.indices, torch.uint8, reference.packed_size(n, value.code.bits) if value.per_byte > 1
                       else n), (value.row_max, torch.float32, rows), (value.col_max, torch.float32, cols))
        else:
            arrays = ((value, torch.float32, n),)
        fits = not isinstance(value, QUANTIZED) or tuple(value.shape) == tuple(param.shape)
        if not fits or not all(torch.is_tensor(a) and (a.dtype, a.numel(), a.device) == (dtype, size, param.device)
                               and a.is_contiguous() for a, dtype, size in arrays):
            raise ValueError(f"state {name!r} of a parameter of shape {tuple(param.shape)} does not fit it "
                             f"({_describe(value)}); was it changed after loading?")


def _describe(value) -> str:
    if isinstance(value, QUANTIZED):  # field by field: a field changed by hand may be anything
        return (f"a {type(value).__name__} of shape {value.shape!r} with "
                + " and ".join(_describe(t) for t in value.tensors()))
    if torch.is_tensor(value):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def as_float(state) -> torch.Tensor:
    """A state's float32 values, whatever its format."""
    return state.dequantize() if isinstance(state, QUANTIZED) else state


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
        if isinstance(value, QUANTIZED):
            yield from value.tensors()
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
