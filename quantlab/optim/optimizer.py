"""What every quantlab optimizer shares: options per parameter, the non-finite gradient check, and
the torch <-> kernel bridge (CPU float32 tensors are handed to Numba as zero-copy NumPy views).

FSDP2 (``torch.distributed.fsdp.fully_shard``) parameters are DTensors: each rank steps its own
shard, so 8-bit blocks follow the shard (state_bits and min_8bit_size still look at the whole
parameter), and the ranks agree on skipping a step whose gradients are not finite. fully_shard
replaces the parameters: call ``set_options`` on the sharded ones.

Options resolve, for each parameter at each step, as: the optimizer's defaults, then its param
group's values, then what ``set_options(param, ...)`` recorded on the parameter itself. Options
live on the parameter, so they apply whatever the order of calls (before or after the optimizer
is built, before or after its first step); a state whose precision no longer matches is
converted at the next step.
"""
from __future__ import annotations

import sys
from functools import partial
from types import SimpleNamespace

import numpy as np
import torch

from .. import kernels, reference
from ..codes import Code, dynamic_code
from ..kernels import cpu
from ..kernels.lookup import search_tables
from ..kernels.scalar import INF_BITS

STATE_OPTIONS = ("state_bits", "block_size", "signed_code", "unsigned_code", "min_8bit_size")
CODE_OPTIONS = ("signed_code", "unsigned_code")
_OPTIONS_ATTRIBUTE = "_quantlab_options"


def set_options(param: torch.Tensor, **options) -> None:
    """Per-parameter overrides, e.g. ``set_options(embedding.weight, state_bits=32)``.

    Takes the state options (state_bits, block_size, signed_code, unsigned_code, min_8bit_size)
    and any hyperparameter of the optimizer's param groups (lr, weight_decay, ...).
    """
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"set_options takes a parameter tensor, got {type(param).__name__}")
    if "state_bits" in options and options["state_bits"] not in (8, 32):
        raise ValueError(f"state_bits must be 8 or 32, got {options['state_bits']!r}")
    merged = dict(getattr(param, _OPTIONS_ATTRIBUTE, {}))
    merged.update(options)
    setattr(param, _OPTIONS_ATTRIBUTE, merged)


def param_options(param: torch.Tensor, group: dict) -> dict:
    overrides = getattr(param, _OPTIONS_ATTRIBUTE, {})
    unknown = set(overrides) - set(group)
    if unknown:
        raise ValueError(f"set_options gave {sorted(unknown)}, which this optimizer does not have")
    return {**group, **overrides}


def codes_as_data(group: dict) -> dict:
    """A param group with its Codes as plain data (name, bits, values tensor), which
    ``torch.load(weights_only=True)`` reads. ``state_dict()`` does this; ZeroRedundancyOptimizer's
    consolidated state dict needs it before saving (ZeRO copies the param groups, Codes and all)."""
    data = dict(group)
    for key in CODE_OPTIONS:
        if isinstance(group.get(key), Code):
            data[key] = {"name": group[key].name, "bits": group[key].bits,
                         "values": torch.from_numpy(group[key].values.copy())}
    return data


def codes_as_objects(group: dict) -> dict:
    """The inverse of codes_as_data. ``load_state_dict`` does this; ZeroRedundancyOptimizer's
    ``load_state_dict`` hands the param groups to its local optimizer as they are, so a saved state
    dict needs it before being loaded there."""
    objects = dict(group)
    for key in CODE_OPTIONS:
        if isinstance(group.get(key), dict):
            objects[key] = Code(group[key]["values"].numpy(), group[key]["name"], group[key]["bits"])
    return objects


def check_nonnegative(**values) -> None:
    """Constructor checks: each named hyperparameter must be >= 0 (a NaN fails too)."""
    for name, value in values.items():
        if not value >= 0:
            raise ValueError(f"invalid {'learning rate' if name == 'lr' else name} {value}")


def check_betas(betas, upper_inclusive: bool = False) -> None:
    """Each beta in [0, 1) (or [0, 1] where the update allows 1)."""
    if not all(0 <= b < 1 or (upper_inclusive and b == 1) for b in betas):
        raise ValueError(f"invalid betas {betas}")


def check_state_options(state_bits, block_size, signed_code, unsigned_code, min_8bit_size) -> None:
    if state_bits not in (8, 32):
        raise ValueError(f"state_bits must be 8 or 32, got {state_bits!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    for name, code in (("signed_code", signed_code), ("unsigned_code", unsigned_code)):
        if not isinstance(code, Code):
            raise TypeError(f"{name} must be a quantlab Code, got {type(code).__name__}")
    if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise ValueError(f"min_8bit_size must be a non-negative integer, got {min_8bit_size!r}")


PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# float16/bfloat16 parameters are stepped in float32 chunks of this many elements (rounded to whole
# blocks): the extra memory of a step is bounded by a chunk, not by the parameter.
CHUNK_ELEMENTS = 1 << 18


def check_param(param: torch.Tensor) -> None:
    """What the kernels take: dense, contiguous float32/float16/bfloat16 parameters on the CPU or
    a CUDA device, with a gradient of the same dtype and device."""
    if param.grad.is_sparse:
        raise RuntimeError("quantlab optimizers do not support sparse gradients")
    if param.device.type not in ("cpu", "cuda"):
        raise NotImplementedError(f"quantlab optimizers run on the CPU and CUDA, got {param.device}")
    if param.dtype not in PARAM_DTYPES:
        raise NotImplementedError(f"quantlab optimizers take float32, float16 or bfloat16 parameters, got {param.dtype}")
    if (param.grad.dtype, param.grad.device) != (param.dtype, param.device):
        raise ValueError(f"a gradient must have its parameter's dtype and device: parameter {param.dtype} on "
                         f"{param.device}, gradient {param.grad.dtype} on {param.grad.device}")
    if not param.is_contiguous():
        raise ValueError("quantlab optimizers take contiguous parameters")


STEP_KERNELS = ("step_32bit", "step_8bit", "lamb_norms_32bit", "lamb_norms_8bit", "lamb_apply_32bit", "lamb_apply_8bit")


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
    """CPU float32 gradients: one integer-max pass each (see kernels.cpu.largest_magnitude_bits);
    CUDA: torch.isfinite (one synchronisation); CPU 16-bit: torch.isfinite by chunks, so that the
    check's temporaries stay chunk-sized."""
    for p in params:
        g = p.grad.detach()
        if g.is_cuda:
            finite = bool(torch.isfinite(g).all())
        elif g.dtype != torch.float32:
            flat = g.reshape(-1)
            finite = all(bool(torch.isfinite(flat[i:i + CHUNK_ELEMENTS]).all())
                         for i in range(0, flat.numel(), CHUNK_ELEMENTS))
        else:
            g = g if g.is_contiguous() else g.contiguous()
            finite = cpu.largest_magnitude_bits(g.view(-1).view(torch.int32).numpy()) < INF_BITS
        if not finite:
            return False
    return True


class BlockwiseOptimizer(torch.optim.Optimizer):
    """A torch optimizer on quantlab's fused step kernels; subclasses name their update.

    Subclasses set ``kind`` (a kernel kind from quantlab.kernels.scalar) and define
    ``state_specs(options)`` -> ((state name, signed), ...) and ``hyperparameters(p, options, step)``
    -> the float32 constants of their update. Everything else is shared: per-parameter options,
    the non-finite gradient check, 8-bit or 32-bit states and conversion between them, checkpoints.

    8-bit state: each state block-wise quantized with ``signed_code`` or ``unsigned_code``,
    ``block_size`` elements a block (1 byte an element plus 4 bytes a block, per state). Parameters
    with fewer than ``min_8bit_size`` elements, and those marked ``set_options(p, state_bits=32)``,
    keep float32 states named like torch's.
    """

    kind: int

    def __init__(self, params, defaults: dict, *, state_bits=8, block_size=256, signed_code=None,
                 unsigned_code=None, min_8bit_size=4096, skip_nonfinite=False):
        signed_code = dynamic_code(signed=True) if signed_code is None else signed_code
        unsigned_code = dynamic_code(signed=False) if unsigned_code is None else unsigned_code
        check_state_options(state_bits, block_size, signed_code, unsigned_code, min_8bit_size)
        defaults = dict(defaults, state_bits=state_bits, block_size=block_size, signed_code=signed_code,
                        unsigned_code=unsigned_code, min_8bit_size=min_8bit_size)
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
                work.append((p, options))
        finite = gradients_finite([local_shard(p) for p, _ in work])
        if not finite_on_every_rank(finite, [p for p, _ in work]):
            if self.skip_nonfinite:
                self.skipped_steps += 1
                return loss
            raise FloatingPointError("a gradient holds NaN or Inf: no parameter or state was changed "
                                     "(skip_nonfinite=True skips such steps instead)")
        for p, options in work:
            self._update(p, options)
        return loss

    def _state_format(self, p, options) -> tuple:
        eight_bit = options["state_bits"] == 8 and p.numel() >= options["min_8bit_size"]
        if not eight_bit or not self.state_specs(options):
            return (32,)
        return (8, options["block_size"], options["signed_code"].name, options["unsigned_code"].name)

    def _update(self, param, options):
        state, p = self.state[param], local_shard(param)
        specs = self.state_specs(options)
        # a rank's shard may be empty (FSDP2 with fewer rows than ranks): nothing to quantize
        wanted = self._state_format(param, options) if p.numel() else (32,)
        if not state or not self._holds_states(state, specs):
            # The first step, or the first with these states (SGD's momentum set after steps without
            # it): they start from zeros and the step count from 0, so that SGD's buffer starts as
            # the gradient, as torch's does.
            state["step"] = 0
            self._store_states(p, state, wanted, options, [self.initial_state(p, options, name) for name, _ in specs])
        elif specs and state["format"] != wanted:
            self._store_states(p, state, wanted, options, self._float_states(p, state, options))
        state["step"] += 1
        self._run_kernels(p, state, options, specs, self.hyperparameters(param, options, state["step"]))

    def _run_kernels(self, p, state, options, specs, hyper):
        """The fused step kernels (step_32bit / step_8bit) on p and its states, in place."""
        kernels, block_size = kernels_for(p), options["block_size"]
        for start, end, param, grad in float32_chunks(p, block_size):
            if not specs or state["format"][0] == 32:  # without states (SGD's momentum 0) stored ones are kept
                states = [kernel_array(state[name])[start:end] for name, _ in specs]
                states += [param[:0]] * (2 - len(states))
                kernels.step_32bit(self.kind, len(specs), param, grad, *states, hyper)
                continue
            per_state = [self._kernel_state(state, name, self._code(options, signed), start, end, block_size)
                         for name, signed in specs]
            if len(per_state) == 1:  # the kernel's second state slot, left untouched
                q, absmax, *code = per_state[0]
                per_state.append((q[:0], absmax[:0], *code))
            kernels.step_8bit(self.kind, len(specs), param, grad, hyper, block_size, *per_state[0], *per_state[1])

    @staticmethod
    def _code(options, signed: bool) -> Code:
        return options["signed_code"] if signed else options["unsigned_code"]

    @staticmethod
    def _kernel_state(state, name, code, start, end, block_size) -> tuple:
        """What the 8-bit kernels take for one state's elements [start, end) (whole blocks): q,
        absmax, code values, search table, zero index."""
        blocks = slice(start // block_size, reference.num_blocks(end, block_size))
        return (kernel_array(state[f"{name}_q"])[start:end], kernel_array(state[f"{name}_absmax"])[blocks],
                code.values, search_tables(code)[0].args(), code.zero_index)

    def _holds_states(self, state, specs) -> bool:
        suffix = "" if state.get("format", (32,))[0] == 32 else "_q"
        return all(f"{name}{suffix}" in state for name, _ in specs)

    def _store_states(self, p, state, state_format, options, floats):
        """Keep the states (float32 tensors shaped like p, in state_specs order) in the given format."""
        for name, _ in self.state_specs(options):
            for key in (name, f"{name}_q", f"{name}_absmax"):
                state.pop(key, None)
        state["format"] = state_format
        for (name, signed), x in zip(self.state_specs(options), floats):
            if state_format[0] == 32:
                state[name] = x.contiguous()
                continue
            q, absmax = kernels.quantize_blockwise(x.detach().contiguous().view(-1), self._code(options, signed),
                                                   options["block_size"])
            state[f"{name}_q"], state[f"{name}_absmax"] = q.view_as(p), absmax

    def _float_states(self, p, state, options):
        """The current states as float32 tensors, whatever their stored format."""
        specs = self.state_specs(options)
        if state["format"][0] == 32:
            return [state[name] for name, _ in specs]
        _, block_size, signed_name, unsigned_name = state["format"]
        signed, unsigned = options["signed_code"], options["unsigned_code"]
        if (signed.name, unsigned.name) != (signed_name, unsigned_name):
            raise ValueError(f"the state of a parameter was quantized with codes {signed_name} / {unsigned_name}, "
                             f"but its options now name {signed.name} / {unsigned.name}")
        return [kernels.dequantize_blockwise(state[f"{name}_q"].view(-1), state[f"{name}_absmax"],
                                             signed if is_signed else unsigned, block_size).view_as(p)
                for name, is_signed in specs]

    def state_dict(self):
        """torch's state dict, with each Code in the param groups as plain data (name, bits, values
        tensor), so that ``torch.load(..., weights_only=True)`` (torch's default) reads it."""
        state_dict = super().state_dict()
        return {**state_dict, "param_groups": [codes_as_data(g) for g in state_dict["param_groups"]]}

    def load_state_dict(self, state_dict):
        """torch's load_state_dict casts every state tensor to its parameter's dtype (uint8 code
        indices would become float32, float32 states of a bfloat16 parameter bfloat16) and rebuilds
        every iterable from its items (the code names in ``state["format"]`` would become the repr
        of a generator): restore both as saved, on the parameter's device."""
        state_dict = {**state_dict, "param_groups": [codes_as_objects(g) for g in state_dict["param_groups"]]}
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved_states = [state_dict["state"].get(i) for i in saved_ids]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for p, saved in zip(params, saved_states):
            if saved is None:
                continue
            state = self.state[p]
            if "format" in saved:
                state["format"] = tuple(saved["format"])
            for key, value in saved.items():
                if isinstance(value, torch.Tensor):
                    state[key] = value.to(device=p.device)
