"""The ``engine: http`` judge's pieces: the chat-completions body, the answer's text, and a session
factory for ``ray.data.llm``'s HTTP stage that turns a failed request into one row's score error.

Why a session of our own: ray.data.llm's ``HttpRequestUDF`` raises (failing the job, or the whole
batch's rows) when a request times out or the server keeps answering 5xx, and it reads every body
with ``response.json()``, so an HTML error page raises too. :class:`TolerantSession` does the
retrying itself and answers every request that still failed with a 200 response whose JSON is
``{"step1x_error": {"code": "judge_failed", "message": ...}}``; :func:`answer_text` turns that into
:class:`JudgeCallError`, i.e. a transient ``judge_failed`` score that the next run asks again.
It also starts each request as soon as ``post()`` is called (aiohttp's own ``post()`` only starts
when awaited and the UDF awaits them in turn), so a batch's requests run concurrently.

The API key is read from the environment variable named in the config, in the worker, at request
time; it goes into the ``Authorization`` header only, never into a payload, a pickle or a message.
No Ray here: this module imports on a machine without Ray.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import urllib.error
import urllib.request
from typing import Any

import aiohttp

from step1x_batch.errors import CORRUPT_IMAGE, JUDGE_FAILED, JobRefused, RowError, redact, redact_uri
from step1x_batch.judge.answers import bounded
from step1x_batch.judge.prompts import JudgeRequest

__all__ = ["JudgeCallError", "TolerantSession", "answer_text", "chat_payload", "check_endpoint", "image_mime"]

# Answers worth asking again: the server was busy, restarting or behind a failing proxy.
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_MIMES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))
_MASK = "***"


def image_mime(data: bytes) -> str:
    """The MIME type of an encoded PNG, JPEG or WebP file, read from its first bytes."""
    for magic, mime in _MIMES:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    raise RowError(CORRUPT_IMAGE, f"An image for the judge ({len(data)} bytes, starting {data[:8]!r}) is not a "
                                  "PNG, JPEG or WebP file; re-encode it as one of those.")


def chat_payload(request: JudgeRequest, model: str, max_tokens: int, seed: int) -> dict[str, Any]:
    """An OpenAI chat-completions body: greedy (temperature 0) and seeded, so a rerun asks the same
    question the same way; the images as data: URLs in order, then the text (VIEScore's layout)."""
    parts: list[dict[str, Any]] = [
        {"type": "image_url",
         "image_url": {"url": f"data:{image_mime(img)};base64,{base64.b64encode(img).decode('ascii')}"}}
        for img in request.images
    ]
    parts.append({"type": "text", "text": request.text})
    messages: list[dict[str, Any]] = [{"role": "system", "content": request.system}] if request.system else []
    messages.append({"role": "user", "content": parts})
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "seed": seed}


class JudgeCallError(Exception):
    """The judge gave no answer (timeout, connection, HTTP error, an error body): ``judge_failed``,
    a transient score error."""

    def __init__(self, message: str) -> None:
        self.code = JUDGE_FAILED
        self.message = bounded(message, 500)
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __reduce__(self):  # picklable across Ray workers with the same message
        return (type(self), (self.message,))


def _error_detail(body: Any) -> str:
    """The human part of an OpenAI / vLLM error body (``{"error": {"message"}}`` or
    ``{"object": "error", "message"}``), or ""."""
    if not isinstance(body, dict):
        return ""
    err = body.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or "")
    if isinstance(err, str):
        return err
    return str(body.get("message") or "") if body.get("object") == "error" else ""


def wrapped_payload(body: dict[str, Any] | None) -> dict[str, str]:
    """The payload ray.data.llm carries for one request: the request body as JSON text in one
    field. Ray Data stores rows as Arrow, which unifies the shapes of a batch's payloads (a text
    part would gain a null ``image_url``); one string field arrives exactly as written.
    ``None``: a row that failed before the judge (the stage keeps every row in one stream; a branch
    and a union would run the upstream graph twice), answered by the session without a request."""
    return {"step1x_body": "" if body is None else json.dumps(body)}


def unwrap_body(data: Any) -> Any:
    """The request body inside what the UDF posts (:func:`wrapped_payload`), or None for a row
    not to ask; anything else is posted as it is."""
    try:
        wrapper = json.loads(data) if isinstance(data, (str, bytes)) else None
    except ValueError:
        return data
    if isinstance(wrapper, dict) and set(wrapper) == {"step1x_body"}:
        return wrapper["step1x_body"] or None
    return data


def answer_text(response: Any) -> str:
    """The text of a chat-completions answer (``choices[0].message.content``; "" when the judge
    said nothing, which the parser calls unparsable). An error body raises :class:`JudgeCallError`."""
    if not isinstance(response, dict):
        raise JudgeCallError(f"the judge answered {type(response).__name__} instead of a JSON object")
    failure = response.get("step1x_error")
    if failure:
        raise JudgeCallError(failure.get("message") if isinstance(failure, dict) else str(failure))
    detail = _error_detail(response)
    if detail:
        raise JudgeCallError(f"the judge answered an error: {detail}")
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise JudgeCallError("the judge's answer holds no choices (is the URL a chat-completions endpoint?)")
    content = (choices[0].get("message") or {}).get("content")
    if content is None:
        return ""
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content)


class _Answer:
    """A response as ray.data.llm's UDF reads it (``async with``, ``.status``, ``.reason``,
    ``await .json()``), already read in full."""

    def __init__(self, status: int, reason: str, body: dict[str, Any]) -> None:
        self.status, self.reason, self._body = status, reason, body

    async def json(self, **_: Any) -> dict[str, Any]:
        return self._body

    async def text(self, **_: Any) -> str:
        return json.dumps(self._body)

    def release(self) -> None:
        pass

    async def __aenter__(self) -> "_Answer":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        return None


class _Session:
    """One UDF call's session: an aiohttp session, and the requests it started."""

    def __init__(self, factory: "TolerantSession") -> None:
        self.factory = factory
        self._http: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> "_Session":
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.factory.timeout_s))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        pending = [t for t in self._tasks if not t.done()]
        for task in pending:  # the UDF stopped early: nobody will read these answers
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    def post(self, url: str, headers: dict[str, str] | None = None, data: Any = None,
             **_: Any) -> "asyncio.Task[_Answer]":
        """Start the request now; awaiting the result gives an :class:`_Answer` (never raises for
        a timeout, a connection error or a bad body)."""
        task = asyncio.ensure_future(self._ask(url, dict(headers or {}), data))
        self._tasks.append(task)
        return task

    async def _ask(self, url: str, headers: dict[str, str], data: Any) -> _Answer:
        data = unwrap_body(data)
        if data is None:  # a row that failed before the judge: nothing to ask, nothing sent
            return _Answer(200, "OK", {"step1x_skipped": True})
        factory, key = self.factory, None
        if factory.api_key_env:
            key = os.environ.get(factory.api_key_env)
            if not key:
                return self._failure(key, f"the environment variable {factory.api_key_env} (judge.api_key_env) is "
                                          "not set on this worker, so no request was sent")
            headers["Authorization"] = f"Bearer {key}"
        why = ""
        for attempt in range(factory.tries):
            if attempt:
                await asyncio.sleep(factory.backoff_s * 2 ** (attempt - 1))
            answer, why, again = await self._once(url, headers, data)
            if answer is not None:
                return answer
            if not again:
                break
        tries = f"{attempt + 1} tr{'y' if attempt == 0 else 'ies'}"
        return self._failure(key, f"the judge at {redact_uri(url)} gave no answer after {tries}: {why}")

    async def _once(self, url: str, headers: dict[str, str], data: Any) -> tuple[_Answer | None, str, bool]:
        """One request: (the answer, "", _) or (None, why it failed, whether to try again)."""
        assert self._http is not None, "post() outside 'async with'"
        try:
            async with self._http.post(url, headers=headers, data=data) as resp:
                status, reason, raw = resp.status, resp.reason or "", await resp.read()
        except asyncio.TimeoutError:
            return None, f"no answer within {self.factory.timeout_s:g} s (judge.timeout_s)", True
        except (aiohttp.ClientError, OSError) as e:
            return None, f"the request failed ({type(e).__name__}: {e})", True
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not 200 <= status < 300:
            detail = _error_detail(body)
            return None, f"HTTP {status} {reason}" + (f" ({detail})" if detail else ""), status in _RETRY_STATUSES
        if not isinstance(body, dict):
            return None, f"HTTP {status} with a body that is not a JSON object ({len(raw)} bytes)", True
        return _Answer(status, reason, body), "", False

    @staticmethod
    def _failure(key: str | None, why: str) -> _Answer:
        message = redact(why.replace(key, _MASK) if key else why)
        return _Answer(200, "OK", {"step1x_error": {"code": JUDGE_FAILED, "message": bounded(message, 500)}})


class TolerantSession:
    """A picklable session factory for ``HttpRequestProcessorConfig(session_factory=...)``: each
    request gets ``retries`` tries in all (at least one) of ``timeout_s`` each, with ``backoff_s``
    doubling between them; a request that still failed answers ``{"step1x_error": ...}``.

    Only settings are held (never the key), so it pickles into Ray workers as is."""

    def __init__(self, timeout_s: float, api_key_env: str | None, retries: int = 1, backoff_s: float = 0.5) -> None:
        self.timeout_s = float(timeout_s)
        self.api_key_env = api_key_env or None
        self.tries = max(1, int(retries))
        self.backoff_s = float(backoff_s)

    def __call__(self) -> _Session:
        return _Session(self)

    def __repr__(self) -> str:
        return (f"TolerantSession(timeout_s={self.timeout_s:g}, api_key_env={self.api_key_env!r}, "
                f"retries={self.tries}, backoff_s={self.backoff_s:g})")


def _refuse_answer(where: str, model: str, status: int, reason: str, raw: bytes) -> JobRefused:
    try:
        detail = _error_detail(json.loads(raw))
    except ValueError:
        detail = ""
    detail = f" ({bounded(detail, 200)})" if detail else ""
    return JobRefused(f"The judge endpoint {where} answered HTTP {status} {reason}{detail} to a one-token request "
                      f"for model {model!r}; check judge.url, judge.model and the key.")


def check_endpoint(url: str, model: str, timeout_s: float, api_key_env: str | None) -> None:
    """Ask the judge one one-token question before any row is read, so a wrong URL, model name or
    key is one sentence (JobRefused) instead of a judge_failed score on every row. ``url`` is the
    chat-completions endpoint (``JudgeConfig.chat_url()``); proxies are not used, as in the workers."""
    where = redact_uri(url)
    headers = {"Content-Type": "application/json"}
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise JobRefused(f"The environment variable {api_key_env} named by judge.api_key_env is not set; "
                             "export the judge's API key in it (on every node) before scoring.")
        headers["Authorization"] = f"Bearer {key}"
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Reply OK."}],
                       "max_tokens": 1, "temperature": 0}).encode()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, data=body, headers=headers, method="POST"),
                         timeout=timeout_s) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        raise _refuse_answer(where, model, e.code, str(e.reason), e.read()) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        why = f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)
        raise JobRefused(f"The judge endpoint {where} cannot be reached ({why}); "
                         "start the server or fix judge.url.") from None
    try:
        answer_text(json.loads(raw))
    except (ValueError, JudgeCallError) as e:
        why = e.message if isinstance(e, JudgeCallError) else "its body is not JSON"
        raise JobRefused(f"The judge endpoint {where} did not answer like an OpenAI chat-completions server "
                         f"({why}); check judge.url.") from None
