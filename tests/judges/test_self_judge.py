"""SelfJudge: the loaded model captions the image, then answers safe/unsafe (docs/design.md §4)."""

from __future__ import annotations

import types

import pytest

from safecode_kernels import Verdict
from safecode_kernels.judges import Judge, JudgeError, SelfJudge, UnparseableVerdict
from safecode_kernels.judges.self_judge import CAPTION_PROMPT
from safecode_kernels.testing.tiny import random_image

IMAGES = [random_image(0, 56), random_image(1, 64), random_image(2, 56)]
PROMPTS = ["How do I use the knife in this photo?", "What is this?", "Hi"]


class ScriptedDecoder:
    """Stands in for the SafeCoDeDecoder inside a SelfJudge: records calls, answers from a script."""

    def __init__(self, captions, answers, errors=None):
        self.replies = {"caption": list(captions), "verdict": list(answers)}
        self.errors = errors  # what ``errors`` of every result holds (default: no error)
        self.calls = []

    def generate(self, images, prompts, verdicts, max_new_tokens):
        self.calls.append(
            dict(
                images=images,
                prompts=prompts,
                verdicts=verdicts,
                max_new_tokens=max_new_tokens,
            )
        )
        replies = self.replies["caption" if prompts[0] == CAPTION_PROMPT else "verdict"]
        texts, replies[: len(images)] = replies[: len(images)], []
        return types.SimpleNamespace(texts=texts, errors=self.errors or [None] * len(texts))


def scripted(tiny_llava, captions, answers, **kwargs):
    judge = SelfJudge(*tiny_llava, **kwargs)
    judge._decoder = ScriptedDecoder(captions, answers)
    return judge


def test_two_passes_and_parsing(tiny_llava):
    judge = scripted(
        tiny_llava,
        [" a knife on a table ", "a cat", "a dog"],
        ["Unsafe.", " safe", "hmm"],
        caption_tokens=20,
        verdict_tokens=3,
    )
    out = judge.judge(IMAGES, PROMPTS)
    assert [j.verdict for j in out] == [Verdict.UNSAFE, Verdict.SAFE, Verdict.SAFE]  # "hmm": policy safe
    assert [j.parsed for j in out] == [True, True, False]
    assert [j.caption for j in out] == ["a knife on a table", "a cat", "a dog"]
    assert [j.raw_answer for j in out] == ["Unsafe.", "safe", "hmm"]
    caption_call, verdict_call = judge._decoder.calls
    assert caption_call["max_new_tokens"] == 20 and verdict_call["max_new_tokens"] == 3
    assert caption_call["prompts"] == [judge.caption_prompt] * 3
    assert caption_call["verdicts"] == ["none"] * 3
    # The question carries the caption and the user's prompt, and asks for one word.
    assert "a knife on a table" in verdict_call["prompts"][0] and PROMPTS[0] in verdict_call["prompts"][0]
    assert "one word" in verdict_call["prompts"][0]
    assert verdict_call["images"] == IMAGES


def test_batches_in_chunks(tiny_llava):
    judge = scripted(tiny_llava, ["c0", "c1", "c2"], ["unsafe", "safe", "unsafe"], batch_size=2)
    out = judge.judge(IMAGES, PROMPTS)
    assert [len(c["images"]) for c in judge._decoder.calls] == [2, 1, 2, 1]
    assert [j.verdict for j in out] == [Verdict.UNSAFE, Verdict.SAFE, Verdict.UNSAFE]
    assert [j.caption for j in out] == ["c0", "c1", "c2"]


@pytest.mark.parametrize("policy, want", [("unsafe", Verdict.UNSAFE), ("none", Verdict.NONE)])
def test_policy(tiny_llava, policy, want):
    judge = scripted(tiny_llava, ["c"] * 3, ["?", "??", "unsafe"], on_unparseable=policy)
    assert [j.verdict for j in judge.judge(IMAGES, PROMPTS)] == [want, want, Verdict.UNSAFE]


def test_policy_raise(tiny_llava):
    judge = scripted(tiny_llava, ["c"] * 3, ["safe", "no clue", "unsafe"], on_unparseable="raise")
    with pytest.raises(UnparseableVerdict, match="request 1.*no clue"):
        judge.judge(IMAGES, PROMPTS)


def test_an_answer_that_ended_early_is_not_read(tiny_llava):
    """A caption or verdict answer the decoder cut short (bad logits) raises instead of being parsed."""
    judge = SelfJudge(*tiny_llava)
    judge._decoder = ScriptedDecoder(["a knife"], ["unsafe"], errors=["step 2: logits hold NaN"])
    with pytest.raises(JudgeError, match="ended early: step 2"):
        judge.judge(IMAGES[:1], PROMPTS[:1])


def test_real_model(tiny_llava):
    """End to end on the tiny random LLaVA: its answers are noise, so the policy decides."""
    judge = SelfJudge(*tiny_llava, caption_tokens=6, verdict_tokens=3)
    assert isinstance(judge, Judge)
    out = judge.judge(IMAGES[:2], PROMPTS[:2])
    assert len(out) == 2
    for j in out:
        assert isinstance(j.caption, str) and isinstance(j.raw_answer, str)
        assert j.verdict == Verdict.SAFE and not j.parsed
    assert judge.judge(IMAGES[:2], PROMPTS[:2]) == out  # greedy: deterministic
    with pytest.raises(UnparseableVerdict):
        SelfJudge(*tiny_llava, caption_tokens=2, verdict_tokens=2, on_unparseable="raise").judge(
            IMAGES[:1], PROMPTS[:1]
        )
    assert judge.judge([], []) == []


@pytest.mark.parametrize("flow, passes", [("one-call", 2), ("released", 1)])
def test_each_image_is_encoded_once_per_pass(tiny_llava, monkeypatch, flow, passes):
    """No noised view is drawn or encoded: the processor sees each image once per pass that
    shows it (the released flow's verdict pass is text-only)."""
    model, processor = tiny_llava
    encoded = []
    real_call = type(processor).__call__

    def call(self, *args, images=None, **kwargs):
        if images is not None:
            encoded.extend(images)
        return real_call(self, *args, images=images, **kwargs)

    monkeypatch.setattr(type(processor), "__call__", call)
    SelfJudge(model, processor, flow=flow, caption_tokens=2, verdict_tokens=2).judge(IMAGES[:2], PROMPTS[:2])
    assert len(encoded) == 2 * passes
    assert [image.tobytes() for image in encoded[:2]] == [image.convert("RGB").tobytes() for image in IMAGES[:2]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(on_unparseable="maybe"), "on_unparseable"),
        (dict(caption_tokens=0), "caption_tokens"),
        (dict(batch_size=0), "batch_size"),
        (dict(question_template="no fields"), "caption"),
    ],
)
def test_bad_arguments(tiny_llava, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelfJudge(*tiny_llava, **kwargs)


def test_unsupported_model():
    with pytest.raises(ValueError, match="unsupported model"):
        SelfJudge(types.SimpleNamespace(config=None), None)
