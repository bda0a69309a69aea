"""The judge engines without Ray: the in-process transformers judge on a tiny Qwen2.5-VL folder, and
the HTTP pieces (payload, answer text, the tolerant session, the endpoint check) against the local
OpenAI-compatible server of tests/judge_server.py."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import pickle
import shutil
import socket
from pathlib import Path

import pytest
from judge_server import (
    SC_ANSWER,
    JudgeServer,
    answer,
    by_marker,
    flaky,
    http_error,
    no_choices,
    raw,
    slow,
)
from PIL import Image
from torchvision_cpu import TORCHVISION

from step1x_batch.errors import CORRUPT_IMAGE, JUDGE_FAILED, JobRefused, RowError
from step1x_batch.judge.http import (
    JudgeCallError,
    TolerantSession,
    answer_text,
    chat_payload,
    check_endpoint,
)
from step1x_batch.judge.local import TransformersJudge, check_folder
from step1x_batch.judge.prompts import JudgeRequest
from step1x_batch.models.qwen_vl.tiny import write_tiny_qwen

KEY = "sk-test-judge-0123456789abcdef"
ENV = "STEP1X_TEST_JUDGE_KEY"


def encoded(color: tuple[int, int, int], fmt: str = "PNG", size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def one_sentence(text: str) -> bool:
    return "\n" not in text and text.endswith(".") and len(text) < 400


# ---------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("judge") / "tiny-qwen"
    write_tiny_qwen(folder, seed=3)
    return folder


@pytest.fixture(scope="module")
def judge(tiny_folder) -> TransformersJudge:
    return TransformersJudge(str(tiny_folder), max_new_tokens=6, seed=0)


def _requests() -> list[JudgeRequest]:
    red, blue = encoded((200, 10, 10)), encoded((10, 10, 200), "JPEG", (90, 60))
    return [
        JudgeRequest("You judge edits.", "make it red", (red, blue)),
        JudgeRequest("You judge edits.", "turn the sky blue", (blue,)),
        JudgeRequest("", "remove the hat", (encoded((0, 200, 0), "WEBP"),)),
    ]


def test_transformers_judge_answers_one_text_per_request(judge):
    requests = _requests()
    texts = judge.answer(requests)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert len(set(texts)) > 1  # different questions, different (random-model) answers
    for request, text in zip(requests, texts):
        assert request.text not in text and "judge edits" not in text  # only the new tokens are decoded


def test_transformers_judge_answer_does_not_depend_on_its_batch(judge, tiny_folder):
    requests = _requests()
    alone = judge.answer([requests[1]])[0]
    assert judge.answer(requests)[1] == alone
    assert judge.answer([requests[2], requests[1], requests[0]])[1] == alone
    assert TransformersJudge(str(tiny_folder), max_new_tokens=6, seed=0).answer([requests[1]]) == [alone]


@pytest.mark.skipif(TORCHVISION is None, reason="transformers' Qwen2_5_VLProcessor needs torchvision")
def test_transformers_judge_inputs_are_the_processors(judge, tiny_folder):
    """encode() builds what transformers' own processor builds from the same chat (the oracle)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_folder)
    for request in _requests():
        chat = ([{"role": "system", "content": [{"type": "text", "text": request.system}]}] if request.system else [])
        chat.append({"role": "user", "content": [{"type": "image"} for _ in request.images]
                     + [{"type": "text", "text": request.text}]})
        text = processor.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in request.images]
        expected = processor(text=[text], images=images, return_tensors="pt")
        got = judge.encode(request)
        assert set(got) == set(expected)
        for name in expected:
            assert got[name].shape == expected[name].shape and bool((got[name] == expected[name]).all()), name


@pytest.mark.parametrize("remove, named", [
    (["config.json"], "config.json"),
    (["tokenizer.json", "vocab.json"], "tokenizer"),
    (["preprocessor_config.json"], "preprocessor_config.json"),
    (["model.safetensors"], "weights"),
])
def test_check_folder_refuses_an_incomplete_folder(tiny_folder, tmp_path, remove, named):
    folder = tmp_path / "judge"
    shutil.copytree(tiny_folder, folder)
    check_folder(str(folder))  # complete: no refusal
    for name in remove:
        (folder / name).unlink()
    with pytest.raises(JobRefused) as caught:
        check_folder(str(folder))
    assert named in str(caught.value) and one_sentence(str(caught.value))
    with pytest.raises(JobRefused):
        TransformersJudge(str(folder))


def test_check_folder_refuses_a_missing_folder(tmp_path):
    with pytest.raises(JobRefused) as caught:
        check_folder(str(tmp_path / "nowhere"))
    assert "nowhere" in str(caught.value) and one_sentence(str(caught.value))


# ---------------------------------------------------------------- payload and answer text


def test_chat_payload_is_greedy_seeded_with_data_urls_then_text():
    png, jpeg, webp = encoded((1, 2, 3)), encoded((1, 2, 3), "JPEG"), encoded((1, 2, 3), "WEBP")
    payload = chat_payload(JudgeRequest("be fair", "rate it", (png, jpeg, webp)), "qwen", 128, 7)
    assert payload["model"] == "qwen" and payload["max_tokens"] == 128
    assert payload["temperature"] == 0 and payload["seed"] == 7
    system, user = payload["messages"]
    assert system == {"role": "system", "content": "be fair"}
    *images, text = user["content"]
    assert text == {"type": "text", "text": "rate it"}
    urls = [p["image_url"]["url"] for p in images]
    assert [u.split(";")[0] for u in urls] == ["data:image/png", "data:image/jpeg", "data:image/webp"]
    assert [base64.b64decode(u.split(",", 1)[1]) for u in urls] == [png, jpeg, webp]
    json.dumps(payload)  # a JSON body as is
    # no system text: no system message (GEdit-Bench sends one user message)
    assert [m["role"] for m in chat_payload(JudgeRequest("", "t", ()), "q", 8, 0)["messages"]] == ["user"]
    with pytest.raises(RowError) as caught:
        chat_payload(JudgeRequest("", "t", (b"GIF89a....",)), "q", 8, 0)
    assert caught.value.code == CORRUPT_IMAGE


def _completion(content):
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


def test_answer_text_reads_the_content_and_raises_judge_failed_for_errors():
    assert answer_text(_completion(SC_ANSWER)) == SC_ANSWER
    assert answer_text(_completion(None)) == ""  # said nothing: the parser calls it unparsable
    assert answer_text(_completion([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])) == "ab"
    failures = [
        ({"step1x_error": {"code": JUDGE_FAILED, "message": "no answer within 3 s"}}, "no answer within 3 s"),
        ({"object": "error", "message": "The model `x` does not exist."}, "does not exist"),
        ({"error": {"message": "Rate limit reached"}}, "Rate limit"),
        ({"id": "x"}, "no choices"),
        (["not", "an", "object"], "JSON object"),
    ]
    for body, words in failures:
        with pytest.raises(JudgeCallError) as caught:
            answer_text(body)
        assert caught.value.code == JUDGE_FAILED and words in caught.value.message
        assert pickle.loads(pickle.dumps(caught.value)).message == caught.value.message


# ---------------------------------------------------------------- the tolerant session


async def _ask_like_ray(factory, url: str, payloads: list[dict]) -> list[tuple[int, dict]]:
    """ray.data.llm's HttpRequestUDF.udf, step for step: every post() first, then each awaited."""
    headers = {"Content-Type": "application/json"}
    out = []
    async with factory() as session:
        pending = [session.post(url, headers=headers, data=json.dumps(p)) for p in payloads]
        for request in pending:
            async with await request as response:
                status, _reason = response.status, response.reason
                out.append((status, await response.json()))
    return out


def _payload(text: str) -> dict:
    return chat_payload(JudgeRequest("sys", text, (encoded((5, 5, 5)),)), "judge", 64, 11)


RULE = by_marker({
    "[slow]": slow(), "[html500]": http_error(500), "[notjson]": raw(200, b"<html>ok</html>", "text/html"),
    "[bad]": answer("no JSON here"), "[nochoices]": no_choices(),
    "[flaky]": flaky(http_error(503), answer(SC_ANSWER), times=1),
})


def test_session_passes_a_valid_answer_through_in_rays_usage(monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    with JudgeServer(RULE) as server:
        got = asyncio.run(_ask_like_ray(TolerantSession(10, ENV), server.url, [_payload("a"), _payload("b [bad]")]))
        assert [status for status, _ in got] == [200, 200]
        assert answer_text(got[0][1]) == SC_ANSWER and answer_text(got[1][1]) == "no JSON here"
        (first,) = [r for r in server.requests if r.text == "a"]  # concurrent: any arrival order
        assert first.authorization == f"Bearer {KEY}"
        assert first.body == _payload("a")  # the body as sent: temperature 0, seed, data URLs
        assert first.body["temperature"] == 0 and first.body["seed"] == 11
        assert first.images[0].startswith("data:image/png;base64,") and first.text == "a"


def test_session_starts_every_request_before_the_first_is_awaited():
    """aiohttp's post() sends nothing until awaited; ours starts at once, so a batch runs concurrently."""
    async def go(url: str, server: JudgeServer) -> bool:
        async with TolerantSession(10, None)() as session:
            pending = [session.post(url, headers={}, data=json.dumps(_payload(str(i)))) for i in range(3)]
            arrived = await asyncio.to_thread(server.wait_for_requests, 3, 10.0)
            for request in pending:
                async with await request as response:
                    assert answer_text(await response.json()) == SC_ANSWER
            return arrived

    with JudgeServer(RULE) as server:
        assert asyncio.run(go(server.url, server))


def test_rays_http_udf_yields_every_row_through_the_session():
    """ray.data.llm's own HttpRequestUDF (in process, no cluster) with TolerantSession: a slow, a
    broken and a valid row each yield a response; none raises, so no batch fails (the timeout leaves
    the valid rows room on a loaded machine)."""
    stage = pytest.importorskip("ray.llm._internal.batch.stages.http_request_stage")
    texts = ["a", "b [slow]", "c [html500]", "d [notjson]", "e [bad]"]

    async def go(url: str) -> list[dict]:
        udf = stage.HttpRequestUDF(data_column="__data", expected_input_keys=["payload"], url=url,
                                   max_retries=2, session_factory=TolerantSession(1.5, None, retries=1))
        rows = [{"payload": _payload(t), udf.IDX_IN_BATCH_COLUMN: i} for i, t in enumerate(texts)]
        return [out async for out in udf.udf(rows)]

    with JudgeServer(RULE) as server:
        outputs = asyncio.run(go(server.url))
        assert len(server.requests) == len(texts)  # one try each: the UDF saw no status to retry
    assert [o["__idx_in_batch"] for o in outputs] == list(range(len(texts)))
    answers = [o["http_response"] for o in outputs]
    assert answer_text(answers[0]) == SC_ANSWER and answer_text(answers[4]) == "no JSON here"
    assert [a.get("step1x_error", {}).get("code") for a in answers[1:4]] == [JUDGE_FAILED] * 3


def _failure(server: JudgeServer, text: str, session: TolerantSession, url: str | None = None) -> str:
    (status, body), = asyncio.run(_ask_like_ray(session, url or server.url, [_payload(text)]))
    assert status == 200 and set(body) == {"step1x_error"} and body["step1x_error"]["code"] == JUDGE_FAILED
    with pytest.raises(JudgeCallError) as caught:
        answer_text(body)
    assert caught.value.code == JUDGE_FAILED
    message = body["step1x_error"]["message"]
    assert KEY not in message and KEY not in caught.value.message
    return message


def test_session_turns_a_slow_answer_into_judge_failed(monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    with JudgeServer(RULE) as server:
        message = _failure(server, "x [slow]", TolerantSession(0.3, ENV, retries=1))
        assert "0.3 s" in message and len(server.requests) == 1


def test_session_retries_then_turns_an_html_500_into_judge_failed(monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    with JudgeServer(RULE) as server:
        message = _failure(server, "x [html500]", TolerantSession(10, ENV, retries=2, backoff_s=0))
        assert "HTTP 500" in message and "<html>" not in message and "2 tries" in message
        assert len(server.requests) == 2


def test_session_turns_a_body_that_is_not_json_into_judge_failed():
    with JudgeServer(RULE) as server:
        assert "not a JSON object" in _failure(server, "x [notjson]", TolerantSession(10, None))


def test_session_retries_a_503_and_passes_the_next_answer():
    with JudgeServer(RULE) as server:
        (status, body), = asyncio.run(_ask_like_ray(TolerantSession(10, None, retries=2, backoff_s=0),
                                                    server.url, [_payload("x [flaky]")]))
        assert status == 200 and answer_text(body) == SC_ANSWER and len(server.requests) == 2


def test_session_answers_judge_failed_without_a_server_or_a_key(monkeypatch):
    port = _free_port()
    message = _failure(None, "x", TolerantSession(5, None), url=f"http://127.0.0.1:{port}/v1/chat/completions")
    assert "ClientConnectorError" in message or "Connect" in message
    monkeypatch.delenv(ENV, raising=False)
    with JudgeServer(RULE) as server:
        assert ENV in _failure(server, "x", TolerantSession(5, ENV))
        assert server.requests == []  # nothing is sent without the key


def test_session_pickles_without_the_key(monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    factory = TolerantSession(2.5, ENV, retries=3)
    blob = pickle.dumps(factory)
    assert KEY.encode() not in blob and KEY not in repr(factory)
    again = pickle.loads(blob)
    assert (again.timeout_s, again.api_key_env, again.tries) == (2.5, ENV, 3)
    with JudgeServer(RULE) as server:
        (_, body), = asyncio.run(_ask_like_ray(again, server.url, [_payload("a")]))
        assert answer_text(body) == SC_ANSWER and server.requests[0].authorization == f"Bearer {KEY}"


# ---------------------------------------------------------------- the endpoint check


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_endpoint_accepts_a_working_server(monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    with JudgeServer() as server:
        check_endpoint(server.url, "judge", 5, ENV)
        (probe,) = server.requests
        assert probe.authorization == f"Bearer {KEY}" and probe.body["model"] == "judge"
        assert probe.body["max_tokens"] == 1


def test_check_endpoint_refuses_in_one_sentence(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    refusals = []
    with pytest.raises(JobRefused) as caught:
        check_endpoint(f"http://127.0.0.1:{_free_port()}/v1/chat/completions", "judge", 5, None)
    refusals.append((caught.value, "cannot be reached"))
    with JudgeServer() as server, pytest.raises(JobRefused) as caught:
        check_endpoint(server.url, "judge", 5, ENV)
    refusals.append((caught.value, ENV))
    rule = by_marker({}, default=http_error(404, json.dumps(
        {"object": "error", "message": "The model `judge` does not exist."}).encode(), "application/json"))
    for reply, words in [(rule, "does not exist"), (by_marker({}, http_error(500)), "HTTP 500"),
                         (by_marker({}, no_choices()), "no choices")]:
        with JudgeServer(reply) as server, pytest.raises(JobRefused) as caught:
            check_endpoint(server.url, "judge", 5, None)
        refusals.append((caught.value, words))
    for refusal, words in refusals:
        assert words in str(refusal) and one_sentence(str(refusal)), str(refusal)
