"""Steering parameters of the fused step op (docs/design.md §1-§2) and their presets."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Literal

Scope = Literal["sensitive", "all"]


def probability_weights_to_logit_biases(boost_weight: float, suppress_weight: float) -> tuple[float, float]:
    """Convert the released code's probability-space weights to additive logit biases.

    Reweighting ``p[r] * (1 + beta)`` (unsafe) or ``p[r] * (1 - gamma)`` (safe) and
    renormalising is exactly a logit bias of ``log(1 + beta)`` or ``log(1 - gamma)``.
    Returns ``(boost, suppress)`` as :class:`SteeringParams` takes them: ``boost =
    log(1 + beta)`` and ``suppress = -log(1 - gamma)``, which is ``inf`` (the refusal
    tokens are banned) when ``gamma >= 1``.

    >>> probability_weights_to_logit_biases(1.0, 0.5)
    (0.6931471805599453, 0.6931471805599453)
    """
    for name, value in (("boost_weight", boost_weight), ("suppress_weight", suppress_weight)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (boost_weight >= 0.0 and math.isfinite(boost_weight)):
        raise ValueError(f"boost_weight (beta) must be a finite number >= 0, got {boost_weight}")
    if not suppress_weight >= 0.0:
        raise ValueError(f"suppress_weight (gamma) must be >= 0, got {suppress_weight}")
    boost = math.log1p(boost_weight)
    suppress = math.inf if suppress_weight >= 1.0 else -math.log1p(-suppress_weight)
    return boost, suppress


@dataclasses.dataclass(frozen=True)
class SteeringParams:
    """What one steered decoding step does (docs/design.md §2).

    Per row, ``z = real_weight * logits_real - alpha_v * logits_noised`` where ``alpha_v``
    is ``alpha`` for unsafe and ``none`` verdicts and ``alpha_safe`` for safe ones; then
    tokens with ``logits_real < log(plausibility) + max(logits_real)`` are banned when
    ``plausibility > 0``; refusal tokens inside the ``sensitive_top_k`` set (or all of them
    with ``scope="all"``) get ``+boost`` (unsafe) or ``-suppress`` (safe); finally a token
    is chosen greedily (``temperature == 0``) or sampled with temperature, top-k, top-p.
    ``sensitive_top_k = 0`` is an empty sensitive set (docs/design.md §2): with the default
    ``scope="sensitive"`` no refusal token is biased and only the contrast applies (the
    decoder's unsteered steps use it so); ``sensitive_top_k >= V`` takes every token.

    This is the paper's recipe (the additive bias inside the sensitive set, as the paper
    describes it). Its defaults ``alpha = 0.3``, ``alpha_safe = alpha / 2``,
    ``sensitive_top_k = 20`` are the released code's command-line values; ``boost = suppress
    = 1`` stand for its ``lambda = 1``. The released code's own decoding is
    :class:`~safecode_kernels.ReleasedRecipe`.
    """

    alpha: float = 0.3
    alpha_safe: float | None = None
    real_weight: float = 1.0
    plausibility: float = 0.0
    sensitive_top_k: int = 20
    scope: Scope = "sensitive"
    boost: float = 1.0
    suppress: float = 1.0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    # Whether alpha_safe was derived from alpha (so that replace(alpha=...) derives it again).
    _alpha_safe_derived: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_number("alpha", self.alpha, low=0.0)
        if self.alpha_safe is None:
            object.__setattr__(self, "alpha_safe", self.alpha * 0.5)
            object.__setattr__(self, "_alpha_safe_derived", True)
        _check_number("alpha_safe", self.alpha_safe, low=0.0)
        _check_number("real_weight", self.real_weight, low=0.0, low_open=True)
        _check_number("plausibility", self.plausibility, low=0.0, high=1.0)
        _check_int("sensitive_top_k", self.sensitive_top_k)
        _check_int("top_k", self.top_k)
        if self.scope not in ("sensitive", "all"):
            raise ValueError(f"scope must be 'sensitive' or 'all', got {self.scope!r}")
        # boost may be any finite number; suppress may be +inf (the refusal tokens are banned).
        _check_number("boost", self.boost)
        if isinstance(self.suppress, bool) or not isinstance(self.suppress, numbers.Real):
            raise TypeError(f"suppress must be a number, got {type(self.suppress).__name__}")
        if math.isnan(self.suppress) or self.suppress == -math.inf:
            raise ValueError(f"suppress must be a number or +inf, got {self.suppress!r}")
        _check_number("temperature", self.temperature, low=0.0)
        _check_number("top_p", self.top_p, low=0.0, low_open=True, high=1.0)

    # ----- presets ---------------------------------------------------------------------
    @classmethod
    def vcd(cls, alpha: float = 1.0, beta: float = 0.1, **overrides) -> SteeringParams:
        """Visual Contrastive Decoding: ``(1 + alpha) * zr - alpha * zn`` with the
        plausibility cutoff ``beta`` and no refusal bias."""
        fields = dict(
            alpha=alpha, alpha_safe=alpha, real_weight=1.0 + alpha, plausibility=beta, boost=0.0, suppress=0.0
        )
        return cls(**{**fields, **overrides})

    @classmethod
    def cfg(cls, scale: float = 1.5, **overrides) -> SteeringParams:
        """Classifier-free guidance between two prompts: ``scale * z_cond - (scale - 1) * z_uncond``."""
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 1.0):
            raise ValueError(f"cfg scale must be a finite number >= 1, got {scale!r}")
        fields = dict(alpha=scale - 1.0, alpha_safe=scale - 1.0, real_weight=float(scale), boost=0.0, suppress=0.0)
        return cls(**{**fields, **overrides})

    @classmethod
    def with_probability_weights(cls, boost_weight: float, suppress_weight: float, **overrides) -> SteeringParams:
        """Build params from the released code's probability-space weights ``beta``
        (``p * (1 + beta)`` for unsafe) and ``gamma`` (``p * (1 - gamma)`` for safe)."""
        boost, suppress = probability_weights_to_logit_biases(boost_weight, suppress_weight)
        return cls(**{"boost": boost, "suppress": suppress, **overrides})

    def replace(self, **changes) -> SteeringParams:
        """A copy with some fields changed (validated again). A default ``alpha_safe``
        follows a changed ``alpha``."""
        if self._alpha_safe_derived and "alpha" in changes and "alpha_safe" not in changes:
            changes["alpha_safe"] = None
        return dataclasses.replace(self, **changes)

    # ----- what the kernels consume -------------------------------------------------
    @property
    def bias_unsafe(self) -> float:
        return float(self.boost)

    @property
    def bias_safe(self) -> float:
        return -float(self.suppress)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def _check_number(name, value, low=None, high=None, low_open=False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


def _check_int(name, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
