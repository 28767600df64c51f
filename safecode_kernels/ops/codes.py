"""The integers that cross from Python into the kernels, named once for every backend.

The C++ kernel (csrc/step_cpu.h) has the same values as C++ enums and exports them from the
extension (``_C.ROW_STATUS``, ``_C.VERDICT``, ``_C.DTYPES``); tests/ops/test_codes.py checks
that both sides agree, so they cannot drift. The Triton kernels (step_triton_kernels.py) take
their ``tl.constexpr`` copies from here.
"""

from __future__ import annotations

import enum

from ..verdict import Verdict

__all__ = ["FALLBACK_FLAG", "STATUS_MASK", "RowStatus", "Scope", "SensitiveSet", "Verdict", "sensitive_set"]


class RowStatus(enum.IntEnum):
    """What a backend reports for each row of a step: 0, or the first problem found, in this
    order (every backend checks in this order, so they report the same one)."""

    OK = 0
    REAL_NOT_FINITE = 1  # NaN or +inf in logits_real (-inf means banned and is allowed)
    NOISED_NOT_FINITE = 2  # NaN or +inf in logits_noised
    ALL_BANNED_CONTRAST = 3  # every token is -inf after the contrast and the cutoff
    OVERFLOW_CONTRAST = 4  # the contrast overflowed float32
    ALL_BANNED_BIAS = 5  # every token is -inf after the refusal bias
    OVERFLOW_BIAS = 6  # the refusal bias overflowed float32


# The Triton merge kernel's per-row word: a RowStatus in the low byte, plus this flag for rows
# its candidates could not decide exactly (the launcher recomputes them).
FALLBACK_FLAG = 256
STATUS_MASK = FALLBACK_FLAG - 1


class Scope(enum.IntEnum):
    """``SteeringParams.scope`` as the ``scope`` argument of the ``safecode_kernels::step`` op."""

    SENSITIVE = 0  # bias the refusal tokens inside the sensitive top-k set
    ALL = 1  # bias every refusal token

    @classmethod
    def of(cls, scope: str) -> Scope:
        return cls[scope.upper()]


class SensitiveSet(enum.IntEnum):
    """Which refusal tokens get the bias in one step (the Triton merge kernel's ``sens``):
    the scope and ``sensitive_top_k`` against the vocabulary size, resolved on the host."""

    NONE = 0  # sensitive_top_k == 0: no token is sensitive
    ALL = 1  # scope "all", or sensitive_top_k >= V: every refusal token
    TOP_K = 2  # the refusal tokens among the top-k of the contrast


def sensitive_set(scope: str, sensitive_top_k: int, vocab: int) -> SensitiveSet:
    """The :class:`SensitiveSet` of a step."""
    if scope == "all" or sensitive_top_k >= vocab:
        return SensitiveSet.ALL
    return SensitiveSet.NONE if sensitive_top_k == 0 else SensitiveSet.TOP_K
