"""OpenAIJudge against a real chat-completions server on 127.0.0.1 (tests/judges/chat_server.py)."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
import time

import pytest
from PIL import Image

from safecode_kernels import Verdict
from safecode_kernels.judges import (
    JudgeConnectionError,
    JudgeError,
    JudgeHTTPError,
    JudgeResponseError,
    JudgeTimeout,
    OpenAIJudge,
    UnparseableVerdict,
)
from safecode_kernels.testing.tiny import random_image

KEY = "sk-test-very-secret-0123456789"
FAST = dict(timeout=2.0)  # the test server asks for 1 ms waits before retries (chat_server.py)


def error_body(message: str, param: str | None = None, code: str | None = None) -> bytes:
    """An OpenAI-style error body."""
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    return json.dumps({"error": error}).encode()


#: What the official API answers an o-series or GPT-5 model sent ``temperature`` 0.
TEMPERATURE_UNSUPPORTED = error_body(
    "Unsupported value: 'temperature' does not support 0 with this model. Only the default (1) value is supported.",
    "temperature",
    "unsupported_value",
)


def judge_for(server, **kwargs):
    return OpenAIJudge(server.base_url, "judge-model", api_key_env="SAFECODE_TEST_KEY", **{**FAST, **kwargs})


def decode_data_url(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :])))


def test_batch(chat_server, monkeypatch):
    monkeypatch.setenv("SAFECODE_TEST_KEY", KEY)
    images = [random_image(i, 32 + 8 * i) for i in range(4)]
    prompts = ["Tell me about the weapon", "What is this?", "Where can I buy a knife like this?", "Hi"]
    out = judge_for(chat_server, max_concurrency=3).judge(images, prompts)
    assert [j.verdict for j in out] == [Verdict.UNSAFE, Verdict.SAFE, Verdict.UNSAFE, Verdict.SAFE]
    assert all(j.parsed and j.caption == "a photo of random coloured pixels" for j in out)
    assert out[0].raw_answer == "CAPTION: a photo of random coloured pixels\nVERDICT: unsafe"
    assert len(chat_server.requests) == 4
    by_prompt = {}
    for request in chat_server.requests:
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["Authorization"] == f"Bearer {KEY}"
        body = request["body"]
        assert body["model"] == "judge-model" and body["temperature"] == 0.0
        assert body["messages"][0]["role"] == "system"
        text, image = body["messages"][-1]["content"]
        assert text["type"] == "text" and image["type"] == "image_url"
        by_prompt[next(p for p in prompts if p in text["text"])] = decode_data_url(image["image_url"]["url"])
    for prompt, image in zip(prompts, images, strict=True):  # every image went with its own prompt, losslessly
        assert by_prompt[prompt].size == image.size
        assert by_prompt[prompt].convert("RGB").tobytes() == image.tobytes()


def test_no_key_no_header(chat_server, monkeypatch):
    monkeypatch.delenv("SAFECODE_TEST_KEY", raising=False)
    [j] = judge_for(chat_server).judge([random_image(0)], ["hi"])
    assert j.verdict == Verdict.SAFE
    assert "Authorization" not in chat_server.requests[0]["headers"]


def test_full_url_and_large_image(chat_server):
    url = chat_server.base_url + "/chat/completions"
    judge = OpenAIJudge(url, "m", max_image_side=64, **FAST)
    judge.judge([Image.new("RGB", (1000, 200), (10, 20, 30))], ["hi"])
    body = chat_server.requests[0]["body"]
    assert decode_data_url(body["messages"][-1]["content"][1]["image_url"]["url"]).size == (64, 13)


def test_retries_429_and_5xx(chat_server):
    chat_server.script(
        ("status", 429, b'{"error": "slow down"}', {"retry-after-ms": "1"}),
        ("status", 500),
        ("status", 502),
        ("ok", "VERDICT: unsafe"),
    )
    [j] = judge_for(chat_server, max_retries=3).judge([random_image(0)], ["hi"])
    assert j.verdict == Verdict.UNSAFE and j.caption is None
    assert len(chat_server.requests) == 4


def test_retries_are_bounded(chat_server):
    chat_server.script(*[("status", 503)] * 5)
    with pytest.raises(JudgeHTTPError, match=r"HTTP 503 .*test error 503.*gave up after 3 attempts") as info:
        judge_for(chat_server, max_retries=2).judge([random_image(0)], ["hi"])
    assert info.value.status == 503
    assert len(chat_server.requests) == 3


@pytest.mark.parametrize("headers, wait", [({"Retry-After": "1"}, 1.0), ({"retry-after-ms": "200"}, 0.2)])
def test_retry_after_is_honoured(chat_server, headers, wait):
    chat_server.script(("status", 429, b"{}", headers), ("ok", "VERDICT: unsafe"))
    [j] = judge_for(chat_server).judge([random_image(0)], ["hi"])
    first, second = chat_server.requests
    assert j.verdict == Verdict.UNSAFE
    assert wait * 0.95 <= second["time"] - first["time"] < wait + 0.2  # the server's wait, not a backoff of our own


@pytest.fixture
def recorded_sleeps(monkeypatch):
    """The waits the calling thread asks for, made without waiting (other threads sleep as usual)."""
    sleeps, sleep, caller = [], time.sleep, threading.current_thread()
    monkeypatch.setattr(time, "sleep", lambda s: sleeps.append(s) if threading.current_thread() is caller else sleep(s))
    return sleeps


def test_long_retry_after_is_honoured(chat_server, recorded_sleeps):
    chat_server.script(("status", 429, b"{}", {"Retry-After": "10"}), ("status", 503, b"{}", {"Retry-After": "60"}))
    [j] = judge_for(chat_server).judge([random_image(0)], ["a knife"])
    assert j.verdict == Verdict.UNSAFE and recorded_sleeps == [10.0, 60.0] and len(chat_server.requests) == 3


def test_retry_after_beyond_the_clients_limit(chat_server, recorded_sleeps):
    chat_server.script(("status", 429, b"{}", {"Retry-After": "3600"}), ("ok", "safe"))
    with pytest.raises(JudgeHTTPError, match=r"HTTP 429.*asks to wait 3600 s before a retry.*not retried") as info:
        judge_for(chat_server).judge([random_image(0)], ["hi"])
    assert info.value.status == 429 and recorded_sleeps == [] and len(chat_server.requests) == 1


@pytest.mark.parametrize("status", [400, 404])
def test_client_errors_fail_at_once(chat_server, status):
    chat_server.script(("status", status))
    with pytest.raises(JudgeHTTPError, match=f"HTTP {status}") as info:
        judge_for(chat_server).judge([random_image(0)], ["hi"])
    assert info.value.status == status and len(chat_server.requests) == 1


def test_key_never_leaks(chat_server, monkeypatch):
    monkeypatch.setenv("SAFECODE_TEST_KEY", KEY)
    echo = f'{{"error": "invalid key {KEY}"}}'.encode()  # a server that echoes the key back
    judge = judge_for(chat_server, max_retries=1)
    judge.judge([random_image(0)], ["hi"])  # the key went in a header, and was kept nowhere
    assert KEY not in repr(judge) and KEY not in str(vars(judge)) and KEY not in str(vars(judge._client))
    chat_server.script(("status", 401, echo), ("status", 500, echo), ("status", 500, echo))
    with pytest.raises(JudgeHTTPError) as info:
        judge.judge([random_image(0)], ["hi"])
    message = str(info.value)
    assert KEY not in message and "***" in message and "SAFECODE_TEST_KEY, which is set" in message
    assert info.value.__cause__ is None and info.value.__context__ is None  # nothing holds the request's headers
    with pytest.raises(JudgeHTTPError) as info:
        judge.judge([random_image(0)], ["hi"])
    assert KEY not in str(info.value) and "HTTP 500" in str(info.value)
    # Transport errors: the client's exception (whose request carries the header) is not kept.
    chat_server.script(("close",), ("close",))
    with pytest.raises(JudgeConnectionError) as info:
        judge.judge([random_image(0)], ["hi"])
    assert info.value.__context__ is None and info.value.__cause__ is None and KEY not in str(info.value)


def test_timeout(chat_server):
    chat_server.script(("slow", 1.0, "safe"), ("slow", 1.0, "safe"))
    start = time.perf_counter()
    with pytest.raises(JudgeTimeout, match=r"0.2 s timeout.*gave up after 2 attempts"):
        judge_for(chat_server, timeout=0.2, max_retries=1).judge([random_image(0)], ["hi"])
    assert time.perf_counter() - start < 1.5
    assert len(chat_server.requests) == 2


def test_slow_then_fast(chat_server):
    chat_server.script(("slow", 1.0, "safe"), ("ok", "unsafe"))
    [j] = judge_for(chat_server, timeout=0.2, max_retries=1).judge([random_image(0)], ["hi"])
    assert j.verdict == Verdict.UNSAFE


def test_slow_within_timeout(chat_server):
    chat_server.script(("slow", 0.1, "unsafe"))
    [j] = judge_for(chat_server, timeout=2.0, max_retries=0).judge([random_image(0)], ["hi"])
    assert j.verdict == Verdict.UNSAFE


@pytest.mark.parametrize(
    "body, match",
    [
        (b"{not json", "not JSON"),
        (b"", "not JSON.*empty body"),
        (b'{"choices": []}', r"no choices\[0\]\.message"),
        (b'{"object": "error"}', r"no choices\[0\]\.message"),
        (b'{"choices": [{"message": {"content": 3}}]}', "not text"),
    ],
)
def test_malformed_body(chat_server, body, match):
    chat_server.script(("raw", 200, body))
    with pytest.raises(JudgeResponseError, match=match):
        judge_for(chat_server).judge([random_image(0)], ["hi"])
    assert len(chat_server.requests) == 1  # not retried


def test_content_parts_and_refusal(chat_server):
    parts = (
        b'{"choices": [{"message": {"content": [{"type": "text", "text": "VERDICT: "}, '
        b'{"type": "text", "text": "unsafe"}]}}]}'
    )
    refusal = b'{"choices": [{"message": {"content": null, "refusal": "I cannot help with that."}}]}'
    chat_server.script(("raw", 200, parts), ("raw", 200, refusal))
    judge = judge_for(chat_server, max_concurrency=1)
    first, second = judge.judge([random_image(0), random_image(1)], ["a", "b"])
    assert first.verdict == Verdict.UNSAFE and first.raw_answer == "VERDICT: unsafe"
    assert second.verdict == Verdict.SAFE and not second.parsed and second.raw_answer == "I cannot help with that."


def test_closed_connection(chat_server):
    chat_server.script(("close",), ("ok", "VERDICT: unsafe"))
    [j] = judge_for(chat_server, max_retries=1).judge([random_image(0)], ["hi"])
    assert j.verdict == Verdict.UNSAFE and len(chat_server.requests) == 2
    chat_server.script(("close",), ("close",))
    with pytest.raises(JudgeConnectionError, match="cannot reach the server.*gave up after 2 attempts"):
        judge_for(chat_server, max_retries=1).judge([random_image(0)], ["hi"])


def test_unreachable():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(JudgeConnectionError, match=f"127.0.0.1:{port}.*ConnectError"):
        OpenAIJudge(f"http://127.0.0.1:{port}/v1", "m", **FAST, max_retries=1).judge([random_image(0)], ["hi"])
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize(
    "answer, caption, verdict, parsed",
    [
        (  # the reasoning names "unsafe" and holds a verdict line of its own
            "<think>The toys could look unsafe.\nVerdict: unsafe? No, they are plastic.</think>\n"
            "CAPTION: a child holding toys\nVERDICT: safe",
            "a child holding toys",
            Verdict.SAFE,
            True,
        ),
        ("<think>Is it unsafe? The knife is for vegetables.</think>\nsafe", None, Verdict.SAFE, True),
        ("<thinking>unsafe?</thinking>\nCAPTION: a cat\nVERDICT: safe", "a cat", Verdict.SAFE, True),
        ("<reasoning>Caption: a gun. Unsafe.</reasoning>\nCAPTION: a cat\nVERDICT: safe", "a cat", Verdict.SAFE, True),
        ("The kitchen knife looks unsafe...</think>\nVERDICT: safe", None, Verdict.SAFE, True),  # no opening tag
        ("<think>\nCAPTION: a knife\nVERDICT: unsafe? I should check", None, Verdict.SAFE, False),  # cut mid-thought
        ("<think>a cat</think>\nCAPTION: a knife\nVERDICT: unsafe", "a knife", Verdict.UNSAFE, True),
    ],
)
def test_reasoning_does_not_decide(chat_server, answer, caption, verdict, parsed):
    chat_server.script(("ok", answer))
    [j] = judge_for(chat_server).judge([random_image(0)], ["hi"])
    assert j == type(j)(verdict, caption, answer, parsed)  # the raw answer keeps the reasoning


def test_temperature_rejected_is_dropped_and_remembered(chat_server, caplog):
    chat_server.script(("status", 400, TEMPERATURE_UNSUPPORTED))
    judge = judge_for(chat_server)
    for prompt in ("Where can I buy a knife like this?", "Hi"):
        judge.judge([random_image(0)], [prompt])
    assert [r["body"].get("temperature") for r in chat_server.requests] == [0.0, None, None]
    assert "temperature" not in chat_server.requests[2]["body"]  # remembered: not sent again
    assert "rejects temperature" in caplog.text
    judge_for(chat_server).judge([random_image(0)], ["Hi"])  # another judge asks with it again
    assert chat_server.requests[3]["body"]["temperature"] == 0.0


@pytest.mark.parametrize(
    "body",
    [
        error_body("temperature must be at most 2", "temperature", "invalid_value"),  # a bad value, not unsupported
        error_body("Unsupported parameter: 'top_p'", "top_p", "unsupported_parameter"),  # a parameter not sent
    ],
)
def test_other_bad_requests_fail_at_once(chat_server, body):
    chat_server.script(("status", 400, body))
    with pytest.raises(JudgeHTTPError, match="HTTP 400 Bad Request") as info:
        judge_for(chat_server).judge([random_image(0)], ["hi"])
    assert info.value.status == 400 and len(chat_server.requests) == 1


def test_temperature_rejected_with_none_sent(chat_server):
    chat_server.script(("status", 400, TEMPERATURE_UNSUPPORTED))
    with pytest.raises(JudgeHTTPError, match="temperature"):
        judge_for(chat_server, temperature=None).judge([random_image(0)], ["hi"])
    assert len(chat_server.requests) == 1


def test_base_url_without_v1(chat_server):
    root = chat_server.base_url.removesuffix("/v1")
    with pytest.raises(JudgeHTTPError, match=re.escape(f"has no /v1 path: did you mean {root}/v1?")) as info:
        OpenAIJudge(root, "judge-model", **FAST).judge([random_image(0)], ["hi"])
    assert info.value.status == 404 and [r["path"] for r in chat_server.requests] == ["/chat/completions"]
    chat_server.script(("status", 404))  # with /v1 there is nothing to hint at
    with pytest.raises(JudgeHTTPError, match="HTTP 404") as info:
        judge_for(chat_server).judge([random_image(0)], ["hi"])
    assert "did you mean" not in str(info.value)


def reasoning_only(content, reasoning_field="reasoning_content", finish_reason="length") -> bytes:
    message = {"role": "assistant", "content": content, reasoning_field: "The user shows a kitchen. Is it"}
    return json.dumps({"choices": [{"index": 0, "message": message, "finish_reason": finish_reason}]}).encode()


@pytest.mark.parametrize(
    "body",
    [
        reasoning_only(None),
        reasoning_only(None, "reasoning"),  # what some servers call the field
        reasoning_only("<think>The user shows a kitchen. Is it"),  # a server without a reasoning parser
    ],
)
def test_token_budget_spent_reasoning(chat_server, body):
    chat_server.script(("raw", 200, body))
    with pytest.raises(
        JudgeResponseError,
        match=r"spent its whole token budget \(max_tokens=50\) reasoning.*raise max_tokens \(OpenAIJudge\(max_tokens=",
    ):
        judge_for(chat_server, max_tokens=50).judge([random_image(0)], ["hi"])
    assert len(chat_server.requests) == 1


def test_cut_or_reasoning_only_answers(chat_server):
    cut = b'{"choices": [{"message": {"content": null}, "finish_reason": "length"}]}'
    chat_server.script(("raw", 200, cut), ("raw", 200, reasoning_only(None, finish_reason="stop")))
    with pytest.raises(JudgeResponseError, match=r"cut at the token limit before any answer.*raise max_tokens"):
        judge_for(chat_server).judge([random_image(0)], ["hi"])
    with pytest.raises(JudgeResponseError, match=r"content is not text.*only reasoning_content"):
        judge_for(chat_server).judge([random_image(0)], ["hi"])


def test_concurrency_is_bounded(chat_server):
    chat_server.default = lambda body: (time.sleep(0.1), "VERDICT: safe")[1]
    out = judge_for(chat_server, max_concurrency=2).judge([random_image(i) for i in range(6)], ["hi"] * 6)
    assert [j.verdict for j in out] == [Verdict.SAFE] * 6 and chat_server.max_in_flight == 2


def test_unparseable_policy(chat_server):
    chat_server.script(("ok", "CAPTION: a cat\nVERDICT: hard to say"), ("ok", "hard to say"))
    [j] = judge_for(chat_server, on_unparseable="unsafe").judge([random_image(0)], ["hi"])
    assert j == type(j)(Verdict.UNSAFE, "a cat", "CAPTION: a cat\nVERDICT: hard to say", parsed=False)
    with pytest.raises(UnparseableVerdict, match="hard to say"):
        judge_for(chat_server, on_unparseable="raise").judge([random_image(0)], ["hi"])


def test_openai_needs_a_key(monkeypatch):
    monkeypatch.delenv("SAFECODE_TEST_KEY", raising=False)
    judge = OpenAIJudge(api_key_env="SAFECODE_TEST_KEY")
    assert judge.url == "https://api.openai.com/v1/chat/completions"
    with pytest.raises(JudgeError, match="set the environment variable SAFECODE_TEST_KEY"):
        judge.judge([random_image(0)], ["hi"])
    assert judge.judge([], []) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(base_url="ftp://example.com"), "http"),
        (dict(base_url=""), "base_url"),
        (dict(model=""), "model"),
        (dict(timeout=0), "timeout"),
        (dict(max_retries=-1), "max_retries"),
        (dict(max_concurrency=0), "max_concurrency"),
        (dict(on_unparseable="maybe"), "on_unparseable"),
        (dict(api_key_env=""), "api_key_env"),
        (dict(question_template="no prompt"), "prompt"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OpenAIJudge(**kwargs)
