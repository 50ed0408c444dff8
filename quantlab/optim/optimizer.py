"""What every quantlab optimizer shares: options per parameter, the non-finite gradient check, states
of 2 to 8 bits or 32 and the conversion between them, checkpoints.

FSDP2 (``torch.distributed.fsdp.fully_shard``) parameters are DTensors: each rank steps its own
shard, so 8-bit blocks follow the shard (state_bits and min_8bit_size still look at the whole
parameter), and the ranks agree on skipping a step whose gradients are not finite. fully_shard
replaces the parameters: call ``set_options`` on the sharded ones.

Options resolve, for each parameter at each step, as: the optimizer's defaults, then its param
group's values, then what ``set_options(param, ...)`` recorded on the parameter itself. Options
live on the parameter, so they apply whatever the order of calls (before or after the optimizer
is built, before or after its first step); a state whose format (bits, code, block size) no
longer matches them is converted at the next step.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import reference
from ..codes import Code, dynamic_code, linear_code
from .bridge import (
    StepBatch,
    check_param,
    finite_on_every_rank,
    float32_chunks,
    gradients_finite,
    kernel_array,
    kernels_for,
    local_shard,
)
from .state import QuantizedState, Rank1State, as_float, check_for_step, check_loaded_state

STATE_OPTIONS = ("state_bits", "block_size", "signed_code", "unsigned_code", "min_8bit_size",
                 "signed_normalization", "unsigned_normalization")
STATE_BITS = (2, 3, 4, 5, 6, 7, 8, 32)
NORMALIZATIONS = ("blockwise", "rank1")

# Li, Chen and Zhu (2023), "Memory Efficient Optimizers with 4-bit States": 4-bit m in blocks of 128
# with the dynamic (exponent) code, 4-bit v with rank-1 normalisation and the zero-free linear code.
# ``AdamW(params, **FOUR_BIT)``. (1-D tensors, which rank-1 cannot normalise, keep blocks of 128.)
FOUR_BIT = dict(state_bits=4, block_size=128, signed_code=dynamic_code(True, 4),
                unsigned_code=linear_code(4, signed=False, include_zero=False), unsigned_normalization="rank1")
_OPTIONS_ATTRIBUTE = "_quantlab_options"


def set_options(param: torch.Tensor, **options) -> None:
    """Per-parameter overrides, e.g. ``set_options(embedding.weight, state_bits=32)``.

    Takes the state options (state_bits, block_size, signed_code, unsigned_code, min_8bit_size)
    and any hyperparameter of the optimizer's param groups (lr, weight_decay, ...).
    """
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"set_options takes a parameter tensor, got {type(param).__name__}")
    if "state_bits" in options and options["state_bits"] not in STATE_BITS:
        raise ValueError(f"state_bits must be one of {STATE_BITS}, got {options['state_bits']!r}")
    merged = dict(getattr(param, _OPTIONS_ATTRIBUTE, {}))
    merged.update(options)
    setattr(param, _OPTIONS_ATTRIBUTE, merged)


def param_options(param: torch.Tensor, group: dict) -> dict:
    overrides = getattr(param, _OPTIONS_ATTRIBUTE, {})
    unknown = set(overrides) - set(group)
    if unknown:
        raise ValueError(f"set_options gave {sorted(unknown)}, which this optimizer does not have")
    return {**group, **overrides}


def check_nonnegative(**values) -> None:
    """Constructor checks: each named hyperparameter must be >= 0 (a NaN fails too)."""
    for name, value in values.items():
        if not value >= 0:
            raise ValueError(f"invalid {'learning rate' if name == 'lr' else name} {value}")


def check_betas(betas, upper_inclusive: bool = False) -> None:
    """Each beta in [0, 1) (or [0, 1] where the update allows 1)."""
    if not all(0 <= b < 1 or (upper_inclusive and b == 1) for b in betas):
        raise ValueError(f"invalid betas {betas}")


def check_state_options(state_bits, block_size, signed_code, unsigned_code, min_8bit_size, signed_normalization,
                        unsigned_normalization) -> None:
    if state_bits not in STATE_BITS:
        raise ValueError(f"state_bits must be one of {STATE_BITS}, got {state_bits!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    for name, code in (("signed_code", signed_code), ("unsigned_code", unsigned_code)):
        if code is not None and not isinstance(code, Code):
            raise TypeError(f"{name} must be a quantlab Code (or None: the dynamic code), got {type(code).__name__}")
        if code is not None and state_bits != 32 and code.bits != state_bits:
            raise ValueError(f"{name} {code.name} has {code.bits} bits, but state_bits is {state_bits}")
    if signed_code is not None and signed_code.zero_free:
        raise ValueError(f"signed_code {signed_code.name} has no 0: a signed state (m) must store zeros")
    if state_bits != 32 and block_size % reference.indices_per_byte(state_bits):
        raise ValueError(f"{state_bits}-bit indices are packed {reference.indices_per_byte(state_bits)} a byte: "
                         f"block_size must be a multiple of that, got {block_size}")
    if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise ValueError(f"min_8bit_size must be a non-negative integer, got {min_8bit_size!r}")
    for name, normalization in (("signed_normalization", signed_normalization),
                                ("unsigned_normalization", unsigned_normalization)):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"{name} must be one of {NORMALIZATIONS}, got {normalization!r}")


class BlockwiseOptimizer(torch.optim.Optimizer):
    """A torch optimizer on quantlab's fused step kernels; subclasses name their update.

    Subclasses set ``kind`` (a kernel kind from quantlab.kernels.scalar) and define
    ``state_specs(options)`` -> ((state name, signed), ...) and ``hyperparameters(p, options, step)``
    -> the float32 constants of their update. Everything else is shared: per-parameter options,
    the non-finite gradient check, 8-bit or 32-bit states and conversion between them, checkpoints.

    Quantized state (``state_bits`` 2 to 8): each state in ``signed_code`` or ``unsigned_code``
    (None: the dynamic code of ``state_bits`` bits; a given code must have that many bits), with
    ``signed_normalization`` / ``unsigned_normalization``: ``"blockwise"`` (a QuantizedState,
    ``block_size`` elements a block: bits/8 bytes an element plus 4 bytes a block; 2- and 4-bit
    indices packed, 3, 5, 6 and 7 bits one a byte) or ``"rank1"`` (a Rank1State: 4 bytes a row and a
    column; tensors of fewer than 2 dimensions, or with a single row or column, stay block-wise).
    ``FOUR_BIT`` is Li et al.'s 4-bit preset. Parameters with fewer than ``min_8bit_size`` elements,
    and those marked ``set_options(p, state_bits=32)``, keep float32 states. Either way
    ``optimizer.state[p]`` holds each state under torch's name for it.
    """

    kind: int

    def __init__(self, params, defaults: dict, *, state_bits=8, block_size=256, signed_code=None,
                 unsigned_code=None, min_8bit_size=4096, signed_normalization="blockwise",
                 unsigned_normalization="blockwise", skip_nonfinite=False):
        check_state_options(state_bits, block_size, signed_code, unsigned_code, min_8bit_size, signed_normalization,
                            unsigned_normalization)
        defaults = dict(defaults, state_bits=state_bits, block_size=block_size, signed_code=signed_code,
                        unsigned_code=unsigned_code, min_8bit_size=min_8bit_size,
                        signed_normalization=signed_normalization, unsigned_normalization=unsigned_normalization)
        super().__init__(params, defaults)
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0

    def state_specs(self, options: dict) -> tuple:
        raise NotImplementedError

    def hyperparameters(self, p: torch.Tensor, options: dict, step: int) -> np.ndarray:
        """The float32 constants of this step's update of p (before p changes)."""
        raise NotImplementedError

    def initial_state(self, p: torch.Tensor, options: dict, name: str) -> torch.Tensor:
        """A state's value before the first step: zeros, unless the optimizer says otherwise (float32
        whatever the parameter's dtype)."""
        return torch.zeros_like(p, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                check_param(local_shard(p))
                options = param_options(p, group)
                check_state_options(*(options[k] for k in STATE_OPTIONS))
                # Raises on option combinations the update refuses (RMSprop's centred with momentum
                # from a param group or set_options) before any parameter or state is written.
                self.hyperparameters(p, options, self.state.get(p, {}).get("step", 0) + 1)
                check_for_step(local_shard(p), {k: v for k, v in self.state.get(p, {}).items() if k != "step"})
                work.append((p, options))
        finite = gradients_finite([local_shard(p) for p, _ in work])
        if not finite_on_every_rank(finite, [p for p, _ in work]):
            if self.skip_nonfinite:
                self.skipped_steps += 1
                return loss
            raise FloatingPointError("a gradient holds NaN or Inf: no parameter or state was changed "
                                     "(skip_nonfinite=True skips such steps instead)")
        batch = StepBatch()
        for p, options in work:
            self._update(p, options, batch)
        batch.run()
        return loss

    def state_format(self, param: torch.Tensor, options: dict, signed: bool) -> tuple | None:
        """(code, normalization) a state of ``param`` is kept in under these options, or None for
        float32."""
        quantized = options["state_bits"] != 32 and param.numel() >= options["min_8bit_size"]
        shard = local_shard(param)
        # a rank's shard may be empty (FSDP2 with fewer rows than ranks): nothing to quantize
        if not quantized or shard.numel() == 0:
            return None
        code = options["signed_code" if signed else "unsigned_code"]
        code = dynamic_code(signed, options["state_bits"]) if code is None else code
        normalization = options["signed_normalization" if signed else "unsigned_normalization"]
        if normalization == "rank1" and (shard.dim() < 2 or 1 in reference.rank1_shape(shard.shape)):
            normalization = "blockwise"  # a vector (or one row or column) has no rank-1 structure to use
        return code, normalization

    def _update(self, param, options, batch):
        state, p = self.state[param], local_shard(param)
        specs = self.state_specs(options)
        if "step" not in state or any(name not in state for name, _ in specs):
            # The first step, or the first with these states (SGD's momentum set after steps without
            # it): they start from zeros and the step count from 0, so that SGD's buffer starts as
            # the gradient, as torch's does.
            state["step"] = 0
            for name, _ in specs:
                state[name] = self.initial_state(p, options, name)
        for name, signed in specs:
            state[name] = self._in_format(state[name], self.state_format(param, options, signed),
                                          options["block_size"], p.device)
        state["step"] += 1
        self._run_kernels(p, state, options, specs, self.hyperparameters(param, options, state["step"]), batch)

    @staticmethod
    def _in_format(state, state_format, block_size: int, device):
        """The state in the wanted format on the parameter's device: as it is when it has it, else
        converted (dequantized with its own code, requantized in the wanted format)."""
        if state_format is None:
            return state.to(device) if torch.is_tensor(state) else state.dequantize().to(device)
        code, normalization = state_format
        if normalization == "rank1":
            if isinstance(state, Rank1State) and state.code == code:
                return state.to(device)
            return Rank1State.quantize(as_float(state).to(device), code)
        if isinstance(state, QuantizedState) and (state.code, state.block_size) == (code, block_size):
            return state.to(device)
        return QuantizedState.quantize(as_float(state).to(device), code, block_size)

    def _run_kernels(self, p, state, options, specs, hyper, batch):
        """The fused step kernels (step_32bit, step_8bit, step_rank1) on p and its states, in place: a
        CPU float32 parameter with float32 or block-wise states joins the batch, launched with the
        others after the last one."""
        kernels, block_size = kernels_for(p), options["block_size"]
        states = [state[name] for name, _ in specs]
        if any(isinstance(s, Rank1State) for s in states):
            # two passes over the whole tensor (the new maxima need every element): not chunked, not batched
            args = [s.rank1_kernel_args() for s in states]
            args += args * (2 - len(args))  # one state: the kernel's second slot is not read
            for _, _, param, grad in float32_chunks(p, p.numel()):
                kernels.step_rank1(self.kind, len(states), param, grad, hyper, block_size, *args)
            return
        if batch.takes(p):
            batch.add(self.kind, p, states, hyper, block_size)
            return
        for start, end, param, grad in float32_chunks(p, block_size):
            if not states or torch.is_tensor(states[0]):
                arrays = [kernel_array(s)[start:end] for s in states]
                arrays += [param[:0]] * (2 - len(arrays))  # unused state slots
                kernels.step_32bit(self.kind, len(states), param, grad, *arrays, hyper)
                continue
            per_state = [s.kernel_args(start, end) for s in states]
            if len(per_state) == 1:  # the kernel's second state slot, left untouched
                indices, absmax, *code = per_state[0]
                per_state.append((indices[:0], absmax[:0], *code))
            kernels.step_8bit(self.kind, len(states), param, grad, hyper, block_size, *per_state[0], *per_state[1],
                              per_byte=(states[0].per_byte, states[-1].per_byte))

    def load_state_dict(self, state_dict):
        """torch's load_state_dict, all or nothing: every param group and state is checked against
        this optimizer and its parameters before anything changes (see ``check_loaded_state``), and
        a mismatch raises naming the parameter and the field. States are restored as copies of what
        was saved, on their parameter's device: torch would cast float32 states of a bfloat16
        parameter to bfloat16. A torch.optim state dict (no state options) loads with this group's."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("an optimizer state dict is a dict with 'state' and 'param_groups', got "
                             + (f"keys {sorted(state_dict, key=str)}" if isinstance(state_dict, dict)
                                else type(state_dict).__name__))
        saved_groups, saved_states = state_dict["param_groups"], state_dict["state"]
        if not isinstance(saved_groups, list) or not isinstance(saved_states, dict):
            raise TypeError("an optimizer state dict's 'param_groups' must be a list and its 'state' a dict")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the state dict has {len(saved_groups)} param groups, this optimizer "
                             f"{len(self.param_groups)}")
        loaded, groups = {}, []
        for g, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
                raise TypeError(f"param group {g} of the state dict must be a dict with a list of 'params'")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {g} of the state dict has {len(saved['params'])} parameters, "
                                 f"this optimizer's {len(group['params'])}")
            # a torch.optim state dict has no state options: it loads with this group's
            saved = {**{k: group[k] for k in STATE_OPTIONS if k not in saved}, **saved}
            missing = sorted(set(self.defaults) - set(saved))
            if missing:
                raise ValueError(f"param group {g} of the state dict lacks {missing} (a state dict of "
                                 f"another optimizer?)")
            groups.append(saved)
            for index, p in zip(saved["params"], group["params"]):
                options = param_options(p, {**saved, "params": group["params"]})
                check_state_options(*(options[k] for k in STATE_OPTIONS))
                if index in saved_states:
                    names = tuple(name for name, _ in self.state_specs(options))
                    where = f"parameter {index} (group {g}, shape {tuple(p.shape)})"
                    loaded[p] = check_loaded_state(saved_states[index], local_shard(p), names, where)
        super().load_state_dict({**state_dict, "param_groups": groups})
        self.state.clear()
        self.state.update({p: state for p, state in loaded.items() if state})
