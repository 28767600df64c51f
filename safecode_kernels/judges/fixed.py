"""A judge that always gives the same verdict (the caller already knows it)."""

from __future__ import annotations

from ..verdict import Verdict
from .base import Judgement, check_requests


class FixedJudge:
    """Every request gets ``verdict`` (``"unsafe"``, ``"safe"``, ``"none"`` or a :class:`Verdict`).

    >>> from safecode_kernels.judges import FixedJudge
    >>> FixedJudge("unsafe").judge([], [])
    []
    """

    def __init__(self, verdict="none"):
        self.verdict = Verdict.parse(verdict)

    def judge(self, images, prompts) -> list[Judgement]:
        images, prompts = check_requests(images, prompts)
        return [Judgement(self.verdict, None, self.verdict.name.lower(), parsed=False) for _ in images]

    def __repr__(self) -> str:
        return f"FixedJudge({self.verdict.name.lower()!r})"
