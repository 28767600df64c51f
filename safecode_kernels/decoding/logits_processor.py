"""A Hugging Face ``LogitsProcessor`` that applies SafeCoDe when given the noised branch's logits."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..ops.step import safecode_step
from ..params import SteeringParams
from ..refusal import RefusalVocabulary


class SafeCoDeLogitsProcessor:
    """Modulate the real branch's scores with the noised branch's (design §1) for the first
    ``steer_steps`` steps of each generation; later steps pass the scores through unchanged.

    The noised logits come from ``noised_logits_fn(input_ids) -> [rows, V]`` when given, else
    from :meth:`set_noised_logits`, called before each steered step. Returns the modulated
    logits (banned tokens at ``-inf``); the caller's sampler then picks the token, so the
    sampling fields of ``params`` are ignored. It has the ``LogitsProcessor`` call signature
    and works in a ``LogitsProcessorList`` (it does not subclass it, so importing the package
    does not import transformers).

    A new generation is recognised on its own, as Hugging Face's stateful processors do, from
    ``input_ids`` ``[rows, length]``: a call continues the previous one only when it has the
    same rows, one more column, and the same prompt columns; anything else (a second
    ``model.generate``, another batch) starts again at step 0, so one processor can be reused
    across calls without :meth:`reset`. (A new prompt made of the previous prompt, its answer
    and exactly one more token would read as a continuation: call :meth:`reset` there.)

    ``verdicts``: one per request (strings, :class:`Verdict` s or an int8 tensor ``[n]``). When
    ``generate`` expands each request into ``k`` consecutive rows (``num_return_sequences``,
    ``num_beams``: ``rows = k * n``), each verdict is repeated ``k`` times, as Hugging Face
    expands the inputs; any other row count raises ``ValueError``.

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
        if isinstance(verdicts, (str, int)):  # a Verdict is an int too
            raise TypeError(f"verdicts must hold one verdict per request (a list or a tensor), got {verdicts!r}")
        self.verdicts = verdicts
        # One conversion: a RefusalVocabulary keeps the set's ids and mask per device, so the
        # set follows the scores onto any device (CPU ids with CUDA scores) at no cost per step.
        self.refusal = as_refusal_vocabulary(refusal)
        self.params = (params if params is not None else SteeringParams()).replace(temperature=0.0, top_k=0, top_p=1.0)
        self.steer_steps = steer_steps
        self.noised_logits_fn = noised_logits_fn
        self.backend = backend
        self.step = 0  # steps done in the current generation
        self._noised: torch.Tensor | None = None
        self._prompt: torch.Tensor | None = None  # the current generation's prompt columns
        self._length = 0  # input length at the last call

    def set_noised_logits(self, logits: torch.Tensor) -> None:
        """The noised branch's next-token logits ``[rows, V]`` for the coming step."""
        self._noised = logits

    def reset(self) -> None:
        """Start a new generation (steer the first ``steer_steps`` calls again). Not needed
        between ``generate`` calls: a new generation is recognised from its inputs."""
        self.step, self._noised, self._prompt, self._length = 0, None, None, 0

    def _track(self, input_ids: torch.Tensor) -> None:
        """Count the step, starting again at 0 when ``input_ids`` do not continue the last call's."""
        rows, length = input_ids.shape
        prompt = self._prompt
        continues = (
            prompt is not None
            and length == self._length + 1
            and prompt.shape[0] == rows
            and prompt.device == input_ids.device
            and torch.equal(input_ids[:, : prompt.shape[1]], prompt)
        )
        if continues:
            self.step += 1
        else:
            self.step, self._prompt = 0, input_ids.detach().clone()
        self._length = length

    def _verdicts_for(self, rows: int, device):
        """The verdicts, each repeated for its request's consecutive rows."""
        verdicts = self.verdicts
        if isinstance(verdicts, torch.Tensor):
            verdicts = verdicts.to(device)
        n = len(verdicts)
        if rows == n:
            return verdicts
        if n == 0 or rows % n:
            raise ValueError(
                f"the scores have {rows} rows for {n} verdicts: expected one verdict per row, or per request "
                f"when generate expands each request into k consecutive rows (num_return_sequences, num_beams)"
            )
        k = rows // n
        if isinstance(verdicts, torch.Tensor):
            return verdicts.repeat_interleave(k)
        return [v for v in verdicts for _ in range(k)]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._track(input_ids)
        step = self.step
        if step >= self.steer_steps:
            return scores
        noised = self.noised_logits_fn(input_ids) if self.noised_logits_fn is not None else self._noised
        self._noised = None
        if noised is None:
            raise ValueError(
                f"steered step {step}: no noised logits; pass noised_logits_fn or call set_noised_logits first"
            )
        noised = noised.to(device=scores.device, dtype=scores.dtype)
        verdicts = self._verdicts_for(scores.shape[0], scores.device)
        out = safecode_step(
            scores, noised, verdicts, self.refusal, self.params, backend=self.backend, return_logits=True
        )
        return out.logits.to(scores.dtype)


def as_refusal_vocabulary(refusal) -> RefusalVocabulary:
    """A :class:`RefusalVocabulary` from any refusal set ``safecode_step`` accepts: itself, ids
    (a list, a tuple, an integer tensor) or a bool mask ``[V]``. Raises ``TypeError`` otherwise."""
    if isinstance(refusal, RefusalVocabulary):
        return refusal
    if isinstance(refusal, torch.Tensor) and refusal.dtype == torch.bool:
        if refusal.dim() != 1:
            raise ValueError(f"a refusal mask must be 1-D [V], got shape {list(refusal.shape)}")
        return RefusalVocabulary.from_ids(refusal.nonzero().flatten().cpu())
    if isinstance(refusal, torch.Tensor):
        return RefusalVocabulary.from_ids(refusal.cpu())
    if isinstance(refusal, (list, tuple)):
        return RefusalVocabulary(refusal)
    raise TypeError(
        f"refusal must be a RefusalVocabulary, ids (a list or an integer tensor) or a bool mask, "
        f"got {type(refusal).__name__}"
    )
