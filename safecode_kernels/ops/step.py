"""``safecode_step``: one steered decoding step for a batch (docs/design.md §2), on any backend."""

from __future__ import annotations

import dataclasses

import torch

from ..params import SteeringParams
from ..refusal import RefusalVocabulary
from ..verdict import as_verdict_tensor
from .step_inputs import check_logits, refusal_mask_and_ids, seed_from
from .step_op import OP_NAME, op_scalars, run_step


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """What :func:`safecode_step` returns.

    ``tokens``: ``[B]`` int64, the chosen token per row.
    ``logits``: ``[B, V]`` float32 modulated logits (before temperature), or ``None``.
    ``refusal_mass``: ``(before, after)``, each ``[B]`` float32, the probability mass of the
    refusal set under ``softmax(z)`` before and after the bias; or ``None``.
    """

    tokens: torch.Tensor
    logits: torch.Tensor | None = None
    refusal_mass: tuple[torch.Tensor, torch.Tensor] | None = None


def safecode_step(
    logits_real: torch.Tensor,
    logits_noised: torch.Tensor,
    verdict,
    refusal,
    params: SteeringParams | None = None,
    generator: torch.Generator | int | None = None,
    backend: str = "auto",
    return_logits: bool = False,
    return_stats: bool = False,
) -> StepOutput:
    """Contrast two logit rows, bias the refusal tokens by verdict, and choose a token.

    Args:
        logits_real: ``[B, V]`` next-token logits with the real image (fp32, fp16 or bf16).
        logits_noised: ``[B, V]`` logits with the noised image, same dtype and device.
        verdict: int8 ``[B]`` (+1 unsafe, -1 safe, 0 none) or a sequence of
            ``"unsafe" | "safe" | "none"`` / :class:`Verdict`.
        refusal: a :class:`RefusalVocabulary`, sorted unique int64 ids, or a bool mask ``[V]``.
        params: :class:`SteeringParams` (default: SafeCoDe as the paper describes it, with the released
            code's alpha, alpha_safe and k; greedy).
        generator: seed or ``torch.Generator`` for sampling; ``None`` uses torch's default.
        backend: ``"auto" | "torch" | "cpu" | "triton"``; ``SAFECODE_BACKEND`` overrides ``auto``.
        return_logits: also return the modulated logits ``[B, V]`` (fp32).
        return_stats: also return the refusal mass before and after the bias.

    Under ``torch.compile`` this is one call of the registered op ``safecode_kernels::step``
    (:mod:`.step_op`; ``fullgraph=True`` works). There, pass ``generator`` as an int seed or
    ``None`` (a ``torch.Generator`` costs a graph break); the outputs carry no gradient there.

    Example::

        >>> import torch, safecode_kernels as sk
        >>> real, noised = torch.randn(2, 1000), torch.randn(2, 1000)
        >>> out = sk.safecode_step(real, noised, ["unsafe", "safe"], torch.tensor([3, 17]),
        ...                        sk.SteeringParams(), return_stats=True)
        >>> out.tokens.shape
        torch.Size([2])
    """
    if params is None:
        params = _DEFAULT_PARAMS
    if torch.compiler.is_compiling():
        # Traced by torch.compile: one call of the registered op (no graph break).
        return _call_op(
            logits_real, logits_noised, verdict, refusal, params, generator, backend, return_logits, return_stats
        )
    # Eager: the op's implementation without the dispatcher's per-call overhead; one event
    # named after the op in profiles, as the compiled call is.
    args = (logits_real, logits_noised, verdict, refusal, params, generator, backend, return_logits, return_stats)
    if torch.autograd._profiler_enabled():
        with torch.profiler.record_function(OP_NAME):
            tokens, logits, stats = run_step(*args)
    else:
        tokens, logits, stats = run_step(*args)
    return StepOutput(tokens, logits, stats)


# Shared (it is frozen): a fresh one per call would be validated on every step, and the
# kernels' caches of converted parameters key on the object.
_DEFAULT_PARAMS = SteeringParams()


def _call_op(logits_real, logits_noised, verdict, refusal, params, generator, backend, return_logits, return_stats):
    """``safecode_step`` as torch.compile traces it: the Python-level arguments become
    tensors and scalars, and the op checks the data (only what is known while tracing is
    checked here, with the errors of the eager path)."""
    check_logits(logits_real, logits_noised)
    if not isinstance(params, SteeringParams):
        raise TypeError(f"params must be a SteeringParams, got {type(params).__name__}")
    batch, vocab = logits_real.shape
    device = logits_real.device
    if not isinstance(verdict, torch.Tensor):
        verdict = as_verdict_tensor(verdict, batch, device)
    if isinstance(refusal, RefusalVocabulary):
        # Its ids are sorted, unique and >= 0; the op checks them against V and builds the mask.
        refusal = refusal.ids.to(device)
    elif isinstance(refusal, (list, tuple)):
        refusal = torch.tensor(refusal, dtype=torch.int64)
    elif not isinstance(refusal, torch.Tensor):
        refusal_mask_and_ids(refusal, vocab, device)  # raises the eager path's TypeError
    # -1: the op draws a seed from torch's default generator (an explicit torch.Generator
    # cannot cross into the op: it costs a graph break; pass an int seed instead).
    seed = -1 if params.is_greedy or generator is None else seed_from(generator)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    tokens, logits, mass = torch.ops.safecode_kernels.step(
        logits_real,
        logits_noised,
        verdict,
        refusal,
        *op_scalars(params),
        seed,
        backend,
        bool(return_logits),
        bool(return_stats),
    )
    return StepOutput(
        tokens=tokens,
        logits=logits if return_logits else None,
        refusal_mass=(mass[0], mass[1]) if return_stats else None,
    )
