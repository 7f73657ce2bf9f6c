"""``winnow serve`` with reward models: a classifier RM and a PRM behind the chat route
(swift's convention: the score is the message content) and ``POST /v1/rewards``."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import openai
import pytest

from tests.support.commands import Server, run_winnow
from tests.support.files import read_jsonl, write_jsonl

QUESTION = {"role": "user", "content": "What is 2 + 3?"}
CONVERSATIONS = [
    [QUESTION, {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."}],
    [QUESTION, {"role": "assistant", "content": "2 + 3 = 6. The answer is 6."}],
    [{"role": "system", "content": "Be brief."}, QUESTION, {"role": "assistant", "content": "5"}],
]
STEPS = [QUESTION, {"role": "assistant", "content": "Step 1: 2 + 3 = 5\n\nStep 2: so it is 5\n\nThe answer is 5."}]


def _start(tmp_path_factory, model, name):
    return Server(tmp_path_factory.mktemp("serve-rm") / f"{name}.log", "--model", str(model), "--max_wait_ms", "50")


@pytest.fixture(scope="module")
def classifier_server(tiny_classifier_rm, tmp_path_factory):
    srv = _start(tmp_path_factory, tiny_classifier_rm, "classifier")
    yield srv
    assert srv.stop(signal.SIGTERM) == 0


@pytest.fixture(scope="module")
def prm_server(tiny_prm, tmp_path_factory):
    srv = _start(tmp_path_factory, tiny_prm, "prm")
    yield srv
    assert srv.stop(signal.SIGTERM) == 0


def _rewards(srv, conversations, **extra):
    return httpx.post(f"{srv.url}/v1/rewards", json={"messages": conversations, **extra}, timeout=60)


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
    content = client.chat.completions.create(model=body["model"], messages=STEPS).choices[0].message.content
    assert json.loads(content) == pytest.approx(first["step_scores"], abs=1e-4)


def test_remote_reward_model_in_a_sampling_run(classifier_server, tiny_classifier_rm, tiny_model, tmp_path):
    """``--reward_model http://.../v1`` scores a run's samples through the server's /v1/rewards route."""

    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [QUESTION]}, {"query": "What is 4 + 4?"}])
    proc = run_winnow(
        "sample",
        "--model",
        str(tiny_model),
        "--dataset",
        str(data),
        "--num_return_sequences",
        "3",
        "--max_new_tokens",
        "8",
        "--reward_model",
        f"{classifier_server.url}/v1",
        "--output_format",
        "raw",
        "--output_dir",
        str(tmp_path),
        "--output_file",
        "r.jsonl",
        "--progress",
        "false",
    )
    assert proc.returncode == 0, proc.stderr
    from winnow.rewards.models import load_reward_model

    local = load_reward_model(str(tiny_classifier_rm), device="cpu")
    for rec in read_jsonl(tmp_path / "r.jsonl"):
        convs = [[*rec["messages"], {"role": "assistant", "content": c["text"]}] for c in rec["completions"]]
        expected = [s.value for s in local.score_conversations(convs)]
        served = [c["scores"]["remote-rm"]["value"] for c in rec["completions"]]
        assert served == pytest.approx(expected, abs=1e-4)
