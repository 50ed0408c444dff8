"""Adam and AdamW with block-wise 8-bit (or 32-bit) states, on fused Numba CPU kernels.

8-bit state: m with the signed dynamic code, v with the unsigned one, ``block_size`` elements a
block (2 bytes a parameter plus 8 bytes a block). Parameters with fewer than ``min_8bit_size``
elements, and those marked with ``set_options(param, state_bits=32)``, keep float32 states
named like torch's (``exp_avg``, ``exp_avg_sq``).
"""
from __future__ import annotations

import torch

from .. import reference
from ..codes import Code, dynamic_code
from ..kernels import cpu
from ..kernels.lookup import search_tables
from .optimizer import (STATE_OPTIONS, check_param, check_state_options, flat_numpy, gradients_finite,
                        param_options)

_8BIT_KEYS = ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax")


class Adam(torch.optim.Optimizer):
    """torch.optim.Adam's update (L2 weight decay) with quantized states.

    Arguments as torch.optim.Adam (amsgrad and maximize are refused, not ignored), plus
    state_bits (8 or 32), block_size, signed_code / unsigned_code (defaults: the dynamic maps),
    min_8bit_size, and skip_nonfinite: by default a step whose gradients hold NaN or Inf raises
    FloatingPointError and changes nothing; with skip_nonfinite=True it is skipped and counted
    in ``skipped_steps``.
    """

    decoupled_weight_decay = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 maximize=False, *, state_bits=8, block_size=256, signed_code=None, unsigned_code=None,
                 min_8bit_size=4096, skip_nonfinite=False):
        if not 0.0 <= lr:
            raise ValueError(f"invalid learning rate {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"invalid eps {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        if amsgrad:
            raise ValueError("amsgrad is not supported: it needs a third state")
        if maximize:
            raise ValueError("maximize is not supported: negate the loss instead")
        signed_code = dynamic_code(signed=True) if signed_code is None else signed_code
        unsigned_code = dynamic_code(signed=False) if unsigned_code is None else unsigned_code
        check_state_options(state_bits, block_size, signed_code, unsigned_code, min_8bit_size)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_bits=state_bits,
                        block_size=block_size, signed_code=signed_code, unsigned_code=unsigned_code,
                        min_8bit_size=min_8bit_size)
        super().__init__(params, defaults)
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0

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
                check_param(p)
                options = param_options(p, group)
                check_state_options(*(options[k] for k in STATE_OPTIONS))
                work.append((p, options))
        if not gradients_finite([p for p, _ in work]):
            if self.skip_nonfinite:
                self.skipped_steps += 1
                return loss
            raise FloatingPointError("a gradient holds NaN or Inf: no parameter or state was changed "
                                     "(skip_nonfinite=True skips such steps instead)")
        for p, options in work:
            self._update(p, options)
        return loss

    def state_dict(self):
        """torch's state dict, with each Code in the param groups as plain data (name, bits, values
        tensor), so that ``torch.load(..., weights_only=True)`` (torch's default) reads it."""
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            for key in ("signed_code", "unsigned_code"):
                code = group[key]
                group[key] = {"name": code.name, "bits": code.bits, "values": torch.from_numpy(code.values.copy())}
        return state_dict

    def load_state_dict(self, state_dict):
        """torch's load_state_dict casts every state tensor to its parameter's dtype (uint8 code
        indices would become float32) and rebuilds every iterable from its items (the code names
        in ``state["format"]`` would become the repr of a generator): restore both as saved."""
        state_dict = {**state_dict, "param_groups": [
            {**g, **{key: Code(g[key]["values"].numpy(), g[key]["name"], g[key]["bits"])
                     for key in ("signed_code", "unsigned_code") if isinstance(g[key], dict)}}
            for g in state_dict["param_groups"]]}
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
            for key in ("exp_avg_q", "exp_avg_sq_q"):
                if key in saved:
                    state[key] = saved[key].to(device=p.device, dtype=torch.uint8)

    def _state_format(self, p, options) -> tuple:
        eight_bit = options["state_bits"] == 8 and p.numel() >= options["min_8bit_size"]
        if not eight_bit:
            return (32,)
        return (8, options["block_size"], options["signed_code"].name, options["unsigned_code"].name)

    def _update(self, p, options):
        state = self.state[p]
        wanted = self._state_format(p, options)
        if not state:
            state["step"] = 0
            self._store_states(p, state, wanted, options, torch.zeros_like(p), torch.zeros_like(p))
        elif state["format"] != wanted:
            self._store_states(p, state, wanted, options, *self._float_states(p, state, options))
        state["step"] += 1
        beta1, beta2 = options["betas"]
        hyper = reference.adam_hyperparameters(options["lr"], beta1, beta2, options["eps"],
                                               options["weight_decay"], self.decoupled_weight_decay,
                                               state["step"])
        param, grad = flat_numpy(p), flat_numpy(p.grad if p.grad.is_contiguous() else p.grad.contiguous())
        if state["format"][0] == 32:
            cpu.adam_step_32bit(param, grad, flat_numpy(state["exp_avg"]), flat_numpy(state["exp_avg_sq"]), hyper)
            return
        signed, unsigned = options["signed_code"], options["unsigned_code"]
        cpu.adam_step_8bit(param, grad, flat_numpy(state["exp_avg_q"]), state["exp_avg_absmax"].numpy(),
                           flat_numpy(state["exp_avg_sq_q"]), state["exp_avg_sq_absmax"].numpy(), hyper,
                           options["block_size"], signed.values, search_tables(signed)[0].args(),
                           signed.zero_index, unsigned.values, search_tables(unsigned)[0].args(),
                           unsigned.zero_index)

    @staticmethod
    def _store_states(p, state, state_format, options, m, v):
        """Keep m and v (float32 tensors shaped like p) in the given format."""
        for key in ("exp_avg", "exp_avg_sq", *_8BIT_KEYS):
            state.pop(key, None)
        state["format"] = state_format
        if state_format[0] == 32:
            state["exp_avg"], state["exp_avg_sq"] = m.contiguous(), v.contiguous()
            return
        block_size = options["block_size"]
        for name, x, code in (("exp_avg", m, options["signed_code"]), ("exp_avg_sq", v, options["unsigned_code"])):
            q, absmax = reference.quantize_blockwise(x.detach().numpy(), code, block_size)
            state[f"{name}_q"], state[f"{name}_absmax"] = torch.from_numpy(q), torch.from_numpy(absmax)

    @staticmethod
    def _float_states(p, state, options):
        """The current m and v as float32 tensors, whatever their stored format."""
        if state["format"][0] == 32:
            return state["exp_avg"], state["exp_avg_sq"]
        _, block_size, signed_name, unsigned_name = state["format"]
        signed, unsigned = options["signed_code"], options["unsigned_code"]
        if (signed.name, unsigned.name) != (signed_name, unsigned_name):
            raise ValueError(f"the state of a parameter was quantized with codes {signed_name} / {unsigned_name}, "
                             f"but its options now name {signed.name} / {unsigned.name}")
        m = reference.dequantize_blockwise(state["exp_avg_q"].numpy(), state["exp_avg_absmax"].numpy(),
                                           signed, block_size)
        v = reference.dequantize_blockwise(state["exp_avg_sq_q"].numpy(), state["exp_avg_sq_absmax"].numpy(),
                                           unsigned, block_size)
        return torch.from_numpy(m).view_as(p), torch.from_numpy(v).view_as(p)


class AdamW(Adam):
    """torch.optim.AdamW's update (decoupled weight decay, default 1e-2) with quantized states."""

    decoupled_weight_decay = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, **kwargs):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
