"""OpenAIJudge against a real chat-completions server on 127.0.0.1 (tests/judges/chat_server.py)."""

from __future__ import annotations

import base64
import io
import socket
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
FAST = dict(backoff=0.01, max_backoff=0.05, timeout=2.0)


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
        ("status", 429, b'{"error": "slow down"}', {"Retry-After": "0"}),
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


def test_retry_after_is_capped(chat_server):
    chat_server.script(("status", 429, b"{}", {"Retry-After": "3600"}), ("ok", "safe"))
    start = time.perf_counter()
    [j] = judge_for(chat_server, max_backoff=0.1).judge([random_image(0)], ["hi"])
    assert j.verdict == Verdict.SAFE and time.perf_counter() - start < 2


@pytest.mark.parametrize("status", [400, 404])
def test_client_errors_fail_at_once(chat_server, status):
    chat_server.script(("status", status))
    with pytest.raises(JudgeHTTPError, match=f"HTTP {status}") as info:
        judge_for(chat_server).judge([random_image(0)], ["hi"])
    assert info.value.status == status and len(chat_server.requests) == 1


def test_key_never_leaks(chat_server, monkeypatch):
    monkeypatch.setenv("SAFECODE_TEST_KEY", KEY)
    echo = f'{{"error": "invalid key {KEY}"}}'.encode()  # a server that echoes the key back
    chat_server.script(("status", 401, echo), ("status", 500, echo), ("status", 500, echo))
    judge = judge_for(chat_server, max_retries=1)
    assert KEY not in repr(judge) and KEY not in str(vars(judge))
    with pytest.raises(JudgeHTTPError) as info:
        judge.judge([random_image(0)], ["hi"])
    message = str(info.value)
    assert KEY not in message and "***" in message and "SAFECODE_TEST_KEY, which is set" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
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
