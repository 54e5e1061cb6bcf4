"""A small OpenAI-compatible HTTP server on loopback, for tests of the ``[api]`` adapters with the real client.

``FakeOpenAI`` serves ``/v1/chat/completions``, ``/v1/images/edits`` and ``/v1/images/generations`` over real
HTTP in a thread. It checks the bearer key (a wrong key gets a 401 that echoes it, as real services do),
answers yes/no questions with logprobs (or text only), the judge's JSON verdict and captions, and edits by
tinting the uploaded image (a colour of its own per prompt). ``fail(...)`` queues what the next matching requests get instead: an HTTP
status (with headers such as Retry-After), a delay longer than the client's timeout, a refusal, or text.
Every request is logged in ``requests`` (path, prompt text, time), so tests can count what was redone.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from PIL import Image

CAPTION = "standing in a forest clearing, soft morning light, three-quarter view"
VERDICT = '{"same_character": true, "edit_applied": true, "artifacts": false, "reasons": "same face, new background"}'


@dataclass
class Fault:
    kind: str  # "status", "sleep", "refuse", "text"
    path: str | None = None  # "chat", "edits", "generations"; None = any
    when: str | None = None  # only requests whose prompt contains this
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    text: str = ""
    after: int = 0  # matching requests to let through first


@dataclass
class Seen:
    path: str
    prompt: str
    at: float
    status: int = 200


class FakeOpenAI:
    def __init__(self, key: str = "", *, logprobs: bool = True):
        self.key, self.logprobs = key, logprobs
        self.faults: deque[Fault] = deque()
        self.requests: list[Seen] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fail(self, kind: str, *, path: str | None = None, when: str | None = None, times: int = 1, after: int = 0,
             **kw: Any) -> None:
        """The next ``times`` matching requests (after ``after`` more pass untouched) get ``kind``."""
        for i in range(times):
            self.faults.append(Fault(kind, path, when, after=after if i == 0 else 0, **kw))

    def seen(self, path: str, *, ok: bool | None = None) -> list[Seen]:
        return [s for s in self.requests if s.path == path and (ok is None or (s.status == 200) == ok)]

    def _take(self, path: str, prompt: str) -> Fault | None:
        with self.lock:
            for f in list(self.faults):
                if (f.path in (None, path)) and (f.when is None or f.when in prompt):
                    if f.after:
                        f.after -= 1
                        return None
                    self.faults.remove(f)
                    return f
        return None


def _png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _chat_answer(body: dict[str, Any], prompt: str, logprobs: bool) -> dict[str, Any]:
    if "Answer yes or no" in prompt and "defects" in prompt:  # the artifact question: a clean image
        content, top = "No", [("No", 0.9), ("Yes", 0.08), ("no", 0.01)]
    elif "Answer yes or no" in prompt:
        content, top = "Yes", [("Yes", 0.9), ("No", 0.08), ("yes", 0.01)]
    elif "JSON object" in prompt:
        content, top = VERDICT, []
    else:
        content, top = CAPTION, []
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None,
                              "message": {"role": "assistant", "content": content, "refusal": None}}
    if logprobs and body.get("logprobs") and top:
        choice["logprobs"] = {"content": [{"token": top[0][0], "logprob": math.log(top[0][1]), "bytes": None,
                                           "top_logprobs": [{"token": t, "logprob": math.log(p), "bytes": None}
                                                            for t, p in top]}]}
    return choice


def _handler(fake: FakeOpenAI):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet: tests read fake.requests
            pass

        def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                pass

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            path = self.path.rsplit("/", 1)[-1].split("?")[0]
            path = "chat" if path == "completions" else path
            form, body = {}, {}
            if path == "edits":
                form = _multipart(self.headers.get("Content-Type", ""), raw)
                prompt = form.get("prompt", b"").decode()
            else:
                body = json.loads(raw or b"{}")
                prompt = body.get("prompt", "") if path == "generations" else " ".join(
                    c.get("text", "") for m in body.get("messages", []) for c in
                    (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}]))
            seen = Seen(path, prompt, time.monotonic())
            with fake.lock:
                fake.requests.append(seen)
            if fake.key and self.headers.get("Authorization") != f"Bearer {fake.key}":
                seen.status = 401
                got = self.headers.get("Authorization", "").removeprefix("Bearer ")
                return self._send(401, {"error": {"message": f"Incorrect API key provided: {got}.",
                                                  "type": "invalid_request_error", "code": "invalid_api_key"}})
            fault = fake._take(path, prompt)
            if fault and fault.kind == "sleep":
                time.sleep(fault.seconds)
            elif fault and fault.kind == "status":
                seen.status = fault.status
                return self._send(fault.status, {"error": {"message": f"injected HTTP {fault.status}",
                                                           "type": "server_error", "code": None}}, fault.headers)
            elif fault and fault.kind == "refuse" and path != "chat":
                seen.status = 400
                return self._send(400, {"error": {"message": "Your request was rejected as a result of our safety "
                                                  "system.", "type": "image_generation_user_error",
                                                  "code": "content_policy_violation"}})
            usage = {"prompt_tokens": 120, "completion_tokens": 8, "total_tokens": 128}
            if path == "chat":
                choice = _chat_answer(body, prompt, fake.logprobs)
                if fault and fault.kind == "refuse":
                    choice["message"].update(content=None, refusal="I can't help with judging this image.")
                elif fault and fault.kind == "text":
                    choice["message"]["content"] = fault.text
                return self._send(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()),
                                        "model": body.get("model"), "choices": [choice], "usage": usage})
            if path == "edits":
                with Image.open(io.BytesIO(form["image"])) as im:  # a tint of its own per prompt
                    tint = tuple(hashlib.sha256(prompt.encode()).digest()[:3])
                    out = Image.blend(im.convert("RGB"), Image.new("RGB", im.size, tint), 0.35)
            else:
                w, h = (int(v) for v in body.get("size", "64x64").split("x"))
                out = Image.new("RGB", (w, h), (40, 120, 200))
            return self._send(200, {"created": int(time.time()), "data": [{"b64_json": _png_b64(out)}],
                                    "usage": {"input_tokens": 50, "output_tokens": 200, "total_tokens": 250}})

    return Handler


def _multipart(content_type: str, raw: bytes) -> dict[str, bytes]:
    """The fields of a multipart/form-data body (the edit endpoint's upload)."""
    msg = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    out: dict[str, bytes] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            out[str(name).removesuffix("[]")] = part.get_payload(decode=True)
    return out
