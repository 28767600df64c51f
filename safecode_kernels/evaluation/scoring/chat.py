"""The scorer's judge: the chat-completions client of the judges layer, and what stands in for it.

:class:`ChatClient` is :class:`safecode_kernels.judges.ChatClient`, the one OpenAI-compatible
client (it also carries :class:`~safecode_kernels.judges.OpenAIJudge`'s requests): key read from
the environment at each call, never stored or shown; bounded retries; the error classes
:class:`JudgeHTTPError`, :class:`JudgeTimeout`, :class:`JudgeConnectionError`,
:class:`JudgeResponseError`.

Anything with ``complete(messages) -> str`` can stand in for it (:class:`Completer`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from safecode_kernels.judges.chat_client import ChatClient


@runtime_checkable
class Completer(Protocol):
    """What the scorer needs from a judge: ``complete(messages) -> str``, the raw answer to one
    conversation in OpenAI chat format (``[{"role": "user", "content": ...}, ...]``, images as
    ``image_url`` parts holding data URLs). It may be called from several threads at once."""

    def complete(self, messages: list[dict]) -> str: ...


__all__ = ["ChatClient", "Completer"]
