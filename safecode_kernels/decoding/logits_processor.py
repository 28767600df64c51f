"""A Hugging Face ``LogitsProcessor`` that applies SafeCoDe when given the noised branch's logits."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..ops.step_pending import PendingStep, finish_step, launch_step
from ..params import SteeringParams
from ..refusal import RefusalVocabulary
from ..verdict import Verdict, as_verdict_tensor, parse_verdicts
from .host_to_device import to_device


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

    ``verdicts``: one per request (strings, :class:`Verdict` s, ints or an integer tensor
    ``[n]`` on any device), parsed and checked once, here (``ValueError`` for an unknown
    verdict, ``TypeError`` for a single verdict or another type). When ``generate`` expands
    each request into ``k`` consecutive rows (``num_return_sequences``, ``num_beams``:
    ``rows = k * n``), each verdict is repeated ``k`` times, as Hugging Face expands the
    inputs; any other row count raises ``ValueError``. The int8 verdict tensor of each
    ``(rows, device)`` is built once and reaches CUDA from pinned memory without a wait.

    Host reads per call (on CUDA each waits for the work queued so far, the forward included):

    - steered, the first call of a generation by its shape (other rows, a length other than
      the last call's plus one, another device, or after :meth:`reset`): one read, the step's
      row status words (none with the C++ CPU backend while every row is fine). The step runs
      without reading them (:func:`~safecode_kernels.ops.step_pending.launch_step`); after the
      read it raises the :class:`StepError`, or recomputes the rows Triton's merge flagged,
      exactly as ``safecode_step`` does.
    - steered, of a continuation's shape (same rows, one more column, same device): one read,
      the status words and the comparison of the prompt columns together. While the next step
      is still steered, a continuation and a new generation of that shape are steered alike
      (only the count differs), so the count is fixed after the read.
    - of a continuation's shape once a continuation passes through (its step would be
      ``>= steer_steps``): one read, the prompt comparison, before anything else; two when it
      finds a new generation (steered, so its status words are read too). This read cannot be
      left out or deferred: a new ``generate`` call whose prompt is exactly one column longer
      than the last call's input, with the same rows, has the shape of a continuation, only
      the values tell them apart, and it must be steered on this very call, with noised logits
      that a passed-through step does not have. (Hugging Face's ``generate`` waits for each
      step once itself, in its stopping check: this read waits for the forward a little
      earlier, the stopping check then only for what was queued after it.)
    - ``steer_steps=0``: none; the scores are returned at once.

    More reads only where rows are recomputed or an error is raised, and on the refusal set's
    first use per vocabulary size and device (it builds its mask there, once).

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
        self._codes = verdict_codes(verdicts)
        self._verdicts_by_rows: dict[tuple[int, torch.device], torch.Tensor] = {}
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
        # (prompt comparison as a 0-d bool on the device, input_ids) of a steered call whose
        # count is not settled yet; the read of its step's status words settles it.
        self._unsettled: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def verdicts(self) -> tuple[Verdict, ...]:
        """The verdicts, one per request."""
        return tuple(Verdict(code) for code in self._codes)

    def set_noised_logits(self, logits: torch.Tensor) -> None:
        """The noised branch's next-token logits ``[rows, V]`` for the coming step."""
        self._noised = logits

    def reset(self) -> None:
        """Start a new generation (steer the first ``steer_steps`` calls again). Not needed
        between ``generate`` calls: a new generation is recognised from its inputs."""
        self.step, self._noised, self._prompt, self._length, self._unsettled = 0, None, None, 0, None

    def _start(self, input_ids: torch.Tensor) -> None:
        self.step, self._prompt = 0, input_ids.detach().clone()

    def _settle(self, same: bool | None = None) -> None:
        """Fix the count of the unsettled call: it stays a continuation when its prompt
        columns are ``same`` (read here when not given), else it starts a new generation."""
        if self._unsettled is None:
            return
        equal, input_ids = self._unsettled
        self._unsettled = None  # first: a read that fails leaves nothing stale
        if not (bool(equal) if same is None else same):
            self._start(input_ids)

    def _verdicts_on(self, rows: int, device: torch.device) -> torch.Tensor:
        """The int8 verdicts ``[rows]`` on ``device``, each repeated for its request's
        consecutive rows; built once per ``(rows, device)``."""
        key = (rows, device)
        verdicts = self._verdicts_by_rows.get(key)
        if verdicts is None:
            codes = self._codes
            n = len(codes)
            if n == 0 or rows % n:
                raise ValueError(
                    f"the scores have {rows} rows for {n} verdicts: expected one verdict per row, or per request "
                    f"when generate expands each request into k consecutive rows (num_return_sequences, num_beams)"
                )
            k = rows // n
            verdicts = to_device([code for code in codes for _ in range(k)], torch.int8, device)
            self._verdicts_by_rows[key] = verdicts
        return verdicts

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.steer_steps == 0:
            return scores
        rows, length = input_ids.shape
        prompt = self._prompt
        same_shape = (
            prompt is not None
            and length == self._length + 1
            and prompt.shape[0] == rows
            and prompt.device == input_ids.device
        )
        self._length = length
        if not same_shape:
            self._start(input_ids)
        elif self.step + 1 >= self.steer_steps:
            # A continuation passes through but a new generation is steered: compare now.
            if torch.equal(input_ids[:, : prompt.shape[1]], prompt):
                self.step += 1
                return scores
            self._start(input_ids)
        else:
            # Steered either way: counted as a continuation (the usual case) until the
            # comparison, made on the device, is read with the status words.
            self.step += 1
            self._unsettled = ((input_ids[:, : prompt.shape[1]] == prompt).all(), input_ids)
        try:
            pending = self._launch(input_ids, scores)
            words = self._read(pending.status)
        except BaseException:
            self._settle()  # the count does not wait for a step that failed
            raise
        _, logits, _ = finish_step(pending, words)  # raises the step's error, as safecode_step
        return logits.to(scores.dtype)

    def _launch(self, input_ids: torch.Tensor, scores: torch.Tensor) -> PendingStep:
        """The steered step, launched without a host read."""
        noised = self.noised_logits_fn(input_ids) if self.noised_logits_fn is not None else self._noised
        self._noised = None
        if noised is None:
            self._settle()
            raise ValueError(
                f"steered step {self.step}: no noised logits; pass noised_logits_fn or call set_noised_logits first"
            )
        noised = noised.to(device=scores.device, dtype=scores.dtype)
        verdicts = self._verdicts_on(scores.shape[0], scores.device)
        return launch_step(
            _unit_vocab_stride(scores),
            _unit_vocab_stride(noised),
            verdicts,
            self.refusal,
            self.params,
            None,
            self.backend,
            True,
            False,
        )

    def _read(self, status: torch.Tensor | None) -> list[int] | None:
        """The step's status words (``None`` when there are none), read on the host together
        with the unsettled call's prompt comparison, which then settles its count."""
        if self._unsettled is None:
            return None if status is None else status.tolist()
        if status is None:
            self._settle()
            return None
        equal = self._unsettled[0].reshape(1).to(device=status.device, dtype=status.dtype)
        *words, same = torch.cat([status, equal]).tolist()
        self._settle(bool(same))
        return words


def _unit_vocab_stride(logits: torch.Tensor) -> torch.Tensor:
    # As the step's full checks would make it (its fast path takes unit vocabulary stride).
    return logits if logits.dim() != 2 or logits.stride(1) == 1 else logits.contiguous()


def verdict_codes(verdicts) -> list[int]:
    """One verdict per request as the kernel's codes (+1 unsafe, -1 safe, 0 none), from a
    sequence of strings, :class:`Verdict` s or ints, or a 1-D integer tensor (on any device:
    read once here). Raises ``TypeError`` for a single verdict, another type or a non-integer
    tensor, ``ValueError`` for an unknown verdict or a tensor that is not 1-D."""
    if isinstance(verdicts, (str, bytes, int)):  # a Verdict is an int too
        raise TypeError(f"verdicts must hold one verdict per request (a list or a tensor), got {verdicts!r}")
    if isinstance(verdicts, torch.Tensor):
        if verdicts.dim() != 1:
            raise ValueError(f"verdicts must be a 1-D tensor [n], one per request, got shape {list(verdicts.shape)}")
        # The step op's own checks (dtype, values), once.
        return as_verdict_tensor(verdicts, verdicts.shape[0], verdicts.device).tolist()
    if not isinstance(verdicts, Sequence):
        raise TypeError(
            f"verdicts must hold one verdict per request (a list or a tensor), got {type(verdicts).__name__}"
        )
    return [int(verdict) for verdict in parse_verdicts(verdicts)]


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
