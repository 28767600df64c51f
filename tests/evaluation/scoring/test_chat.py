"""ChatClient against a real chat-completions server on 127.0.0.1 (tests/judges/chat_server.py)."""

from __future__ import annotations

import pytest

from safecode_kernels.evaluation.scoring.chat import ChatClient, Completer
from safecode_kernels.judges import JudgeError, JudgeHTTPError, JudgeResponseError, JudgeTimeout
from tests.judges.chat_server import ChatServer, request_text

KEY = "sk-test-scoring-secret-42"
ENV = "SAFECODE_SCORING_TEST_KEY"
USER = [{"role": "user", "content": "Is this safe?"}]


@pytest.fixture
def server():
    server = ChatServer(default=lambda body: f"echo: {request_text(body)}").start()
    yield server
    server.stop()


def client_for(server, base_url=None, **kwargs) -> ChatClient:
    return ChatClient(
        base_url or server.base_url,
        "judge-model",
        api_key_env=ENV,
        **{"timeout": 2.0, **kwargs},  # the test server asks for 1 ms waits before retries
    )


def test_complete_returns_the_raw_text_and_sends_the_body(server, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    with client_for(server, max_tokens=64) as client:
        assert isinstance(client, Completer)
        assert client.complete(USER) == "echo: Is this safe?"
    [request] = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    assert request["body"] == {"model": "judge-model", "messages": USER, "temperature": 0.0, "max_tokens": 64}


def test_no_key_no_header(server, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    client_for(server).complete(USER)
    assert "Authorization" not in server.requests[0]["headers"]


def test_retries_server_errors(server):
    server.script(("status", 500), ("status", 429, b"{}", {"retry-after-ms": "1"}), ("ok", "Verdict: safe"))
    assert client_for(server, max_retries=2).complete(USER) == "Verdict: safe"
    assert len(server.requests) == 3


def test_gives_up_after_retries(server):
    server.script(("status", 503), ("status", 503))
    with pytest.raises(JudgeHTTPError, match="HTTP 503.*gave up after 2 attempts") as info:
        client_for(server, max_retries=1).complete(USER)
    assert info.value.status == 503


def test_client_errors_fail_at_once_without_the_key(server, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    server.script(("status", 401, f'{{"error": "bad key {KEY}"}}'.encode(), {}))
    with pytest.raises(JudgeHTTPError, match=f"{ENV}, which is set") as info:
        client_for(server).complete(USER)
    assert info.value.status == 401 and KEY not in str(info.value) and len(server.requests) == 1


def test_malformed_answer_and_timeout(server):
    server.script(("raw", 200, b"not json"))
    with pytest.raises(JudgeResponseError, match="not JSON"):
        client_for(server).complete(USER)
    server.script(("slow", 1.0, "late"))
    with pytest.raises(JudgeTimeout, match="0.2 s timeout"):
        client_for(server, timeout=0.2, max_retries=0).complete(USER)


def test_retry_after_and_the_missing_v1(server):
    server.script(("status", 429, b"{}", {"retry-after-ms": "300"}), ("ok", "Verdict: safe"))
    assert client_for(server).complete(USER) == "Verdict: safe"
    assert server.requests[1]["time"] - server.requests[0]["time"] >= 0.285
    root = server.base_url.removesuffix("/v1")
    with pytest.raises(JudgeHTTPError, match=f"did you mean {root}/v1"):
        client_for(server, base_url=root).complete(USER)


def test_reasoning_models(server):
    unsupported = b'{"error": {"message": "Unsupported value: temperature", "param": "temperature"}}'
    cut = b'{"choices": [{"message": {"content": null, "reasoning_content": "Hmm"}, "finish_reason": "length"}]}'
    server.script(("status", 400, unsupported), ("raw", 200, cut))
    client = client_for(server, max_tokens=32)
    with pytest.raises(JudgeResponseError, match=r"\(max_tokens=32\) reasoning.*max_tokens \(ChatClient\(max_tokens="):
        client.complete(USER)
    assert client.complete(USER) == "echo: Is this safe?"
    assert [r["body"].get("temperature") for r in server.requests] == [0.0, None, None]


def test_complete_many_keeps_the_order(server):
    conversations = [[{"role": "user", "content": f"q{i}"}] for i in range(6)]
    assert client_for(server).complete_many(conversations, concurrency=3) == [f"echo: q{i}" for i in range(6)]


def test_bad_arguments(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(ValueError, match="http"):
        ChatClient("ftp://x", "m")
    with pytest.raises(ValueError, match="model"):
        ChatClient("http://127.0.0.1:1/v1", "")
    with pytest.raises(ValueError, match="messages"):
        ChatClient("http://127.0.0.1:1/v1", "m").complete([])
    with pytest.raises(JudgeError, match=f"set the environment variable {ENV}"):
        ChatClient("https://api.openai.com/v1", "m", api_key_env=ENV).complete(USER)
