"""The one OpenAI-compatible chat-completions client (design §4): the official API, a local vLLM,
Ollama or llama.cpp server, ...

:class:`~safecode_kernels.judges.OpenAIJudge` sends its caption/verdict requests through it, and
the evaluation's scorer its rubric questions. The HTTP work is the official ``openai`` client's:
its retries (a 408, 409, 429, 5xx, timeout or dropped connection is tried again, waiting what the
server's ``Retry-After`` / ``retry-after-ms`` asks, else an exponential backoff from 0.5 s up to
8 s), its timeouts and its pooled connections. What this module adds:

- the key is read from an environment variable at each call and sent in that request's header
  only (never taken as an argument, stored, printed, logged or put in an exception); a server
  that needs none (a local one) is called without an ``Authorization`` header when it is unset;
- the errors are this package's (:class:`JudgeHTTPError`, :class:`JudgeTimeout`,
  :class:`JudgeConnectionError`, :class:`JudgeResponseError`), naming the URL and the cause;
- a reasoning model that rejects ``temperature`` (o-series, GPT-5) or ``max_tokens`` (it wants
  ``max_completion_tokens``) is asked again without it, once, and the client remembers;
- a 404 from a base URL without ``/v1``, and an answer whose token budget went on reasoning,
  say so.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from .base import JudgeError, strip_reasoning

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)

#: The statuses the openai client tries again (its ``_should_retry``).
RETRIED_STATUSES = frozenset({408, 409, 429})

#: Request parameters a model may reject as unsupported, and what the request becomes without
#: them: ``temperature`` is left out (the model's default), ``max_tokens`` is sent as
#: ``max_completion_tokens`` (what the official API's reasoning models take).
ADAPTABLE_PARAMETERS = {"temperature": None, "max_tokens": "max_completion_tokens"}


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
    """The server's answer is not a usable chat-completions response (not JSON, no message
    content, or a token budget spent before any answer)."""


class ChatClient:
    """Send conversations to an OpenAI-compatible ``/chat/completions`` endpoint; get the answer text.

    Args:
        base_url: the API root (``https://api.openai.com/v1``, ``http://localhost:8000/v1`` for
            vLLM...); a trailing ``/chat/completions`` is accepted too.
        model: the model name the server knows.
        api_key_env: the environment variable holding the key, read at each call; unset means no
            ``Authorization`` header (local servers), except for ``api.openai.com`` where it is an error.
        timeout: seconds to wait to connect, send, or for each part of the answer.
        max_retries: further attempts after a 408, 409, 429, 5xx, a timeout or a dropped
            connection, as the openai client makes them: after the wait the server's
            ``Retry-After`` or ``retry-after-ms`` asks (a longer one than the client accepts, two
            minutes in openai 3.57, is not retried), else after 0.5 s, 1 s, 2 s, ... (at most 8 s,
            less up to 25 % jitter). Other HTTP errors (400, 401, 404) and malformed answers fail
            at once.
        temperature, max_tokens: sent by :meth:`complete` when not ``None``. A model that rejects
            either as unsupported (HTTP 400 naming it) is asked again without ``temperature``, or
            with ``max_completion_tokens`` in place of ``max_tokens``; the client remembers and
            sends the request that way from then on (:attr:`rejected_parameters`).
        concurrency: requests in flight at once in :meth:`complete_many`.
        name: what error messages call the server's side (``"<name> at <url>"``).

    Raises (from :meth:`complete` and :meth:`send`): :class:`JudgeHTTPError` (``status`` set),
    :class:`JudgeTimeout`, :class:`JudgeConnectionError`, :class:`JudgeResponseError`, or
    :class:`JudgeError` for a missing key; messages name the URL and the cause, never the key,
    and hold no reference to the request (whose headers carry it). ``ValueError`` for bad arguments.

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
        concurrency: int = 8,
        name: str = "chat judge",
    ):
        if not isinstance(base_url, str) or not base_url.strip():
            raise ValueError("base_url must be a non-empty URL such as http://localhost:8000/v1")
        root = base_url.strip().rstrip("/").removesuffix("/chat/completions").rstrip("/")
        parts = urllib.parse.urlsplit(root)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http(s) URL with a host, got {base_url!r}")
        if not isinstance(model, str) or not model:
            raise ValueError("model must be a non-empty string")
        if not isinstance(api_key_env, str) or not api_key_env:
            raise ValueError("api_key_env must name an environment variable")
        if isinstance(timeout, bool) or not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        for label, value, low in (("max_retries", max_retries, 0), ("concurrency", concurrency, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{label} must be an int >= {low}, got {value!r}")
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
        ):
            raise ValueError(f"max_tokens must be None or an int >= 1, got {max_tokens!r}")
        self.base_url = root
        self.url = root + "/chat/completions"
        self._host = parts.hostname
        self._has_v1 = "v1" in parts.path.split("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.concurrency = concurrency
        self.name = name
        self._rejected: set[str] = set()
        self._client = None
        self._lock = threading.Lock()
        self._attempts = threading.local()  # HTTP requests made by this thread's current call

    def missing_key(self) -> str | None:
        """Why no request can succeed for want of a key (the OpenAI API with the environment
        variable ``api_key_env`` unset or empty), or ``None``; other servers may need none."""
        if not os.environ.get(self.api_key_env) and self._host.endswith("api.openai.com"):
            return f"{self.url} needs an API key: set the environment variable {self.api_key_env}"
        return None

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

    @property
    def rejected_parameters(self) -> frozenset[str]:
        """The parameters (``"temperature"``, ``"max_tokens"``) the model rejected as unsupported,
        which this client no longer sends (see the class)."""
        with self._lock:
            return frozenset(self._rejected)

    # ----- public calls -------------------------------------------------------------------------
    def complete(self, messages: list[dict]) -> str:
        """The answer text to one conversation (thread-safe). See the class for the errors."""
        _check_messages(messages)
        body = {"model": self.model, "messages": messages}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return self.send(body, budget_hint="raise max_tokens (ChatClient(max_tokens=...))")

    def complete_many(self, conversations: Sequence[list[dict]], concurrency: int | None = None) -> list[str]:
        """The answers to several conversations, in order, at most ``concurrency`` (default: the
        client's) in flight. The first error is raised once the requests in flight are done."""
        return map_in_order(self.complete, conversations, concurrency or self.concurrency)

    def send(self, body: dict, context: str | None = None, budget_hint: str = "raise max_tokens") -> str:
        """The answer text to one request ``body`` (``model``, ``messages``, ...) as given, less
        the parameters the model rejected (see the class), with the class's key handling,
        retries and errors (thread-safe). ``context`` names the request in error messages
        (``"<name> at <url> (<context>): ..."``); ``budget_hint`` ends the message of an answer
        whose token budget ran out before any text (which option to raise)."""
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) or "messages" not in body:
            raise ValueError("body must be a dict with 'model' (a str) and 'messages'")
        key = os.environ.get(self.api_key_env) or None
        problem = self.missing_key()
        if problem is not None:
            raise JudgeError(problem)
        where = f"{self.name} at {self.url}" + (f" ({context})" if context else "")
        while True:
            request = self._adapted(body)
            response, failure = self._post(request, key, where)
            if failure is None:
                return _answer_text(response, where, request, budget_hint, key)
            rejected = failure.rejected if isinstance(failure, _Rejected) else None
            if rejected is None:
                raise failure  # raised here, outside any handler, so it holds no openai error (nor its request)
            # Each pass sends one parameter fewer, so this ends.
            with self._lock:
                if rejected not in self._rejected:
                    self._rejected.add(rejected)
                    log.warning("%s: the model rejects %s; sent without it from now on", where, rejected)

    # ----- HTTP ---------------------------------------------------------------------------------
    def _adapted(self, body: dict) -> dict:
        body = dict(body)
        with self._lock:
            rejected = self._rejected & body.keys()
        for parameter in rejected:
            value = body.pop(parameter)
            if ADAPTABLE_PARAMETERS[parameter] is not None:
                body.setdefault(ADAPTABLE_PARAMETERS[parameter], value)
        return body

    def _openai(self):
        import openai

        with self._lock:
            if self._client is None:
                self._client = openai.OpenAI(
                    # A placeholder: the real key goes into each request's headers (see _post), so
                    # that the client object never holds it.
                    api_key="unused",
                    base_url=self.base_url,
                    timeout=self.timeout,
                    max_retries=self.max_retries,
                    http_client=openai.DefaultHttpxClient(event_hooks={"request": [self._count_attempt]}),
                )
            return self._client

    def _count_attempt(self, request) -> None:
        self._attempts.count = getattr(self._attempts, "count", 0) + 1

    def _post(self, body: dict, key: str | None, where: str):
        """``(raw response, None)`` of a 2xx answer, or ``(None, the JudgeError to raise)``."""
        import openai

        client = self._openai()
        headers = {"Authorization": f"Bearer {key}" if key else openai.Omit()}
        extra = {name: value for name, value in body.items() if name not in ("model", "messages")}
        self._attempts.count = 0
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=body["model"], messages=body["messages"], extra_body=extra, extra_headers=headers
            )
            return raw.http_response, None
        except openai.APIStatusError as err:
            return None, self._status_error(err, body, key, where)
        except openai.APITimeoutError:
            problem, error = f"no answer within the {self.timeout:g} s timeout", JudgeTimeout
        except openai.APIConnectionError as err:
            cause = err.__cause__ or err
            problem, error = f"cannot reach the server ({type(cause).__name__}: {cause})", JudgeConnectionError
        except openai.OpenAIError as err:
            problem, error = f"{type(err).__name__}: {err}", JudgeError
        return None, error(_redact(f"{where}: {problem}{self._gave_up()}", key))

    def _status_error(self, err, body: dict, key: str | None, where: str) -> JudgeError:
        response = err.response
        status = response.status_code
        problem = f"HTTP {status} {response.reason_phrase}: {_excerpt(response.text)}"
        if status == 400:
            rejected = _rejected_parameter(err, body)
            if rejected is not None:
                return _Rejected(rejected)
        elif status == 401:
            problem += (
                f" (the key comes from the environment variable {self.api_key_env}, which "
                f"{'is set' if key else 'is not set'})"
            )
        elif status == 404 and not self._has_v1:
            problem += f" (the base URL {self.base_url} has no /v1 path: did you mean {self.base_url}/v1?)"
        if status in RETRIED_STATUSES or status >= 500:
            wait = _retry_after(response.headers)
            not_retried = self._attempts.count == 1 and self.max_retries > 0 and wait is not None and wait > 0
            if not_retried and response.headers.get("x-should-retry") != "false":
                problem += (
                    f" (the server asks to wait {wait:g} s before a retry, longer than the openai client "
                    "waits: not retried)"
                )
            else:
                problem += self._gave_up()
        return JudgeHTTPError(_redact(f"{where}: {problem}", key), status)

    def _gave_up(self) -> str:
        count = getattr(self._attempts, "count", 1)
        return f" (gave up after {count} attempt{'s' if count > 1 else ''})"


class _Rejected(JudgeError):
    """Not raised: :meth:`ChatClient._post` says that the model rejected a parameter."""

    def __init__(self, rejected: str):
        super().__init__(rejected)
        self.rejected = rejected


def _rejected_parameter(err, body: dict) -> str | None:
    """The parameter of ``body`` that a 400 answer rejects as unsupported, or ``None``: the
    answer says "unsupported" (its ``code`` or its message) and names the parameter (its
    ``param``, or its message when it has no ``param``). A bad value ("temperature must be at
    most 2") is not unsupported."""
    info = err.body if isinstance(err.body, dict) else {}
    param = info.get("param")
    message = str(info.get("message") or err.message or "").lower()
    unsupported = info.get("code") in ("unsupported_value", "unsupported_parameter") or any(
        words in message for words in ("unsupported", "not supported", "does not support")
    )
    if not unsupported:
        return None
    for parameter in ADAPTABLE_PARAMETERS:
        if parameter in body and (param == parameter or (param is None and re.search(rf"\b{parameter}\b", message))):
            return parameter
    return None


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


def _answer_text(response, where: str, request: dict, budget_hint: str, key: str | None) -> str:
    """The answer text of a 2xx chat-completions response; its errors never echo the key."""
    try:
        return _message_text(response, where, request, budget_hint)
    except JudgeResponseError as exc:  # its excerpt of the body could echo the key
        raise JudgeResponseError(_redact(str(exc), key)) from None


def _message_text(response, where: str, request: dict, budget_hint: str) -> str:
    try:
        body = json.loads(response.text)
    except ValueError:
        raise JudgeResponseError(
            f"{where}: malformed answer: the body is not JSON: {_excerpt(response.text)}"
        ) from None
    try:
        choice = body["choices"][0]
        message = choice["message"]
        content = message.get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise JudgeResponseError(
            f"{where}: malformed answer: no choices[0].message in {_excerpt(response.text)}"
        ) from None
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if content is None and isinstance(message.get("refusal"), str):
        content = message["refusal"]  # the model declined: its words are the answer (they name no verdict)
    # Servers with a reasoning parser put the reasoning beside the content (vLLM, DeepSeek:
    # reasoning_content; others: reasoning). It is read for this message only, never parsed.
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if choice.get("finish_reason") == "length" and (content is None or not strip_reasoning(str(content)).strip()):
        limit = next((f"{p}={request[p]}" for p in ("max_tokens", "max_completion_tokens") if p in request), None)
        budget = f" ({limit})" if limit else ""
        if reasoning or (isinstance(content, str) and content.strip()):
            raise JudgeResponseError(
                f"{where}: the model spent its whole token budget{budget} reasoning and gave no answer "
                f"(finish_reason 'length'): {budget_hint}"
            )
        raise JudgeResponseError(
            f"{where}: the answer was cut at the token limit{budget} before any answer "
            f"(finish_reason 'length'): {budget_hint}"
        )
    if not isinstance(content, str):
        only = " (the model gave only reasoning_content, no answer)" if reasoning else ""
        raise JudgeResponseError(
            f"{where}: malformed answer: choices[0].message.content is not text{only}: {_excerpt(response.text)}"
        )
    return content


def _retry_after(headers) -> float | None:
    """The wait in seconds a ``retry-after-ms`` or ``Retry-After`` (seconds) header asks, as the
    openai client reads them (for the message of an answer it did not retry)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            return float(headers[name]) * scale
        except (KeyError, ValueError):
            continue
    return None


def _excerpt(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    if not text:
        return "(empty body)"
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _redact(text: str, key: str | None) -> str:
    return text.replace(key, "***") if key else text


__all__ = [
    "ADAPTABLE_PARAMETERS",
    "ChatClient",
    "JudgeConnectionError",
    "JudgeHTTPError",
    "JudgeResponseError",
    "JudgeTimeout",
    "map_in_order",
]
