"""The engine side of ``winnow serve`` (serve/serving.py): the batcher, prompts surely too long, min_p and
chat_template_kwargs, and reward models behind the chat route (swift's convention: the score is the
message content) and ``POST /v1/rewards``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import openai
import pytest

from tests.support.serve import (
    CHAT,
    QUESTION,
    error,
    post,
    serve_model,
)

CONVERSATIONS = [
    [QUESTION, {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."}],
    [QUESTION, {"role": "assistant", "content": "2 + 3 = 6. The answer is 6."}],
    [{"role": "system", "content": "Be brief."}, QUESTION, {"role": "assistant", "content": "5"}],
]

STEPS = [QUESTION, {"role": "assistant", "content": "Step 1: 2 + 3 = 5\n\nStep 2: so it is 5\n\nThe answer is 5."}]


@pytest.fixture(scope="module")
def prm_server(tiny_prm, tmp_path_factory):
    srv = serve_model(tmp_path_factory, tiny_prm, "prm")
    yield srv
    assert srv.stop(signal.SIGTERM) == 0


def _rewards(srv, conversations, **extra):
    return httpx.post(f"{srv.url}/v1/rewards", json={"messages": conversations, **extra}, timeout=60)


def test_batcher_groups_by_key_and_keeps_order():
    from winnow.serve.serving import Batcher

    calls = []

    def run_group(key, items):
        calls.append((key, list(items)))
        return [f"{key}:{item}" for item in items]

    async def go():
        batcher = Batcher(run_group, max_batch_size=8, max_wait_ms=20, max_queue=16)
        jobs = [batcher.submit("a" if i % 2 else "b", i) for i in range(6)]
        out = await asyncio.gather(*jobs)
        await batcher.aclose()
        return out

    assert asyncio.run(go()) == [f"{'a' if i % 2 else 'b'}:{i}" for i in range(6)]
    assert sorted(calls) == [("a", [1, 3, 5]), ("b", [0, 2, 4])]


def test_batcher_overload_and_failure_are_errors():
    from winnow.serve.serving import Batcher, ServingError

    def run_group(key, items):
        time.sleep(0.05)
        if key == "boom":
            raise RuntimeError("engine down")
        return items

    async def go():
        batcher = Batcher(run_group, max_batch_size=1, max_wait_ms=0, max_queue=1)
        out = await asyncio.gather(*(batcher.submit("k", i) for i in range(4)), return_exceptions=True)
        failed = await asyncio.gather(batcher.submit("boom", 0), return_exceptions=True)
        await batcher.aclose()
        return out, failed[0]

    out, failed = asyncio.run(go())
    served = [o for o in out if not isinstance(o, Exception)]
    refused = [o for o in out if isinstance(o, Exception)]
    assert served and served == sorted(served) and refused  # a queue of one cannot hold four at once
    assert all(isinstance(e, ServingError) and e.status == 503 and e.headers["Retry-After"] for e in refused)
    assert isinstance(failed, ServingError) and failed.status == 500 and "engine down" in failed.message


def test_prompt_surely_too_long_is_refused_without_tokenizing(limited_server):
    long_text = "hello world " * 2500  # 30,000 characters: over 2048 tokens of at most 13 characters
    for route, body, param in (
        ("chat/completions", {"messages": [{"role": "user", "content": long_text}]}, "messages"),
        ("completions", {"prompt": ["a", long_text]}, "prompt[1]"),
    ):
        err = error(post(limited_server, route, body), 400)
        assert err["code"] == "context_length_exceeded" and err["param"] == param
        assert "at least" in err["message"] and "2048" in err["message"], err  # judged from its length
    # a token-id prompt's length is known: refused with the exact numbers
    err = error(post(limited_server, "completions", {"prompt": list(range(5, 3005)), "max_tokens": 7}), 400)
    assert err["code"] == "context_length_exceeded" and "3007 tokens (3000 in the prompt, 7" in err["message"]


def test_min_p_one_keeps_only_the_top_token(limited_server):
    greedy = {"messages": CHAT, "max_tokens": 8, "temperature": 0}
    sampled = {"messages": CHAT, "max_tokens": 8, "temperature": 1.0, "seed": 11, "n": 4}
    want = post(limited_server, "chat/completions", greedy).json()["choices"][0]["message"]["content"]
    plain = [c["message"]["content"] for c in post(limited_server, "chat/completions", sampled).json()["choices"]]
    assert plain != [want] * 4  # sampling a random tiny model does not give the greedy answer four times
    top_only = post(limited_server, "chat/completions", {**sampled, "min_p": 1.0}).json()["choices"]
    assert [c["message"]["content"] for c in top_only] == [want] * 4
    completion = post(limited_server, "completions", {"prompt": "Step 1:", "max_tokens": 6, "temperature": 0})
    top = post(limited_server, "completions", {"prompt": "Step 1:", "max_tokens": 6, "seed": 3, "min_p": 1.0})
    assert top.json()["choices"][0]["text"] == completion.json()["choices"][0]["text"]


def test_chat_template_kwargs_reach_the_template_and_batch_correctly(limited_server):
    def prompt_tokens(resp) -> int:
        assert resp.status_code == 200, resp.text[:300]
        return resp.json()["usage"]["prompt_tokens"]

    base = prompt_tokens(post(limited_server, "chat/completions", {"messages": CHAT, "max_tokens": 1}))
    off = prompt_tokens(
        post(
            limited_server,
            "chat/completions",
            {"messages": CHAT, "max_tokens": 1, "chat_template_kwargs": {"enable_thinking": False}},
        )
    )
    assert off > base  # the empty think block was rendered

    async def mixed():
        async with httpx.AsyncClient(base_url=limited_server.url, timeout=60) as http:
            bodies = [
                {
                    "messages": CHAT,
                    "max_tokens": 2,
                    **({"chat_template_kwargs": {"enable_thinking": False}} if i % 2 else {}),
                }
                for i in range(6)
            ]
            return await asyncio.gather(*(http.post("/v1/chat/completions", json=b) for b in bodies))

    before = limited_server.health()["engine_calls"]
    results = asyncio.run(mixed())
    assert [prompt_tokens(r) for r in results] == [base, off] * 3
    assert limited_server.health()["engine_calls"] - before < 6  # still batched together


def test_classifier_detected_and_scores_match_the_model(classifier_server, tiny_classifier_rm):
    health = classifier_server.health()
    assert health["kind"] == "classifier"
    resp = _rewards(classifier_server, CONVERSATIONS, model=health["model"])
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "list" and body["kind"] == "classifier" and body["model"] == health["model"]
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(d["step_scores"] is None for d in body["data"])
    served = [d["score"] for d in body["data"]]

    from winnow.rewards.models import load_reward_model

    local = [
        s.value for s in load_reward_model(str(tiny_classifier_rm), device="cpu").score_conversations(CONVERSATIONS)
    ]
    assert served == pytest.approx(local, abs=1e-4)
    assert len(set(round(x, 6) for x in served)) > 1  # different answers, different scores
    # usage: the tokens the model read, each conversation rendered with its chat template
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_classifier_rm))
    rendered = [tok.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]
    read = sum(len(tok(text, add_special_tokens=False)["input_ids"]) for text in rendered)
    assert body["usage"] == {"prompt_tokens": read, "completion_tokens": 0, "total_tokens": read}


def test_classifier_chat_content_is_the_score(classifier_server):
    client = openai.OpenAI(base_url=f"{classifier_server.url}/v1", api_key="EMPTY", max_retries=0)
    model = client.models.list().data[0].id  # the swift-style client's way to find the name
    resp = client.chat.completions.create(model=model, messages=CONVERSATIONS[1])
    reward = float(resp.choices[0].message.content.strip())
    expected = _rewards(classifier_server, [CONVERSATIONS[1]]).json()["data"][0]["score"]
    assert reward == pytest.approx(expected, abs=1e-4)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="x")
    assert err.value.body["param"] == "model"


def test_concurrent_reward_requests_share_calls(classifier_server):
    before = classifier_server.health()

    async def fire():
        async with httpx.AsyncClient(base_url=classifier_server.url, timeout=60) as http:
            return await asyncio.gather(*(http.post("/v1/rewards", json={"messages": [c]}) for c in CONVERSATIONS * 4))

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses)
    scores = [r.json()["data"][0]["score"] for r in responses]
    assert scores[:3] == pytest.approx(scores[3:6], abs=1e-4)  # the same conversation scores the same
    after = classifier_server.health()
    assert after["requests"] - before["requests"] == 12
    assert after["engine_calls"] - before["engine_calls"] < 12


def test_reward_request_errors(classifier_server):
    assert _rewards(classifier_server, []).status_code == 400
    assert _rewards(classifier_server, [[]]).json()["error"]["param"] == "messages[0]"
    bad = _rewards(classifier_server, [[{"role": "robot", "content": "x"}]])
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages[0][0].role"
    assert _rewards(classifier_server, CONVERSATIONS[:1], model="other").status_code == 404


def test_reward_request_limits(classifier_server):
    many = _rewards(classifier_server, [CONVERSATIONS[0]] * 257)  # --max_prompts: 256 by default
    assert many.status_code == 400, many.text[:300]
    assert (many.json()["error"]["param"], many.json()["error"]["code"]) == ("messages", "array_above_max_length")
    # 30,000 characters: surely more than the model's 2048 positions (tokens of at most 13 characters);
    # refused before it could fail the batch it would share
    answer = {"role": "assistant", "content": "2+3=5." * 5000}
    long = _rewards(classifier_server, [CONVERSATIONS[0], [QUESTION, answer]])
    assert long.status_code == 400, long.text[:300]
    assert long.json()["error"]["param"] == "messages[1]"
    assert long.json()["error"]["code"] == "context_length_exceeded"
    kwargs = httpx.post(
        f"{classifier_server.url}/v1/chat/completions",
        timeout=60,
        json={"messages": CONVERSATIONS[0], "chat_template_kwargs": {"enable_thinking": False}},
    )
    assert kwargs.status_code == 400 and kwargs.json()["error"]["param"] == "chat_template_kwargs"


def test_prm_step_scores(prm_server):
    assert prm_server.health()["kind"] == "prm"
    body = _rewards(prm_server, [STEPS, CONVERSATIONS[2]]).json()
    assert body["kind"] == "prm"
    first = body["data"][0]
    assert len(first["step_scores"]) == 3  # three "\n\n"-separated steps
    assert all(0.0 <= s <= 1.0 for s in first["step_scores"])
    assert first["score"] == pytest.approx(min(first["step_scores"]))  # default aggregation: min
    client = openai.OpenAI(base_url=f"{prm_server.url}/v1", api_key="EMPTY", max_retries=0)
    chat = client.chat.completions.create(model=body["model"], messages=STEPS)
    assert json.loads(chat.choices[0].message.content) == pytest.approx(first["step_scores"], abs=1e-4)
    # usage: the tokens the PRM read (the tagged conversation), the same on both routes
    alone = _rewards(prm_server, [STEPS]).json()["usage"]
    assert chat.usage.prompt_tokens == alone["prompt_tokens"] > 0 and chat.usage.completion_tokens == 0
    assert body["usage"]["prompt_tokens"] > alone["prompt_tokens"]
