"""``winnow serve`` as a real subprocess on a loopback port, driven by the official openai SDK.

One server per scenario (module-scoped): a policy server for the OpenAI surface, a tiny-queue
server for overload and SIGTERM, and reward-model servers for the reward routes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.commands import Server
from tests.support.structured import PYDANTIC_PLUGIN, SCHEMA
from winnow.structured import SchemaCheck

KEY = "sk-winnow-test"


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    srv = Server(
        tmp_path_factory.mktemp("serve") / "policy.log",
        "--model",
        str(tiny_model),
        "--served_model_name",
        "tiny",
        "--api_key",
        KEY,
        "--max_new_tokens",
        "8",
        "--max_wait_ms",
        "50",
    )
    yield srv
    code = srv.stop(signal.SIGINT)
    assert code == 0, srv.output()[-2000:]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


CHAT = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    srv = Server(
        tmp_path_factory.mktemp("serve") / "structured.log",
        "--model",
        str(tiny_model),
        "--served_model_name",
        "tiny",
        "--max_new_tokens",
        "64",
    )
    yield srv
    assert srv.stop(signal.SIGINT) == 0, srv.output()[-2000:]


def test_ready_line_health_and_models(server, client):
    assert re.search(r"ready at http://127\.0\.0\.1:\d+/v1 ", server.output())
    assert server.health()["model"] == "tiny"
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_chat_n_and_usage(client):
    resp = client.chat.completions.create(
        model="tiny", messages=CHAT, n=3, max_tokens=5, temperature=0.8, top_p=0.9, extra_body={"top_k": 20}
    )
    assert resp.object == "chat.completion" and resp.model == "tiny"
    assert [c.index for c in resp.choices] == [0, 1, 2]
    for choice in resp.choices:
        assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length")
    assert 0 < resp.usage.completion_tokens <= 15
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.usage.prompt_tokens > 5


def test_server_default_max_tokens_and_length_finish(client):
    resp = client.chat.completions.create(model="tiny", messages=CHAT)  # --max_new_tokens 8
    assert resp.usage.completion_tokens <= 8
    one = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=1)
    assert one.usage.completion_tokens <= 1


def test_seed_reproducible_and_stream_matches(client):
    kwargs = dict(model="tiny", messages=CHAT, max_tokens=8, temperature=1.0, seed=1234)
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    again = client.chat.completions.create(**kwargs).choices[0].message.content
    assert first == again
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == first
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_stream_n_choices_without_usage(client):
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, n=2, stream=True)
    seen: dict[int, list] = {}
    for chunk in stream:
        assert chunk.usage is None
        for choice in chunk.choices:
            seen.setdefault(choice.index, []).append(choice.finish_reason)
    assert sorted(seen) == [0, 1]
    assert all(reasons[-1] in ("stop", "length") for reasons in seen.values())


def test_greedy_is_deterministic_and_stop_string_cuts_text(client):
    greedy = dict(model="tiny", messages=CHAT, max_tokens=6, temperature=0)
    answer = client.chat.completions.create(**greedy).choices[0].message.content
    assert [c.message.content for c in client.chat.completions.create(**greedy, n=3).choices] == [answer] * 3
    seeded = dict(model="tiny", messages=CHAT, max_tokens=12, seed=7)  # a seed makes sampling repeatable
    full = client.chat.completions.create(**seeded).choices[0].message.content
    assert len(full) >= 4, full
    stop = full[2:4]
    cut = client.chat.completions.create(**seeded, stop=[stop]).choices[0]
    assert cut.message.content == full[: full.index(stop)]
    assert cut.finish_reason == "stop"


def test_completions_raw_prompt_n_and_token_ids(client):
    resp = client.completions.create(model="tiny", prompt=["What is", "Step 1:"], n=2, max_tokens=4)
    assert resp.object == "text_completion"
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert all(isinstance(c.text, str) for c in resp.choices)
    ids = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3 and len(ids.choices) == 1
    chunks = list(client.completions.create(model="tiny", prompt="What is", max_tokens=3, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_async_client_concurrent_requests_are_batched(server):
    before = server.health()

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)
        async with client:
            return await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model="tiny", messages=[{"role": "user", "content": f"Q{i}"}], max_tokens=4
                    )
                    for i in range(8)
                )
            )

    results = asyncio.run(run())
    assert len(results) == 8 and all(len(r.choices) == 1 for r in results)
    after = server.health()
    assert after["requests"] - before["requests"] == 8
    assert after["engine_calls"] - before["engine_calls"] < 8  # shared engine calls


def test_auth(server):
    for key in ("wrong", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        resp = httpx.get(f"{server.url}/v1/models", headers=headers, timeout=10)
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=CHAT)
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200  # probes need no key


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert err.value.body["param"] == "model" and err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"temperature": 5}, "temperature"),
        ({"n": 0}, "n"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"extra_body": {"top_k": -7}}, "top_k"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logprobs": True}, "logprobs"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
    ],
)
def test_bad_parameters_are_400_and_named(client, kwargs, param):
    kwargs = {"model": "tiny", "messages": CHAT, "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**kwargs)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param
    assert err.value.body["type"] == "invalid_request_error"


def test_context_too_long_is_400_with_numbers(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5000)
    body = err.value.body
    assert body["code"] == "context_length_exceeded" and "2048" in body["message"] and "5000" in body["message"]
    long_prompt = "one two three four " * 1200
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=long_prompt, max_tokens=4)
    assert err.value.body["code"] == "context_length_exceeded" and err.value.body["param"] == "prompt"


def test_malformed_bodies_never_crash(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body in (b'{"messages": [{"rol', b"[1, 2]", b"", b"\xff\xfe", b'{"messages": "hi"}', b"null"):
        resp = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=headers, timeout=10)
        assert resp.status_code == 400, (body, resp.text)
        assert resp.json()["error"]["type"] == "invalid_request_error"
    resp = httpx.post(f"{server.url}/v1/chat/completions", content=b"{", headers=headers, timeout=10)
    assert resp.json()["error"]["code"] == "invalid_json"
    assert httpx.get(f"{server.url}/nope", timeout=10).status_code == 404
    assert server.health()["status"] == "ok"
    assert server.proc.poll() is None


def test_rewards_route_on_a_policy_is_400(server):
    resp = httpx.post(
        f"{server.url}/v1/rewards", json={"messages": [CHAT]}, headers={"Authorization": f"Bearer {KEY}"}, timeout=10
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "model"


def test_overload_is_503_with_retry_after_then_sigterm_exits_0(tiny_model, tmp_path):
    srv = Server(
        tmp_path / "busy.log", "--model", str(tiny_model), "--max_queue", "1", "--max_batch_size", "1", command="deploy"
    )  # swift's name for the same command
    try:

        async def fire():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as http:
                body = {"messages": CHAT, "max_tokens": 64}  # long enough for the others to pile up
                return await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(6)))

        responses = asyncio.run(fire())
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 503 in codes, codes
        assert set(codes) <= {200, 503}, [r.text for r in responses]
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["Retry-After"] == "1"
        assert busy.json()["error"]["code"] == "server_overloaded"
        # the SDK's own retry honours Retry-After and gets through once the queue drains
        sdk = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=3)
        assert sdk.chat.completions.create(model=srv.health()["model"], messages=CHAT, max_tokens=2).choices
        # SIGTERM while a request is in flight: it is answered, then the server exits 0
        seen = srv.health()["requests"]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                httpx.post, f"{srv.url}/v1/chat/completions", json={"messages": CHAT, "max_tokens": 48}, timeout=120
            )
            deadline = time.monotonic() + 60
            while srv.health()["requests"] == seen and time.monotonic() < deadline:
                time.sleep(0.01)
            srv.proc.send_signal(signal.SIGTERM)
            assert pending.result().status_code == 200
    finally:
        code = srv.stop(signal.SIGTERM)
    assert code == 0, srv.output()[-2000:]
    assert "stopped" in srv.output()


def test_raw_bodies_validate_against_the_sdk_types(server):
    """Strict validation of the wire JSON with the SDK's own pydantic types (not its lenient parsing)."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 3, "n": 2}
    resp = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    ChatCompletion.model_validate(resp.json(), strict=True)
    resp = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "a", "max_tokens": 3}, headers=headers, timeout=60
    )
    Completion.model_validate(resp.json(), strict=True)
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=stream, headers=headers, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(e, strict=True) for e in events[:-1]]
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}


def test_a_streamed_answer_arrives_as_it_is_generated(server):
    """Chunks leave the server while the model is still generating: many content chunks, the first long
    before the last, and together the greedy answer a plain request gets."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    messages = [{"role": "user", "content": "Tell me a long story."}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=300, temperature=0)
    arrivals, pieces = [], []
    started = time.perf_counter()
    for chunk in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=300, temperature=0, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter() - started)
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == plain.choices[0].message.content
    assert len(pieces) >= 5, pieces
    assert arrivals[0] < arrivals[-1] / 2  # the first piece came well before the answer was done


def test_serve_decodes_response_format_for_the_openai_sdk(served, tmp_path):
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    resp = client.chat.completions.create(
        model="tiny",
        messages=messages,
        n=3,
        temperature=1.0,
        response_format={"type": "json_schema", "json_schema": {"name": "Answer", "schema": SCHEMA, "strict": True}},
    )
    check = SchemaCheck(SCHEMA)
    assert [check.error(c.message.content) for c in resp.choices] == [None] * 3
    obj = client.chat.completions.create(
        model="tiny", messages=messages, response_format={"type": "json_object"}, max_tokens=48
    )
    assert obj.choices[0].finish_reason == "length" or isinstance(json.loads(obj.choices[0].message.content), dict)
    # the SDK's parse helper: a pydantic model in, parsed objects out
    plugin = Path(tmp_path / "models.py")
    plugin.write_text(PYDANTIC_PLUGIN)
    namespace: dict = {}
    exec(compile(PYDANTIC_PLUGIN, str(plugin), "exec", dont_inherit=True), namespace)
    parsed = client.chat.completions.parse(
        model="tiny", messages=messages, response_format=namespace["Answer"], temperature=1.0
    )
    answer = parsed.choices[0].message.parsed
    assert isinstance(answer, namespace["Answer"]) and 0 <= answer.answer <= 999
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="tiny", messages=messages, response_format={"type": "json_schema", "json_schema": {"name": "x"}}
        )
    assert info.value.body["param"] == "response_format"
