"""The one OpenAI-compatible chat-completions client (design §4): the official API, a local vLLM,
Ollama or llama.cpp server, ...

:class:`~safecode_kernels.judges.OpenAIJudge` sends its caption/verdict requests through it, and
the evaluation's scorer its rubric questions. The key is read from an environment variable at
each call (never taken as an argument, stored, printed, logged or put in an exception); a server
that needs none (a local one) is called without an ``Authorization`` header when the variable is
unset. Retries follow one rule: a 429, a 5xx, a timeout or a connection error is tried again,
waiting ``backoff * 2**attempt`` seconds (at most ``max_backoff``, or the server's
``Retry-After`` within that bound); other HTTP errors and malformed answers fail at once.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from .base import JudgeError

T = TypeVar("T")
R = TypeVar("R")


class JudgeHTTPError(JudgeError):
    """The server answered with an HTTP error status (``status`` holds it)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class JudgeTimeout(JudgeError):
    """The server did not answer within the timeout."""


class JudgeConnectionError(JudgeError):
    """The server could not be reached, or closed the connection without an answer."""


class JudgeResponseError(JudgeError):
    """The server's answer is not a chat-completions response (not JSON, or no message content)."""


class ChatClient:
    """Send conversations to an OpenAI-compatible ``/chat/completions`` endpoint; get the answer text.

    Args:
        base_url: the API root (``https://api.openai.com/v1``, ``http://localhost:8000/v1`` for
            vLLM...); ``/chat/completions`` is appended unless already there.
        model: the model name the server knows.
        api_key_env: the environment variable holding the key, read at each call; unset means no
            ``Authorization`` header (local servers), except for ``api.openai.com`` where it is an error.
        timeout: seconds to wait to connect, send, or for each part of the answer.
        max_retries: further attempts after a 429, a 5xx, a timeout or a connection error, waiting
            ``backoff * 2**attempt`` seconds (at most ``max_backoff``, or the server's ``Retry-After``
            within that bound). Other HTTP errors (400, 401, 404) and malformed answers fail at once.
        temperature, max_tokens: sent by :meth:`complete` when not ``None``.
        concurrency: requests in flight at once in :meth:`complete_many`.
        transport: an ``httpx`` transport (tests, proxies).
        name: what error messages call the server's side (``"<name> at <url>"``).

    Raises (from :meth:`complete` and :meth:`send`): :class:`JudgeHTTPError` (``status`` set),
    :class:`JudgeTimeout`, :class:`JudgeConnectionError`, :class:`JudgeResponseError`, or
    :class:`JudgeError` for a missing key; messages name the URL and the cause, never the key.
    ``ValueError`` for bad arguments.

    The HTTP connection pool is shared by all threads; :meth:`close` (or ``with``) releases it.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 2,
        temperature: float | None = 0.0,
        max_tokens: int | None = None,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        concurrency: int = 8,
        transport=None,
        name: str = "chat judge",
    ):
        import httpx

        if not isinstance(base_url, str) or not base_url.strip():
            raise ValueError("base_url must be a non-empty URL such as http://localhost:8000/v1")
        url = httpx.URL(base_url.strip().rstrip("/"))
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url must be an http(s) URL with a host, got {base_url!r}")
        if not isinstance(model, str) or not model:
            raise ValueError("model must be a non-empty string")
        if not isinstance(api_key_env, str) or not api_key_env:
            raise ValueError("api_key_env must name an environment variable")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        for label, value, low in (("max_retries", max_retries, 0), ("concurrency", concurrency, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{label} must be an int >= {low}, got {value!r}")
        for label, value in (("backoff", backoff), ("max_backoff", max_backoff)):
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"{label} must be a number of seconds >= 0, got {value!r}")
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
        ):
            raise ValueError(f"max_tokens must be None or an int >= 1, got {max_tokens!r}")
        self.base_url = str(url)
        self.url = self.base_url if self.base_url.endswith("/chat/completions") else self.base_url + "/chat/completions"
        self._host = url.host
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.concurrency = concurrency
        self.name = name
        self._transport = transport
        self._client = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ChatClient(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled HTTP connections (a later call opens new ones)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    # ----- public calls -------------------------------------------------------------------------
    def complete(self, messages: list[dict]) -> str:
        """The answer text to one conversation (thread-safe). See the class for the errors."""
        _check_messages(messages)
        body = {"model": self.model, "messages": messages}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return self.send(body)

    def complete_many(self, conversations: Sequence[list[dict]], concurrency: int | None = None) -> list[str]:
        """The answers to several conversations, in order, at most ``concurrency`` (default: the
        client's) in flight. The first error is raised once the requests in flight are done."""
        return map_in_order(self.complete, conversations, concurrency or self.concurrency)

    def send(self, body: dict, context: str | None = None) -> str:
        """The answer text to one request ``body`` exactly as given (``model``, ``messages``, ...),
        with the class's key handling, retries and errors (thread-safe); ``context`` names the
        request in error messages (``"<name> at <url> (<context>): ..."``)."""
        key = os.environ.get(self.api_key_env) or None
        if key is None and self._host.endswith("api.openai.com"):
            raise JudgeError(f"{self.url} needs an API key: set the environment variable {self.api_key_env}")
        return self._post(body, key, f"{self.name} at {self.url}" + (f" ({context})" if context else ""))

    # ----- HTTP ---------------------------------------------------------------------------------
    def _http(self):
        import httpx

        with self._lock:
            if self._client is None:
                self._client = httpx.Client(
                    timeout=httpx.Timeout(self.timeout), transport=self._transport, follow_redirects=False
                )
            return self._client

    def _post(self, body: dict, key: str | None, where: str) -> str:
        import httpx

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            retry_after, status = None, None
            try:
                response = self._http().post(self.url, json=body, headers=headers)
            except httpx.TimeoutException as exc:
                error, problem = JudgeTimeout, f"no answer within the {self.timeout:g} s timeout ({type(exc).__name__})"
            except httpx.TransportError as exc:
                error, problem = JudgeConnectionError, f"cannot reach the server ({type(exc).__name__}: {exc})"
            else:
                status = response.status_code
                if status < 400:
                    try:
                        return _answer_text(response, where)
                    except JudgeResponseError as exc:  # its excerpt of the body could echo the key
                        raise JudgeResponseError(_redact(str(exc), key)) from None
                problem = f"HTTP {status} {response.reason_phrase}: {_excerpt(response.text)}"
                if status != 429 and status < 500:  # the request itself is wrong: retrying cannot help
                    if status == 401:
                        problem += (
                            f" (the key comes from the environment variable {self.api_key_env}, which "
                            f"{'is set' if key else 'is not set'})"
                        )
                    raise JudgeHTTPError(_redact(f"{where}: {problem}", key), status) from None
                error, retry_after = JudgeHTTPError, _retry_after(response)
            if attempt + 1 < attempts:
                delay = min(self.max_backoff, self.backoff * 2**attempt)
                if retry_after is not None:
                    delay = min(self.max_backoff, max(delay, retry_after))
                time.sleep(delay)
        message = _redact(f"{where}: {problem} (gave up after {attempts} attempt{'s' if attempts > 1 else ''})", key)
        raise (JudgeHTTPError(message, status) if error is JudgeHTTPError else error(message)) from None


def map_in_order(function: Callable[[T], R], items: Iterable[T], concurrency: int) -> list[R]:
    """``[function(item) for item in items]``, at most ``concurrency`` calls at once (one item runs
    in the calling thread). The first error is raised once the calls in flight are done."""
    items = list(items)
    if len(items) <= 1:
        return [function(item) for item in items]
    pool = concurrent.futures.ThreadPoolExecutor(max(1, min(concurrency, len(items))))
    try:
        return [f.result() for f in [pool.submit(function, item) for item in items]]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {message!r:.200}")


def _answer_text(response, where: str) -> str:
    try:
        body = response.json()
    except ValueError:
        raise JudgeResponseError(
            f"{where}: malformed answer: the body is not JSON: {_excerpt(response.text)}"
        ) from None
    try:
        message = body["choices"][0]["message"]
        content = message.get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise JudgeResponseError(
            f"{where}: malformed answer: no choices[0].message in {_excerpt(response.text)}"
        ) from None
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if content is None and isinstance(message.get("refusal"), str):
        content = message["refusal"]  # the model declined: its words are the answer (they name no verdict)
    if not isinstance(content, str):
        raise JudgeResponseError(
            f"{where}: malformed answer: choices[0].message.content is not text: {_excerpt(response.text)}"
        )
    return content


def _retry_after(response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to the backoff


def _excerpt(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    if not text:
        return "(empty body)"
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _redact(text: str, key: str | None) -> str:
    return text.replace(key, "***") if key else text


__all__ = ["ChatClient", "JudgeConnectionError", "JudgeHTTPError", "JudgeResponseError", "JudgeTimeout", "map_in_order"]
