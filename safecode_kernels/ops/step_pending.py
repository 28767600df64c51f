"""The step op for decoders: launched without a host sync, its row status words read later.

:func:`~safecode_kernels.safecode_step` reads every row's status word right after the kernels
(to raise :class:`StepError`), a blocking device-to-host copy on a GPU. A decoder reads the
step's tokens on the host anyway, so :func:`launch_step` leaves the words on the device, the
decoder reads them together with the tokens (one copy per step), and :func:`finish_step`
turns what it read into the public op's answer: the same tokens, or the same error.
"""

from __future__ import annotations

import dataclasses

import torch

from .codes import FALLBACK_FLAG, STATUS_MASK
from .dispatch import resolve_backend
from .step_inputs import StepInputs, fast_step_inputs, prepare_step_inputs, raise_for_row_status
from .step_triton import _fallback_rows


@dataclasses.dataclass
class PendingStep:
    """A launched step: ``tokens`` ``[B]`` int64, ``logits`` ``[B, V]`` fp32 or ``None``,
    ``stats`` ``(before, after)`` ``[B]`` fp32 or ``None``, all on the logits' device, and
    ``status`` ``[B]`` int32 status words (``codes.RowStatus``, ``| FALLBACK_FLAG`` from the
    Triton merge), or ``None`` when the backend already knows every row is fine."""

    inputs: StepInputs
    tokens: torch.Tensor
    logits: torch.Tensor | None
    stats: tuple[torch.Tensor, torch.Tensor] | None
    status: torch.Tensor | None
    return_logits: bool
    return_stats: bool


def launch_step(
    logits_real, logits_noised, verdict: torch.Tensor, refusal, params, generator, backend, return_logits, return_stats
) -> PendingStep:
    """The step op's work without its host reads: the arguments of ``safecode_step``, but
    ``verdict`` must be an int8 tensor of valid codes (+1, -1, 0), which is not checked here
    (a decoder builds it once from :class:`~safecode_kernels.Verdict` values). No error of the
    logits' values is raised here: pass the status words read on the host to :func:`finish_step`."""
    inputs = fast_step_inputs(logits_real, logits_noised, verdict, refusal, params, generator)
    if inputs is None:
        inputs = prepare_step_inputs(logits_real, logits_noised, verdict, refusal, params, generator)
    run = resolve_backend(backend, inputs.logits_real.device)
    tokens, logits, stats, status = run(inputs, return_logits, return_stats, False)
    return PendingStep(inputs, tokens, logits, stats, status, return_logits, return_stats)


def finish_step(pending: PendingStep, words: list[int] | None):
    """``(tokens, logits | None, (before, after) | None)`` of ``pending`` given its status
    words read on the host (``None`` when ``pending.status`` is ``None``), exactly as
    ``safecode_step`` returns them: raises the :class:`StepError` of the first problem in
    check order in the lowest row that has it; rows the Triton merge could not decide
    exactly are recomputed by the torch reference (rare; that costs more host syncs)."""
    if not words or not any(words):
        return pending.tokens, pending.logits, pending.stats
    status = torch.tensor(words, dtype=torch.int32)
    raise_for_row_status(status & STATUS_MASK)
    rows = (status & FALLBACK_FLAG).nonzero().flatten().to(pending.tokens.device)
    return _fallback_rows(
        pending.inputs,
        rows,
        pending.tokens,
        pending.logits,
        pending.stats,
        pending.return_logits,
        pending.return_stats,
    )
