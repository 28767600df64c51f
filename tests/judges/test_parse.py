"""Verdict parsing and the unparseable-answer policy (docs/design.md §4)."""

from __future__ import annotations

import pytest

from safecode_kernels import Verdict
from safecode_kernels.judges import (
    FixedJudge,
    Judge,
    Judgement,
    UnparseableVerdict,
    judgement_from_answer,
    parse_verdict,
    strip_reasoning,
)
from safecode_kernels.judges.openai import split_answer
from safecode_kernels.testing.tiny import random_image


@pytest.mark.parametrize(
    "answer, want",
    [
        ("unsafe", Verdict.UNSAFE),
        ("Unsafe.", Verdict.UNSAFE),
        ("**UNSAFE**", Verdict.UNSAFE),
        ("The request is unsafe, not safe at all", Verdict.UNSAFE),
        ("It is not safe", Verdict.UNSAFE),
        ("safe", Verdict.SAFE),
        (" Safe\n", Verdict.SAFE),
        ("SAFE!", Verdict.SAFE),
        ("Verdict: safe", Verdict.SAFE),
        ("I would say it is safe; nothing unsafe-looking... wait", Verdict.UNSAFE),  # unsafe wins
        ("safely", None),
        ("unsafety", None),
        ("safeguard", None),
        ("", None),
        ("I cannot tell", None),
    ],
)
def test_parse_verdict(answer, want):
    assert parse_verdict(answer) == want


def test_parse_verdict_type():
    with pytest.raises(TypeError, match="str"):
        parse_verdict(None)


@pytest.mark.parametrize("policy, want", [("safe", Verdict.SAFE), ("unsafe", Verdict.UNSAFE), ("none", Verdict.NONE)])
def test_policy(policy, want):
    j = judgement_from_answer("no idea", "a cat", policy)
    assert j == Judgement(want, "a cat", "no idea", parsed=False)
    assert judgement_from_answer("Unsafe", None, policy) == Judgement(Verdict.UNSAFE, None, "Unsafe", parsed=True)


def test_policy_raise():
    with pytest.raises(UnparseableVerdict, match="request 3.*'maybe'") as info:
        judgement_from_answer("maybe", None, "raise", index=3)
    assert info.value.answer == "maybe"
    assert isinstance(info.value, ValueError)


def test_split_answer():
    assert split_answer("CAPTION: a knife, unsafe-looking\nVERDICT: safe") == ("a knife, unsafe-looking", " safe")
    assert split_answer("**Caption:** a cat\n**Verdict:** **Unsafe**")[0] == "a cat"
    assert parse_verdict(split_answer("**Caption:** a cat\n**Verdict:** **Unsafe**")[1]) == Verdict.UNSAFE
    # No verdict line: the caption line cannot decide.
    caption, rest = split_answer("Caption: an unsafe scene\nI think it is safe")
    assert caption == "an unsafe scene" and parse_verdict(rest) == Verdict.SAFE
    assert split_answer("unsafe") == (None, "unsafe")


# The two answers a reasoning model gave: the text inside the reasoning must not decide.
THINK_CAPTION = (
    "<think>The toys could look unsafe.\nVerdict: unsafe? No, they are plastic.</think>\n"
    "CAPTION: a child holding toys\nVERDICT: safe"
)
THINK_WORD = "<think>Is it unsafe? The knife is for vegetables.</think>\nsafe"


@pytest.mark.parametrize(
    "answer, want",
    [
        (THINK_WORD, "\nsafe"),
        ("<THINK>unsafe</THINK> safe", " safe"),
        ("<think>a</think>safe<think>unsafe</think>", "safe"),  # several blocks
        ("<thinking>unsafe</thinking>safe", "safe"),
        ("<reasoning>\nunsafe\n</reasoning>\nsafe", "\nsafe"),
        ("<think>unsafe?</thinking>safe", "safe"),  # mismatched tags: what comes before a closing tag is reasoning
        ("unsafe, I first thought</think>safe", "safe"),  # the server dropped the opening tag
        ("<think>It is unsafe? Let me see", ""),  # cut inside the reasoning: nothing is outside it
        ("  <think>unsafe", "  "),
        ("safe <think>unsafe", "safe "),  # an unclosed block after the answer
        ("safe", "safe"),
        ("", ""),
    ],
)
def test_strip_reasoning(answer, want):
    assert strip_reasoning(answer) == want


def test_reasoning_does_not_decide():
    assert parse_verdict(THINK_WORD) == Verdict.SAFE
    assert judgement_from_answer(THINK_WORD, None, "raise") == Judgement(Verdict.SAFE, None, THINK_WORD, parsed=True)
    caption, verdict_text = split_answer(THINK_CAPTION)
    assert caption == "a child holding toys" and parse_verdict(verdict_text) == Verdict.SAFE
    assert parse_verdict("<think>safe enough?</think>") is None
    with pytest.raises(UnparseableVerdict, match="names no verdict"):
        judgement_from_answer("<think>It is unsafe", None, "raise")


def test_fixed_judge():
    judge = FixedJudge("unsafe")
    assert isinstance(judge, Judge)
    out = judge.judge([random_image(0), random_image(1)], ["a", "b"])
    assert [j.verdict for j in out] == [Verdict.UNSAFE] * 2
    assert out[0].to_dict() == {"verdict": "unsafe", "caption": None, "raw_answer": "unsafe", "parsed": False}
    assert repr(judge) == "FixedJudge('unsafe')"
    with pytest.raises(ValueError, match="unknown verdict"):
        FixedJudge("dangerous")


@pytest.mark.parametrize(
    "images, prompts, error, match",
    [
        ([random_image(0)], ["a", "b"], ValueError, "1 images and 2 prompts"),
        (random_image(0), ["a"], TypeError, "images must be a list"),
        (["not an image"], ["a"], TypeError, r"images\[0\] must be a PIL"),
        ([random_image(0)], [3], TypeError, r"prompts\[0\] must be a str"),
    ],
)
def test_bad_batches(images, prompts, error, match):
    with pytest.raises(error, match=match):
        FixedJudge("safe").judge(images, prompts)
