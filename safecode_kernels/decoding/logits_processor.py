"""A Hugging Face ``LogitsProcessor`` that applies SafeCoDe when given the noised branch's logits."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..ops.step import safecode_step
from ..params import SteeringParams


class SafeCoDeLogitsProcessor:
    """Modulate the real branch's scores with the noised branch's (design §1) for the first
    ``steer_steps`` calls; later calls pass the scores through unchanged.

    The noised logits come from ``noised_logits_fn(input_ids) -> [B, V]`` when given, else
    from :meth:`set_noised_logits`, called before each steered step. Returns the modulated
    logits (banned tokens at ``-inf``); the caller's sampler then picks the token, so the
    sampling fields of ``params`` are ignored. It has the ``LogitsProcessor`` call signature
    and works in a ``LogitsProcessorList`` (it does not subclass it, so importing the package
    does not import transformers).

    Example::

        proc = sk.SafeCoDeLogitsProcessor(["unsafe"], refusal, noised_logits_fn=run_noised_branch)
        out = model.generate(**inputs, logits_processor=LogitsProcessorList([proc]))
    """

    def __init__(
        self,
        verdicts,
        refusal,
        params: SteeringParams | None = None,
        steer_steps: int = 5,
        noised_logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        backend: str = "auto",
    ):
        if isinstance(steer_steps, bool) or not isinstance(steer_steps, int) or steer_steps < 0:
            raise ValueError(f"steer_steps must be an int >= 0, got {steer_steps!r}")
        self.verdicts = verdicts
        self.refusal = refusal
        self.params = (params if params is not None else SteeringParams()).replace(temperature=0.0, top_k=0, top_p=1.0)
        self.steer_steps = steer_steps
        self.noised_logits_fn = noised_logits_fn
        self.backend = backend
        self.step = 0
        self._noised: torch.Tensor | None = None

    def set_noised_logits(self, logits: torch.Tensor) -> None:
        """The noised branch's next-token logits ``[B, V]`` for the coming step."""
        self._noised = logits

    def reset(self) -> None:
        """Start a new generation (steer the first ``steer_steps`` calls again)."""
        self.step, self._noised = 0, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step, self.step = self.step, self.step + 1
        if step >= self.steer_steps:
            return scores
        noised = self.noised_logits_fn(input_ids) if self.noised_logits_fn is not None else self._noised
        self._noised = None
        if noised is None:
            raise ValueError(
                f"steered step {step}: no noised logits; pass noised_logits_fn or call set_noised_logits first"
            )
        noised = noised.to(device=scores.device, dtype=scores.dtype)
        verdicts = self.verdicts
        if isinstance(verdicts, torch.Tensor):
            verdicts = verdicts.to(scores.device)
        out = safecode_step(
            scores, noised, verdicts, self.refusal, self.params, backend=self.backend, return_logits=True
        )
        return out.logits.to(scores.dtype)
