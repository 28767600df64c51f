"""What the decoder asks of a recipe at each step: the paper's recipe, and the interface.

The decoder owns the rows, the KV cache and the forwards; a *steering* object decides, per
request, whether the current step is steered (it then needs the paired real/noised rows),
forced (a token fixed in advance, one row) or plain (one row, ordinary decoding), and
chooses the steered tokens. :class:`PaperSteering` is SafeCoDe as the paper describes it;
``released.py`` holds the authors' released code's recipe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ..ops.step_pending import PendingStep
from ..params import SteeringParams
from .token_policy import Setup

STEER, FORCED, PLAIN = "steer", "forced", "plain"


@dataclasses.dataclass
class SteeredTokens:
    """The steered step's choice for ``R`` requests: ``tokens`` ``[R]`` int64; per request the
    refusal mass before/after the modulation, the action (``"bias"``, ``"forced"``,
    ``"suppressed"``, ``"boosted"``) and the forced phrase (or ``None``); ``logits`` ``[R, V]``
    fp32, what the tokens were chosen from (only when asked for). With ``pending`` (the step
    op launched, its status words not read yet), the tokens and the masses are its ``[R]``
    tensors on the logits' device, which the decoder reads with the step's other values.

    ``extra``: more tensors for the decoder to read in the same copy; with ``resolve``, the
    decoder passes it the tokens and ``extra`` as read (flat lists) and takes the tokens it
    returns (a recipe's host rules; it may fill ``phrases``)."""

    tokens: torch.Tensor
    mass_before: torch.Tensor
    mass_after: torch.Tensor
    actions: list[str]
    phrases: list[str | None]
    logits: torch.Tensor | None = None
    pending: PendingStep | None = None
    extra: list[torch.Tensor] = dataclasses.field(default_factory=list)
    resolve: Callable[[list, list], list[int]] | None = None


class PaperSteering:
    """SafeCoDe as the paper describes it: the first ``steer_steps`` tokens of every request
    come from the fused step op on its paired rows (:meth:`Setup.steer`), the rest are plain."""

    #: Columns a request may need beyond ``max_new_tokens`` (tokens dropped after steering).
    extra_columns = 0

    def __init__(self, setup: Setup):
        self.setup = setup

    def phase(self, request: int, tokens: list[int]) -> str:
        """``"steer"``, ``"forced"`` or ``"plain"``: what the next step of ``request`` is."""
        return STEER if len(tokens) < self.setup.steer_steps else PLAIN

    def steer(
        self,
        real: torch.Tensor,
        noised: torch.Tensor,
        requests: list[int],
        sequences: list[list[int]],
        return_logits: bool,
    ) -> SteeredTokens:
        """The steered tokens of ``requests`` from their ``real`` and ``noised`` rows
        ``[R, V]``, launched on the device: every recipe's ``steer`` reads nothing on the host
        and has no side effect (the decoder reads its tensors with the step's other values,
        and may launch it again without rows that turned out bad)."""
        pending = self.setup.steer_pending(real, noised, requests, return_logits)
        before, after = pending.stats
        return SteeredTokens(
            pending.tokens,
            before,
            after,
            ["bias"] * len(requests),
            [None] * len(requests),
            pending.logits if return_logits else None,
            pending,
        )

    def forced_token(self, request: int, tokens: list[int]) -> int:
        raise AssertionError("the paper's recipe forces no token")

    def observe(self, request: int, tokens: list[int], real: torch.Tensor) -> None:
        """The real logits row ``[V]`` the next token of ``request`` is chosen from."""

    def after_steering(self, request: int, tokens: list[int]) -> int | None:
        """Called once the last steered token of ``request`` is chosen: how many of its tokens
        to keep (``None``: all)."""
        return None

    def saved_logits(self, request: int, position: int) -> torch.Tensor:
        raise AssertionError("the paper's recipe keeps no logits")

    def plain_params(self, request: int) -> SteeringParams:
        return self.setup.plain_params

    def max_new_tokens(self, request: int, tokens: list[int]) -> int:
        return self.setup.requests[request].max_new_tokens
