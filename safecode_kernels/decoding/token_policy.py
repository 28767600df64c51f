"""The per-step token policy of a prepared batch.

:class:`Setup`, what :func:`.requests.prepare` returns, holds the encoded requests and the
checked settings, and decides every step's tokens: a steered step goes through the fused step
op on the paired logits (:meth:`Setup.steer`), an unsteered one takes the real logits alone
(:meth:`Setup.choose`), the image placeholders are never generated, and :meth:`Setup.done`
says when a request has finished. Every decoder (the fused one, the baselines, the released
recipe's steering) runs its steps through it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from ..ops.step import safecode_step
from ..ops.step_pending import finish_step, launch_step
from ..params import SteeringParams
from ..refusal import RefusalVocabulary
from .adapters import ModelAdapter
from .host_to_device import to_device

if TYPE_CHECKING:
    from .requests import EncodedRequest


@dataclasses.dataclass
class Setup:
    """Everything a decoding loop needs, checked once."""

    adapter: ModelAdapter
    tokenizer: object
    requests: list[EncodedRequest]
    refusal: RefusalVocabulary
    steer_params: SteeringParams  # the contrast, bias and sampling of steered steps
    plain_params: SteeringParams  # sampling only, for the unsteered steps
    steer_steps: int
    eos_ids: frozenset[int]
    pad_id: int
    generator: torch.Generator
    backend: str
    banned_ids: torch.Tensor  # the image/video placeholders: never generated

    def _banned_on(self, device) -> torch.Tensor:
        cache = self.__dict__.setdefault("_banned_by_device", {})
        ids = cache.get(device)
        if ids is None:
            ids = cache[device] = self.banned_ids.to(device)
        return ids

    def verdicts(self, requests: list[int], device) -> torch.Tensor:
        """The int8 verdicts ``[R]`` of ``requests`` on ``device``, built once per row set (a
        fresh tensor per step would cost a host-to-device copy and a check of its values);
        queued without a host sync (see ``host_to_device.py``)."""
        cache = self.__dict__.setdefault("_verdicts_by_rows", {})
        key = (tuple(requests), device)
        verdicts = cache.get(key)
        if verdicts is None:
            values = [int(self.requests[i].verdict) for i in requests]
            verdicts = cache[key] = to_device(values, torch.int8, device)
        return verdicts

    def _ban(self, real: torch.Tensor, noised: torch.Tensor):
        # A generated placeholder would be taken for an image slot by any later full forward.
        # -inf in the real row and 0 in the noised row keep the contrast -inf (not NaN).
        ids = self._banned_on(real.device)
        return real.index_fill(1, ids, float("-inf")), noised.index_fill(1, ids, 0.0)

    def done(self, request: int, tokens: list[int]) -> bool:
        """Whether request ``request`` has finished after generating ``tokens``."""
        return len(tokens) >= self.requests[request].max_new_tokens or (bool(tokens) and tokens[-1] in self.eos_ids)

    def steer(self, real: torch.Tensor, noised: torch.Tensor, requests: list[int], return_logits: bool):
        """One steered step for the rows of ``requests``: the fused op on the paired logits."""
        real, noised = self._ban(real, noised)
        return safecode_step(
            real,
            noised,
            self.verdicts(requests, real.device),
            self.refusal,
            self.steer_params,
            self.generator,
            self.backend,
            return_logits=return_logits,
            return_stats=True,
        )

    def choose(self, real: torch.Tensor, in_place: bool = False, params: SteeringParams | None = None) -> torch.Tensor:
        """An unsteered step: greedy or sampled tokens from the real logits alone (the step op
        with a zero contrast and no bias, so both phases sample the same way).

        Greedy steps take the argmax of the banned logits directly, which is what the step op
        computes for a zero contrast (ties: lowest index); a row whose best value is not finite
        (NaN, +inf, or every token banned) goes to the step op, which raises its error.
        ``in_place``: the placeholders may be banned in ``real`` itself. ``params``: the sampling
        (default ``plain_params``).
        """
        params = self.plain_params if params is None else params
        if params.is_greedy:
            ids = self._banned_on(real.device)
            banned = real.index_fill_(1, ids, float("-inf")) if in_place else real.index_fill(1, ids, float("-inf"))
            tokens = banned.argmax(-1)
            if bool(torch.isfinite(banned.gather(1, tokens[:, None])).all()):
                return tokens
        verdicts = self._zero_verdicts(real.shape[0], real.device)
        real, zeros = self._ban(real, torch.zeros_like(real))
        return safecode_step(real, zeros, verdicts, self.refusal, params, self.generator, self.backend).tokens

    def steer_pending(self, real: torch.Tensor, noised: torch.Tensor, requests: list[int], return_logits: bool):
        """:meth:`steer` without a host sync: a :class:`PendingStep` whose status words the
        caller reads with its tokens (see ``ops/step_pending.py``)."""
        real, noised = self._ban(real, noised)
        verdicts = self.verdicts(requests, real.device)
        return launch_step(
            real, noised, verdicts, self.refusal, self.steer_params, self.generator, self.backend, return_logits, True
        )

    def choose_pending(self, real: torch.Tensor, in_place: bool = False, params: SteeringParams | None = None):
        """:meth:`choose` without a host sync: ``(tokens [R] int64, status [R] int32 | None,
        finish)``, all on ``real``'s device; where the ``status`` words read on the host are not
        all zero, ``finish(words)`` gives the tokens :meth:`choose` would (or raises its error)."""
        params = self.plain_params if params is None else params
        if params.is_greedy:
            ids = self._banned_on(real.device)
            banned = real.index_fill_(1, ids, float("-inf")) if in_place else real.index_fill(1, ids, float("-inf"))
            tokens = banned.argmax(-1)
            # A row whose best value is not finite goes to the step op, which raises its error.
            status = (~torch.isfinite(banned.gather(1, tokens[:, None])[:, 0])).to(torch.int32)
            return tokens, status, lambda words: self.choose(banned, in_place=True, params=params)
        real, zeros = self._ban(real, torch.zeros_like(real))
        verdicts = self._zero_verdicts(real.shape[0], real.device)
        pending = launch_step(real, zeros, verdicts, self.refusal, params, self.generator, self.backend, False, False)
        return pending.tokens, pending.status, lambda words: finish_step(pending, words)[0]

    def _zero_verdicts(self, rows: int, device) -> torch.Tensor:
        cache = self.__dict__.setdefault("_zero_verdicts_by_rows", {})
        key = (rows, device)
        if key not in cache:
            cache[key] = torch.zeros(rows, dtype=torch.int8, device=device)
        return cache[key]
