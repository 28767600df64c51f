"""A real HTTP server on 127.0.0.1 that speaks OpenAI chat completions, for the judge tests.

It runs in a thread (``http.server``), records every request (path, headers, JSON body, arrival
time) and the most requests it held at once (``max_in_flight``). Like vLLM, it answers 404 to any
path but ``/v1/chat/completions``; there it answers from a script of actions, one per request,
then from ``default`` (a function of the request body giving the answer's text):

- ``("ok", text)``: 200 with a chat-completions body whose message content is ``text``;
- ``("status", code)`` / ``("status", code, body, headers)``: that status (JSON error body); a
  status that clients retry (408, 409, 429, 5xx) given without headers asks for a 1 ms wait
  (``retry-after-ms: 1``), so that the retry tests stay fast;
- ``("slow", seconds, text)``: sleeps, then answers like ``ok``;
- ``("raw", code, bytes)``: exactly those bytes as the body (malformed JSON, ...);
- ``("close",)``: reads the request and closes the connection without answering.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def completion(text: str, model: str = "judge-model") -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def request_text(body: dict) -> str:
    """The text parts of the last user message of a chat-completions request."""
    content = body["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return " ".join(part.get("text", "") for part in content if part.get("type") == "text")


def keyword_judge(body: dict) -> str:
    """Default answer: unsafe when the request mentions a weapon, else safe."""
    text = request_text(body).lower()
    verdict = "unsafe" if any(w in text for w in ("weapon", "knife", "bomb")) else "safe"
    return f"CAPTION: a photo of random coloured pixels\nVERDICT: {verdict}"


class ChatServer:
    def __init__(self, default=keyword_judge):
        self.actions: collections.deque = collections.deque()
        self.requests: list[dict] = []
        self.default = default
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                # The headers stay an HTTPMessage: its look-ups ignore case, as HTTP does.
                request = {"path": self.path, "headers": self.headers, "body": body, "time": time.monotonic()}
                with server._lock:
                    server.requests.append(request)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    found = self.path == "/v1/chat/completions"
                    action = server.actions.popleft() if server.actions and found else None
                try:
                    if found:
                        self._answer(action, body)
                    else:
                        self._send(404, b'{"detail": "Not Found"}')
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _answer(self, action, body):
                kind = action[0] if action else "ok"
                if kind == "close":
                    self.close_connection = True
                    return
                if kind == "slow":
                    time.sleep(action[1])
                    action = ("ok", action[2])
                    kind = "ok"
                if kind == "ok":
                    text = action[1] if action else server.default(body)
                    self._send(200, json.dumps(completion(text, (body or {}).get("model", "?"))).encode())
                elif kind == "status":
                    code = action[1]
                    payload = (
                        action[2]
                        if len(action) > 2
                        else json.dumps({"error": {"message": f"test error {code}", "type": "test"}}).encode()
                    )
                    retried = code in (408, 409, 429) or code >= 500
                    headers = action[3] if len(action) > 3 else {"retry-after-ms": "1"} if retried else {}
                    self._send(code, payload, headers)
                elif kind == "raw":
                    self._send(action[1], action[2])
                else:
                    raise ValueError(f"unknown action {action!r}")

            def _send(self, code, payload: bytes, headers=None):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def script(self, *actions) -> None:
        with self._lock:
            self.actions.extend(actions)

    def start(self) -> ChatServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
