"""What the decoders return."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class SteeringRecord:
    """One steered step of one request: the chosen token and the refusal-set probability mass
    under ``softmax(z)`` before and after the verdict's modulation (what the steering did)."""

    step: int
    token: int
    refusal_mass_before: float
    refusal_mass_after: float
    #: What the recipe did: ``"bias"`` (the paper's additive bias), ``"forced"`` (a token of a
    #: refusal phrase, released recipe; the masses are NaN after the phrase's first token),
    #: ``"suppressed"`` or ``"boosted"`` (the released recipe's scaling of refusal tokens).
    action: str = "bias"
    #: The forced refusal phrase (released recipe, unsafe verdict), else ``None``.
    phrase: str | None = None


@dataclasses.dataclass
class GenerationResult:
    """The answers of a batch of requests, in request order.

    ``sequences[i]``: generated token ids of request ``i`` (with the EOS token if one ended it).
    ``texts[i]``: the decoded answer (special tokens skipped).
    ``steering[i]``: one :class:`SteeringRecord` per steered step.
    With ``return_logits=True`` (for tests and audits), per request, fp32 on the CPU:
    ``logits[i]`` ``[steps, V]`` the real branch's next-token logits at every step,
    ``noised_logits[i]`` ``[steered steps, V]`` the noised branch's, and
    ``steered_logits[i]`` ``[steered steps, V]`` the modulated logits the tokens were chosen from.
    ``stats``: counters of the run (forward calls, cache bytes before and after the noised
    rows were dropped, ...).
    ``errors[i]``: ``None``, or why request ``i`` ended early: a message naming the step and
    what went wrong (logits holding NaN or +inf, say after an fp16 overflow). Such a request
    ends alone at that step, its ``sequences[i]`` / ``texts[i]`` hold the tokens before it, and
    the other requests finish as they would without it; check ``errors`` before using an answer.
    """

    sequences: list[list[int]]
    texts: list[str]
    steering: list[list[SteeringRecord]]
    logits: list[torch.Tensor] | None = None
    noised_logits: list[torch.Tensor] | None = None
    steered_logits: list[torch.Tensor] | None = None
    stats: dict = dataclasses.field(default_factory=dict)
    errors: list[str | None] = dataclasses.field(default_factory=list)


class Recorder:
    """Collects tokens, steering records and (optionally) logits per request while decoding."""

    def __init__(self, batch: int, keep_logits: bool):
        self.sequences: list[list[int]] = [[] for _ in range(batch)]
        self.steering: list[list[SteeringRecord]] = [[] for _ in range(batch)]
        self.keep_logits = keep_logits
        self.errors: list[str | None] = [None] * batch
        self._logits = [[[] for _ in range(batch)] for _ in range(3)]

    def add(
        self,
        request: int,
        token: int,
        real=None,
        noised=None,
        steered=None,
        mass=None,
        action: str = "bias",
        phrase: str | None = None,
    ) -> None:
        step = len(self.sequences[request])
        self.sequences[request].append(int(token))
        if mass is not None:
            self.steering[request].append(
                SteeringRecord(step, int(token), float(mass[0]), float(mass[1]), action, phrase)
            )
        if self.keep_logits:
            for store, row in zip(self._logits, (real, noised, steered)):
                if row is not None:
                    store[request].append(row.detach().float().cpu())

    def fail(self, request: int, message: str) -> None:
        """Record why ``request`` ended early (its tokens so far stay)."""
        self.errors[request] = message

    def truncate(self, request: int, keep: int) -> None:
        """Forget every token of ``request`` from position ``keep`` on (and its records)."""
        del self.sequences[request][keep:]
        self.steering[request] = [r for r in self.steering[request] if r.step < keep]
        for store in self._logits:
            del store[request][keep:]

    def result(self, tokenizer, stats: dict) -> GenerationResult:
        texts = tokenizer.batch_decode(self.sequences, skip_special_tokens=True)
        stacked = [None] * 3
        if self.keep_logits:
            stacked = [[torch.stack(rows) if rows else torch.empty(0) for rows in store] for store in self._logits]
        return GenerationResult(self.sequences, texts, self.steering, *stacked, stats=stats, errors=self.errors)
