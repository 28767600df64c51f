"""``safecode_step``: one steered decoding step for a batch (SPEC §2), on any backend."""

from __future__ import annotations

import dataclasses

import torch

from .dispatch import resolve_backend
from ..params import SteeringParams
from .step_inputs import prepare_step_inputs


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
        params: :class:`SteeringParams` (defaults: the authors' released settings, greedy).
        generator: seed or ``torch.Generator`` for sampling; ``None`` uses torch's default.
        backend: ``"auto" | "torch" | "cpu" | "triton"``; ``SAFECODE_BACKEND`` overrides ``auto``.
        return_logits: also return the modulated logits ``[B, V]`` (fp32).
        return_stats: also return the refusal mass before and after the bias.

    Example::

        >>> import torch, safecode_kernels as sk
        >>> real, noised = torch.randn(2, 1000), torch.randn(2, 1000)
        >>> out = sk.safecode_step(real, noised, ["unsafe", "safe"], torch.tensor([3, 17]),
        ...                        sk.SteeringParams(), return_stats=True)
        >>> out.tokens.shape
        torch.Size([2])
    """
    if params is None:
        params = SteeringParams()
    inputs = prepare_step_inputs(logits_real, logits_noised, verdict, refusal, params, generator)
    run = resolve_backend(backend, inputs.logits_real.device)
    tokens, logits, stats = run(inputs, return_logits, return_stats)
    return StepOutput(tokens=tokens, logits=logits, refusal_mass=stats)
