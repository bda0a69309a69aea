"""A local OpenAI-compatible chat-completions server for tests: no network, no model.

Usage::

    from judge_server import JudgeServer, answer, by_marker, http_error, slow, SC_ANSWER

    rule = by_marker({"[slow]": slow(), "[boom]": http_error(500), "[junk]": answer("no json here")})
    with JudgeServer(rule) as server:             # 127.0.0.1, an ephemeral port, a thread
        server.url        # "http://127.0.0.1:PORT/v1/chat/completions" (JudgeConfig.url: server.base_url)
        ...               # point the client at it
        server.requests   # every POST it got, in arrival order: list[Received]
    # on exit: slow answers are released, the server stops

A *rule* maps a :class:`Received` request to a :class:`Reply`; :func:`by_marker` picks the reply of
the first marker found in the request's user text (an instruction like ``"make it red [slow]"``, or
a row id the prompt repeats), else ``default``. Replies:

- :func:`answer` (content): a 200 chat completion with that content. Valid answers
  (:data:`SC_ANSWER`, :data:`PAIR_ANSWER`, or :func:`scores`), malformed text, an out-of-range score,
  truncated JSON and an empty content are all just contents; ``answer(None)`` gives a null content.
- :func:`slow`: holds the request until :meth:`JudgeServer.release` (or the server's exit), then
  answers ``then``; a client with a timeout gives up first. Waits on a ``threading.Event``, never a
  fixed sleep.
- :func:`http_error` (status, body): that status with an HTML body (or ``body`` as given).
- :func:`raw` (status, body, content_type): any body, e.g. a 200 that is not JSON.
- :func:`no_choices`: a 200 JSON object without ``choices``.
- :func:`flaky` (first, then, times): ``first`` for the first ``times`` requests it sees, then ``then``.

:class:`Received` has ``body`` (the parsed JSON), ``headers`` (lower-case names), and the helpers
``text`` (the user message's text parts), ``system``, ``images`` (the image URLs, data: URLs as
sent) and ``authorization``. :meth:`JudgeServer.wait_for_requests` blocks (on a condition, with a
timeout) until the server has received n requests.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

__all__ = [
    "PAIR_ANSWER", "SC_ANSWER", "JudgeServer", "Received", "Reply", "answer", "by_marker", "flaky",
    "http_error", "no_choices", "raw", "scores", "slow",
]

HTML_500 = b"<html><head><title>500 Internal Server Error</title></head><body><h1>Oops</h1></body></html>"


def scores(*values: float, reasoning: str = "test judge") -> str:
    """A VIEScore-style answer: ``{"score": [...], "reasoning": ...}``."""
    return json.dumps({"score": list(values), "reasoning": reasoning})


SC_ANSWER = scores(7, 8)  # a valid SC or PQ answer (two sub-scores)
PAIR_ANSWER = json.dumps({"winner": "A", "reasoning": "test judge"})


@dataclass(frozen=True)
class Received:
    """One request the server got."""

    path: str
    headers: dict[str, str]  # lower-case names
    body: Any  # the parsed JSON body (None when it was not JSON)

    def _messages(self, role: str) -> list[dict]:
        messages = self.body.get("messages", []) if isinstance(self.body, dict) else []
        return [m for m in messages if isinstance(m, dict) and m.get("role") == role]

    @property
    def text(self) -> str:
        """The user messages' text (text parts joined by newlines)."""
        out = []
        for m in self._messages("user"):
            content = m.get("content")
            if isinstance(content, str):
                out.append(content)
            else:
                out += [p.get("text", "") for p in content or [] if p.get("type") == "text"]
        return "\n".join(out)

    @property
    def system(self) -> str | None:
        found = self._messages("system")
        return found[0].get("content") if found else None

    @property
    def images(self) -> list[str]:
        """The image URLs of the user messages, in order (data: URLs as the client sent them)."""
        return [p["image_url"]["url"] for m in self._messages("user") if isinstance(m.get("content"), list)
                for p in m["content"] if p.get("type") == "image_url"]

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


@dataclass
class Reply:
    """What the server does with one request (build one with the functions below)."""

    status: int = 200
    content: str | None = SC_ANSWER  # the chat completion's content (when body is None)
    body: bytes | None = None  # a raw body instead of a chat completion
    content_type: str = "application/json"
    wait: bool = False  # hold the request until the server releases its slow answers
    then: Reply | None = None  # flaky: the reply after `times` requests
    times: int = 0
    _count: int = field(default=0, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def pick(self) -> Reply:
        """The reply for this request (a flaky reply counts its requests)."""
        if self.then is None:
            return self
        with self._lock:
            self._count += 1
            return self if self._count <= self.times else self.then.pick()


def answer(content: str | None) -> Reply:
    return Reply(content=content)


def slow(then: Reply | None = None) -> Reply:
    base = then or answer(SC_ANSWER)
    return Reply(status=base.status, content=base.content, body=base.body, content_type=base.content_type, wait=True)


def http_error(status: int = 500, body: bytes = HTML_500, content_type: str = "text/html") -> Reply:
    return Reply(status=status, body=body, content_type=content_type)


def raw(status: int, body: bytes, content_type: str = "text/plain") -> Reply:
    return Reply(status=status, body=body, content_type=content_type)


def no_choices() -> Reply:
    return raw(200, json.dumps({"id": "x", "object": "chat.completion"}).encode(), "application/json")


def flaky(first: Reply, then: Reply, times: int = 1) -> Reply:
    return Reply(status=first.status, content=first.content, body=first.body, content_type=first.content_type,
                 wait=first.wait, then=then, times=times)


def by_marker(table: dict[str, Reply], default: Reply | None = None) -> Callable[[Received], Reply]:
    """A rule: the reply of the first marker (in ``table`` order) in the request's user text."""
    fallback = default or answer(SC_ANSWER)

    def rule(request: Received) -> Reply:
        text = request.text
        return next((reply for marker, reply in table.items() if marker in text), fallback)

    return rule


def _completion(request: Received, content: str | None) -> bytes:
    model = request.body.get("model", "") if isinstance(request.body, dict) else ""
    return json.dumps({
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }).encode()


class JudgeServer:
    """The server; a context manager (see the module docstring)."""

    def __init__(self, rule: Callable[[Received], Reply] | None = None) -> None:
        self.rule = rule or by_marker({})
        self.requests: list[Received] = []
        self._released = threading.Event()
        self._arrived = threading.Condition()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._httpd is not None, "the server is not running"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def url(self) -> str:
        return self.base_url + "/chat/completions"

    def release(self) -> None:
        """Let every held (slow) request answer now, and later ones at once."""
        self._released.set()

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> bool:
        """Block until at least ``n`` requests have arrived (True), or ``timeout`` s passed (False)."""
        with self._arrived:
            return self._arrived.wait_for(lambda: len(self.requests) >= n, timeout)

    def _record(self, request: Received) -> None:
        with self._arrived:
            self.requests.append(request)
            self._arrived.notify_all()

    def __enter__(self) -> JudgeServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="judge-server", daemon=True)  # shutdown() waits one poll
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)


def _handler(server: JudgeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def do_POST(self) -> None:
            data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(data)
            except ValueError:
                body = None
            request = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            server._record(request)
            reply = server.rule(request).pick()
            if reply.wait:
                server._released.wait()
            payload = reply.body if reply.body is not None else _completion(request, reply.content)
            try:
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except OSError:  # the client gave up (timeout) and closed the connection
                pass

    return Handler
