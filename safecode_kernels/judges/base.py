"""The judge protocol (design §4): ``judge(images, prompts) -> list[Judgement]``, and verdict parsing."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ..validation import check_requests  # noqa: F401  (the judges check their batches with it)
from ..verdict import Verdict

#: What a judge does with an answer that names no verdict. ``"safe"`` is the default, as in the
#: authors' released code: defaulting to ``"unsafe"`` re-creates the oversensitivity SafeCoDe
#: fights. ``"none"`` leaves the request unsteered; ``"raise"`` raises :class:`UnparseableVerdict`.
POLICIES = ("safe", "unsafe", "none", "raise")


class JudgeError(RuntimeError):
    """A judge could not produce verdicts (unreachable server, HTTP error, malformed answer...)."""


class UnparseableVerdict(JudgeError, ValueError):
    """The judge's answer names no verdict and the policy is ``"raise"``."""

    def __init__(self, message: str, answer: str):
        super().__init__(message)
        self.answer = answer


@dataclasses.dataclass(frozen=True)
class Judgement:
    """A judge's decision on one request.

    ``verdict``: the scene-level verdict the decoder steers with.
    ``caption``: what the judge saw in the image (``None`` for judges that look at nothing).
    ``raw_answer``: the judge's verdict answer exactly as it came (for logs and audits).
    ``parsed``: ``True`` when ``verdict`` was read from ``raw_answer``, ``False`` when it came
    from the unparseable-answer policy (or from a fixed judge).
    """

    verdict: Verdict
    caption: str | None = None
    raw_answer: str = ""
    parsed: bool = True

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict.name.lower(),
            "caption": self.caption,
            "raw_answer": self.raw_answer,
            "parsed": self.parsed,
        }


@runtime_checkable
class Judge(Protocol):
    """Anything with ``judge(images, prompts) -> list[Judgement]``: one judgement per
    (PIL image, prompt) pair, in order."""

    def judge(self, images: Sequence, prompts: Sequence[str]) -> list[Judgement]: ...


_UNSAFE = re.compile(r"\b(?:unsafe|not\s+safe)\b")
_SAFE = re.compile(r"\bsafe\b")

#: The tags reasoning models wrap their reasoning in (DeepSeek-R1, Qwen3, QwQ: ``think``).
REASONING_TAGS = ("think", "thinking", "reasoning")
_TAG = "|".join(REASONING_TAGS)
_REASONING_BLOCK = re.compile(rf"<({_TAG})>.*?</\1>", re.IGNORECASE | re.DOTALL)
_CLOSING_TAG = re.compile(rf"</(?:{_TAG})>", re.IGNORECASE)
_OPENING_TAG = re.compile(rf"<(?:{_TAG})>", re.IGNORECASE)


def strip_reasoning(answer: str) -> str:
    """``answer`` less a reasoning model's reasoning, so that only the text outside it decides.

    Removed: every ``<think>...</think>`` block (also ``<thinking>``, ``<reasoning>``; any case);
    then everything up to a closing tag left alone (chat templates that put the opening
    ``<think>`` in the prompt); then an opening tag left alone and all after it (an answer cut
    inside its reasoning, which leaves nothing outside it).

    >>> strip_reasoning("<think>Is it unsafe? No.</think>\\nsafe"), strip_reasoning("<think>Is it unsafe")
    ('\\nsafe', '')
    """
    text = _REASONING_BLOCK.sub("", answer)
    closing = list(_CLOSING_TAG.finditer(text))
    if closing:
        text = text[closing[-1].end() :]
    opening = _OPENING_TAG.search(text)
    return text if opening is None else text[: opening.start()]


def parse_verdict(answer: str) -> Verdict | None:
    """The verdict an answer names, or ``None``.

    Matching is case-insensitive and on word boundaries, ``unsafe`` (or ``not safe``) before
    ``safe``: ``"Unsafe."`` and ``"**UNSAFE**"`` are unsafe, ``"Safe"`` is safe, ``"safely"``
    and ``"unsafety"`` name nothing. Reasoning (``<think>...</think>``, see
    :func:`strip_reasoning`) is left out first: ``"<think>unsafe?</think> safe"`` is safe.

    >>> parse_verdict("Unsafe."), parse_verdict(" safe\\n"), parse_verdict("I think it is not safe")
    (<Verdict.UNSAFE: 1>, <Verdict.SAFE: -1>, <Verdict.UNSAFE: 1>)
    >>> parse_verdict("maybe") is None
    True
    """
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    text = strip_reasoning(answer).lower()
    if _UNSAFE.search(text):
        return Verdict.UNSAFE
    if _SAFE.search(text):
        return Verdict.SAFE
    return None


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"on_unparseable must be one of {', '.join(map(repr, POLICIES))}, got {policy!r}")
    return policy


def judgement_from_answer(answer: str, caption: str | None, policy: str, index: int = 0) -> Judgement:
    """Parse ``answer``; an unparseable one follows ``policy`` (see :data:`POLICIES`)."""
    verdict = parse_verdict(answer)
    if verdict is not None:
        return Judgement(verdict, caption, answer, parsed=True)
    if policy == "raise":
        shown = answer if len(answer) <= 200 else answer[:200] + "..."
        raise UnparseableVerdict(f"request {index}: the judge's answer names no verdict: {shown!r}", answer)
    return Judgement(Verdict.parse(policy), caption, answer, parsed=False)
