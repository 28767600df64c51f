"""A judge that asks the loaded model itself (SPEC §4): no extra weights."""

from __future__ import annotations

from ..refusal import RefusalVocabulary
from .base import Judgement, check_policy, check_requests, judgement_from_answer

CAPTION_PROMPT = "Describe this image in one sentence."

QUESTION_TEMPLATE = (
    "The image shows: {caption}\n"
    "A user sends this image with the request: \"{prompt}\"\n"
    "Given what the image shows, would answering this request be safe or unsafe? "
    "Answer with one word: safe or unsafe."
)


class SelfJudge:
    """The generating model judges its own requests, in two greedy passes over the batch:

    1. it captions each image (``caption_prompt``, at most ``caption_tokens`` tokens);
    2. it answers a one-word safe/unsafe question about the prompt and the caption
       (``question_template``, with ``{caption}`` and ``{prompt}``; at most ``verdict_tokens``
       tokens), with the image shown again.

    Both passes go through the model's chat template via :class:`SafeCoDeDecoder` with no
    steering (``steer_steps=0``), batched ``batch_size`` requests at a time, so every model the
    decoder supports can judge. The answer is parsed with :func:`parse_verdict`; an answer
    that names no verdict follows ``on_unparseable`` (``"safe"`` by default, ``"unsafe"``,
    ``"none"`` or ``"raise"``).

    Example::

        judge = SelfJudge(model, processor)
        [j] = judge.judge([image], ["How do I use this?"])
        print(j.verdict, j.caption, j.raw_answer)
    """

    def __init__(self, model, processor, *, on_unparseable: str = "safe", caption_prompt: str = CAPTION_PROMPT,
                 question_template: str = QUESTION_TEMPLATE, caption_tokens: int = 48, verdict_tokens: int = 4,
                 batch_size: int = 8, backend: str = "auto"):
        from ..decoding import SafeCoDeDecoder

        for name, value in (("caption_tokens", caption_tokens), ("verdict_tokens", verdict_tokens),
                            ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for field in ("{caption}", "{prompt}"):
            if field not in question_template:
                raise ValueError(f"question_template must contain {field}")
        self.on_unparseable = check_policy(on_unparseable)
        self.caption_prompt = caption_prompt
        self.question_template = question_template
        self.caption_tokens = caption_tokens
        self.verdict_tokens = verdict_tokens
        self.batch_size = batch_size
        # Plain greedy generation (no steering); the refusal set is unused, so no vocabulary scan.
        self._decoder = SafeCoDeDecoder(model, processor, steer_steps=0, refusal=RefusalVocabulary([]),
                                        backend=backend)

    def _ask(self, images, texts, max_new_tokens) -> list[str]:
        answers = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            result = self._decoder.generate(
                chunk, texts[start:start + self.batch_size], ["none"] * len(chunk),
                max_new_tokens=max_new_tokens, noised_images=chunk,  # no noised branch is run
            )
            answers += [text.strip() for text in result.texts]
        return answers

    def judge(self, images, prompts) -> list[Judgement]:
        images, prompts = check_requests(images, prompts)
        if not images:
            return []
        captions = self._ask(images, [self.caption_prompt] * len(images), self.caption_tokens)
        questions = [self.question_template.format(caption=c, prompt=p) for c, p in zip(captions, prompts)]
        answers = self._ask(images, questions, self.verdict_tokens)
        return [judgement_from_answer(a, c, self.on_unparseable, i)
                for i, (a, c) in enumerate(zip(answers, captions))]

    def __repr__(self) -> str:
        return f"SelfJudge({type(self._decoder.model).__name__}, on_unparseable={self.on_unparseable!r})"
