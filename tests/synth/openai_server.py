"""A small real OpenAI-compatible server on 127.0.0.1 for the endpoint-teacher tests (lorakit serve is not here yet).

It answers POST /v1/chat/completions with `respond(prompt)`'s text in the chat-completions JSON
shape, after first answering with the statuses queued in `fail` (429, 500, ...), and counts every
request and the Authorization headers it saw.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class TeacherServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, respond: Callable[[str], str]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.respond = respond
        self.fail: list[int] = []
        """Statuses to answer with, one per request, before answering normally."""
        self.fail_after: int | None = None
        """Answer 500 to every request after this many good answers."""
        self.hits = 0
        self.good = 0
        self.auth: set[str] = set()
        self.prompts: list[str] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __enter__(self) -> TeacherServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: TeacherServer

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 429:
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        s = self.server
        with s.lock:
            s.hits += 1
            s.auth.add(self.headers.get("Authorization", ""))
            status = s.fail.pop(0) if s.fail else 200
            if status == 200 and s.fail_after is not None and s.good >= s.fail_after:
                status = 500
            if status == 200:
                s.good += 1
        if not self.path.endswith("/chat/completions"):
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        if status != 200:
            self._send(status, {"error": {"message": f"deliberate {status}", "type": "test"}})
            return
        prompt = request["messages"][-1]["content"]
        with s.lock:
            s.prompts.append(prompt)
        text = s.respond(prompt)
        self._send(200, {
            "id": f"chatcmpl-{s.hits}", "object": "chat.completion", "created": 0, "model": request["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
                      "total_tokens": len(prompt.split()) + len(text.split())},
        })
