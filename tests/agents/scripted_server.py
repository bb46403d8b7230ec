"""An OpenAI-compatible test server that plays back a script: tool calls for requests that offer tools,
the smallest instance of the schema for requests under `response_format`, and a record of every request.
Requests with `logprobs: true` get each token of their content with a log-probability from `logprob`
(the content cut into words, spaces and single punctuation marks; 0.0, certain, unless told)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN = re.compile(r"\s+|\w+|[^\w\s]")
# (request body, the whole content, the token, its character offset) -> the token's log-probability
Logprob = Callable[[dict, str, str, int], float]

Step = dict[
    str, Any
]  # {"tool_calls": [{"name", "arguments"}]} or {"content": str}; optional "completion_tokens"


def example(schema: Any) -> Any:
    """The smallest value valid under `schema` (the shapes the agents send), preferring non-null branches."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [s for s in schema[key] if s.get("type") != "null"] or schema[key]
            return example(options[0])
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: example(props[k]) for k in schema.get("required", list(props))}
    if kind == "array":
        return [example(schema.get("items", {})) for _ in range(max(1, schema.get("minItems", 0)))][
            : schema.get("maxItems", 1)
        ]
    if kind == "string":
        return "x" * max(1, min(schema.get("minLength", 1), schema.get("maxLength", 1)))
    if kind in ("integer", "number"):
        lo, hi = schema.get("minimum", 0), schema.get("maximum", 0)
        value = (lo + hi) / 2 if hi > lo else lo
        return int(value) if kind == "integer" else value
    if kind == "boolean":
        return True
    return None


class ScriptedServer:
    """Serves on 127.0.0.1 (a free port) until `close()`; `requests` holds every chat request body."""

    def __init__(self, script: list[Step] | Callable[[int, dict], Step] | None = None,
                 structured: Callable[[dict], Any] | None = None, logprob: Logprob | None = None) -> None:  # fmt: skip
        self.script = script or []
        self.structured = structured or (
            lambda body: example(body["response_format"]["json_schema"]["schema"])
        )
        self.logprob = logprob or (lambda body, text, token, at: 0.0)
        self.requests: list[dict[str, Any]] = []
        self.tool_turns = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": "scripted", "object": "model",
                                                                   "created": 0, "owned_by": "test"}]})  # fmt: skip
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._send(200, server.answer(body))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def _step(self, body: dict[str, Any]) -> Step:
        with self._lock:
            turn = self.tool_turns
            self.tool_turns += 1
        if callable(self.script):
            return self.script(turn, body)
        return self.script[turn] if turn < len(self.script) else {"content": "done"}

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.requests.append(body)
        message: dict[str, Any] = {"role": "assistant", "content": None}
        finish, tokens = "stop", 5
        if body.get("tools"):
            step = self._step(body)
            tokens = step.get("completion_tokens", tokens)
            if step.get("tool_calls"):
                message["tool_calls"] = [
                    {"id": f"call_{k}_{len(self.requests)}", "type": "function",
                     "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
                    for k, c in enumerate(step["tool_calls"])
                ]  # fmt: skip
                finish = "tool_calls"
            else:
                message["content"] = step.get("content", "")
        elif body.get("response_format"):
            message["content"] = json.dumps(self.structured(body))
        else:
            message["content"] = "plain"
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish}
        if body.get("logprobs") and message["content"]:
            text, entries = message["content"], []
            for m in TOKEN.finditer(text):
                entries.append({"token": m.group(), "logprob": self.logprob(body, text, m.group(), m.start()),
                                "bytes": list(m.group().encode()), "top_logprobs": []})  # fmt: skip
            choice["logprobs"] = {"content": entries}
        return {
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": 0,
            "model": body.get("model", "scripted"),
            "choices": [choice],
            "usage": {"prompt_tokens": 10, "completion_tokens": tokens, "total_tokens": 10 + tokens},
        }  # fmt: skip

    def tool_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r.get("tools")]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
