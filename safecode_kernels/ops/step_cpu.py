"""The ``cpu`` backend of the step op: the launcher of the C++ kernel (csrc/step_cpu.cpp).

The kernel reads the logits in their own dtype in place (no conversion copy), runs with the
GIL released, and reports problems per row, which become :class:`StepError`. Inputs in the
layout it assumes (what :mod:`.step_inputs` produces) are handed over as raw addresses, which
costs about a microsecond; any other layout goes through buffer-protocol views checked in C++.
"""

from __future__ import annotations

import math

import torch

from .step_inputs import StepInputs, raise_for_row_status

try:
    from .. import _C
except ImportError as error:  # the extension was not built
    _C = None
    _IMPORT_ERROR = str(error)

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def unavailable_reason() -> str | None:
    """``None`` when the C++ extension is importable, else why not."""
    if _C is None:
        return (
            f"the C++ extension safecode_kernels._C is not built ({_IMPORT_ERROR}); reinstall with `pip install -e .`"
        )
    return None


def _buffer(t: torch.Tensor):
    # numpy has no bfloat16: hand its bits over as int16; the kernel is told the dtype.
    if t.requires_grad:
        t = t.detach()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # _C.DTYPES
# The last SteeringParams converted, with its kernel form: a decoder passes the same
# (frozen) params every step, and converting them costs more than a small step.
_last_params: tuple = (None, None)


def _kernel_params(params):
    global _last_params
    cached, kernel = _last_params
    if cached is not params:
        kernel = _new_kernel_params(params)
        _last_params = (params, kernel)
    return kernel


def _new_kernel_params(p):
    k = _C.StepParams()
    k.real_weight = p.real_weight
    k.alpha_unsafe = p.alpha
    k.alpha_safe = p.alpha_safe
    # log(beta) is rounded once from double, exactly as the torch reference does.
    k.log_plausibility = math.log(p.plausibility) if p.plausibility > 0.0 else -math.inf
    k.sensitive_top_k = p.sensitive_top_k
    k.scope_all = p.scope == "all"
    k.bias_unsafe = p.bias_unsafe
    k.bias_safe = p.bias_safe
    k.temperature = p.temperature
    k.top_k = p.top_k
    k.top_p = p.top_p
    return k


def step_cpu(inp: StepInputs, return_logits: bool, return_stats: bool, read_status: bool = True):
    """Returns ``(tokens [B] int64, logits [B, V] fp32 | None, (before, after) | None)``;
    with ``read_status=False``, ``(tokens, logits, stats, status)``: the problems are not
    raised but returned as ``[B]`` int32 ``RowStatus`` codes (``None`` when every row is fine)."""
    real, noised = inp.logits_real, inp.logits_noised
    batch, vocab = real.shape
    tokens = torch.empty(batch, dtype=torch.int64)
    logits = torch.empty(batch, vocab, dtype=torch.float32) if return_logits else None
    before = torch.empty(batch, dtype=torch.float32) if return_stats else None
    after = torch.empty(batch, dtype=torch.float32) if return_stats else None
    # Raw addresses only for inputs built by the checks of step_inputs, on the CPU; any other
    # layout goes through buffer views that C++ checks.
    if inp.kernel_layout and real.is_cpu:
        ids = inp.refusal_ids
        status = _C.step_addresses(
            real.data_ptr(),
            noised.data_ptr(),
            _DTYPE_CODES[real.dtype],
            batch,
            vocab,
            real.stride()[0],
            noised.stride()[0],
            inp.verdict.data_ptr(),
            ids.data_ptr(),
            ids.shape[0],
            tokens.data_ptr(),
            _kernel_params(inp.params),
            inp.seed or 0,
            0 if logits is None else logits.data_ptr(),
            0 if before is None else before.data_ptr(),
            0 if after is None else after.data_ptr(),
            torch.get_num_threads(),
        )
        if status is not None:
            status = torch.tensor(status, dtype=torch.int32)
    else:
        status = _step_buffers(inp, tokens, logits, before, after)
    stats = (before, after) if return_stats else None
    if not read_status:
        return tokens, logits, stats, status
    if status is not None:
        raise_for_row_status(status)
    return tokens, logits, stats


# The kernel rejects a verdict other than +1, -1 or 0 with the error of the Python checks, so
# the fast path of the step need not check the values before it (ops/step_op.py).
step_cpu.checks_verdict_values = True


def _step_buffers(inp: StepInputs, tokens, logits, before, after) -> torch.Tensor | None:
    """The kernel through buffer-protocol views, every layout checked in C++; returns the
    rows' status codes when any row has a problem."""
    status = torch.empty(inp.batch, dtype=torch.int32)
    k = _new_kernel_params(inp.params)
    k.seed = inp.seed or 0
    problems = _C.step(
        _buffer(inp.logits_real),
        _buffer(inp.logits_noised),
        _DTYPE_NAMES[inp.logits_real.dtype],
        _buffer(inp.verdict),
        _buffer(inp.refusal_ids),
        tokens.numpy(),
        status.numpy(),
        k,
        logits=None if logits is None else logits.numpy(),
        mass_before=None if before is None else before.numpy(),
        mass_after=None if after is None else after.numpy(),
        num_threads=torch.get_num_threads(),
    )
    return status if problems else None
