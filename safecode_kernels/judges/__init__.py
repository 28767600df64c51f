"""Judges (docs/design.md §4): where the scene-level verdict of each request comes from.

Every judge has ``judge(images, prompts) -> list[Judgement]`` (one per request, in order):

- :class:`FixedJudge`: the verdict the caller already knows;
- :class:`SelfJudge`: the loaded model captions the image, then answers a one-word
  safe/unsafe question through its chat template (no extra weights);
- :class:`OpenAIJudge`: any OpenAI-compatible chat-completions server, key from the
  environment only, with timeouts and bounded retries (through :class:`ChatClient`, the one
  chat-completions client on the official ``openai`` client, which the evaluation's scorer
  uses too).

An answer that names no verdict follows a policy: ``"safe"`` by default (as in the authors'
released code), or ``"unsafe"``, ``"none"``, ``"raise"``. A reasoning model's reasoning
(``<think>...</think>`` and the like) is left out before an answer is read (:func:`strip_reasoning`).

``SelfJudge`` and ``OpenAIJudge`` also offer ``flow="released"``, the two-call flow of the
authors' released code (a caption call, then a text-only few-shot verdict call); its texts are
in :mod:`safecode_kernels.judges.released_flow`.

Example::

    from safecode_kernels.judges import SelfJudge
    judgements = SelfJudge(model, processor).judge(images, prompts)
    result = decoder.generate(images, prompts, [j.verdict for j in judgements])
"""

from .base import (
    POLICIES,
    Judge,
    JudgeError,
    Judgement,
    UnparseableVerdict,
    judgement_from_answer,
    parse_verdict,
    strip_reasoning,
)
from .chat_client import ChatClient, JudgeConnectionError, JudgeHTTPError, JudgeResponseError, JudgeTimeout
from .fixed import FixedJudge
from .openai import OpenAIJudge, image_data_url
from .self_judge import SelfJudge

__all__ = [
    "POLICIES",
    "ChatClient",
    "FixedJudge",
    "Judge",
    "JudgeConnectionError",
    "JudgeError",
    "JudgeHTTPError",
    "JudgeResponseError",
    "JudgeTimeout",
    "Judgement",
    "OpenAIJudge",
    "SelfJudge",
    "UnparseableVerdict",
    "image_data_url",
    "judgement_from_answer",
    "parse_verdict",
    "strip_reasoning",
]
