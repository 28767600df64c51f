"""The ``cpu`` backend of the step op: the launcher of the C++ kernel (csrc/step_cpu.cpp).

The kernel reads the logits in their own dtype through buffer views (no conversion copy),
runs with the GIL released, and reports problems per row, which become :class:`StepError`.
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


def _kernel_params(inp: StepInputs):
    p = inp.params
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
    k.seed = inp.seed or 0
    return k


def step_cpu(inp: StepInputs, return_logits: bool, return_stats: bool):
    """Returns ``(tokens [B] int64, logits [B, V] fp32 | None, (before, after) | None)``."""
    batch, vocab = inp.batch, inp.vocab
    tokens = torch.empty(batch, dtype=torch.int64)
    status = torch.empty(batch, dtype=torch.int32)
    logits = torch.empty(batch, vocab, dtype=torch.float32) if return_logits else None
    before = torch.empty(batch, dtype=torch.float32) if return_stats else None
    after = torch.empty(batch, dtype=torch.float32) if return_stats else None
    problems = _C.step(
        _buffer(inp.logits_real),
        _buffer(inp.logits_noised),
        _DTYPE_NAMES[inp.logits_real.dtype],
        _buffer(inp.verdict),
        _buffer(inp.refusal_ids),
        tokens.numpy(),
        status.numpy(),
        _kernel_params(inp),
        logits=None if logits is None else logits.numpy(),
        mass_before=None if before is None else before.numpy(),
        mass_after=None if after is None else after.numpy(),
        num_threads=torch.get_num_threads(),
    )
    if problems:
        raise_for_row_status(status)
    return tokens, logits, ((before, after) if return_stats else None)
