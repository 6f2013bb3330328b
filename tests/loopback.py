"""An OpenAI-compatible chat-completions server on 127.0.0.1 for tests: a real HTTP round trip, scripted replies."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def completion(content: str) -> bytes:
    """A chat-completions response body holding `content`."""
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


class ChatCompletionsServer:
    """Serves POST {url}/chat/completions on a free loopback port while used as a context manager.

    Subclasses implement `respond(body) -> (delay in seconds, HTTP status, payload)`; it is called under `self.lock`,
    so it may count. Every request is recorded as `{"path", "auth", "body"}`; `max_in_flight` is the most requests
    served at once. Handler threads are daemons: a slow reply left behind by a timed-out client ends on its own.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep the test output clean
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    owner.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                    delay, status, payload = owner.respond(body)
                time.sleep(delay)
                with owner.lock:
                    owner.in_flight -= 1
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def respond(self, body: dict[str, Any]) -> tuple[float, int, bytes]:
        raise NotImplementedError

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
