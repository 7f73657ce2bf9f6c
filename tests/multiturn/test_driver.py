"""The trajectory driver (multiturn/driver.py): engine calls shared by every live trajectory, stragglers,
the client engine in every tool-call format, stage two on trajectories, bad options, failures, and kill -9 + resume.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support.commands import Server, raw_output, run_winnow
from tests.support.fakeserver import FakeServer
from tests.support.files import read_jsonl
from tests.support.multiturn import RETRY_ENV, SWIFT_PLUGIN, client_run, roles, sums
from winnow import sample
from winnow.errors import ConfigError, SchedulerError
from winnow.multiturn import TurnResult
from winnow.multiturn.driver import MultiTurn, TurnBatcher, build_scheduler
from winnow.multiturn.tools import calculator
from winnow.schema import Completion, Prompt, SamplingParams


class CountingEngine:
    """An engine that answers at once and records its calls: (prompts, n)."""

    name = "counting"

    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def batch_plan(self, n: int) -> tuple[int, int]:
        return 256, 1

    async def generate(self, prompts, params):
        self.calls.append((len(prompts), params.n))
        await asyncio.sleep(0.01)
        return [[Completion(text=f"reply {i}") for i in range(params.n)] for _ in prompts]


def test_every_turn_of_every_live_trajectory_shares_engine_calls():
    """3 prompts x 4 samples, 3 turns each: one call per round of turns, the first one with n=4."""

    async def step(trajectory):
        await asyncio.sleep(0.001 * trajectory.sample)  # steps finish at different moments
        return TurnResult(messages=[{"role": "user", "content": f"go on {trajectory.turn}"}])

    engine = CountingEngine()

    class Ctx:
        def __init__(self):
            self.engine, self.params, self.counters = engine, SamplingParams(n=4), {}

        def count(self, name, value=1):
            self.counters[name] = self.counters.get(name, 0) + value

    strategy = MultiTurn(build_scheduler("s", step, {}, {}), scheduler_name="s", max_turns=3)
    prompts = [Prompt(id=str(i), messages=[{"role": "user", "content": f"q{i}"}]) for i in range(3)]
    ctx = Ctx()
    groups = asyncio.run(strategy.run(prompts, ctx))
    assert engine.calls == [(3, 4), (12, 1), (12, 1)]
    assert ctx.counters["turns"] == 36 and ctx.counters["engine_calls"] == 3
    assert [len(g.completions) for g in groups] == [4, 4, 4]
    c = groups[0].completions[0]
    assert roles(c.turns) == ["assistant", "user", "assistant", "user", "assistant"]
    assert c.trace["stop_reason"] == "max_turns" and c.trace["num_turns"] == 3


def test_a_local_engine_waits_for_stragglers_but_not_forever():
    """Calls go out when every live trajectory is waiting, or after batch_wait_s for a slow one."""

    async def go():
        engine = CountingEngine()
        batcher = TurnBatcher(engine, SamplingParams(n=1), lambda *a: None, wait_s=0.2)
        batcher.join(3)
        prompt = Prompt(id="p", messages=[{"role": "user", "content": "x"}])
        fast = [
            asyncio.ensure_future(batcher.generate(Prompt(id=str(i), messages=[{"role": "user", "content": f"x{i}"}])))
            for i in range(2)
        ]
        started = time.monotonic()
        await asyncio.gather(*fast)  # the third trajectory is busy: they wait for it, up to 0.2 s
        waited = time.monotonic() - started
        await batcher.generate(prompt)
        batcher.leave()
        await batcher.aclose()
        return engine.calls, waited

    calls, waited = asyncio.run(go())
    assert calls == [(2, 1), (1, 1)] and waited >= 0.19


def test_scripted_tool_calls_through_the_client_engine_in_every_format(fake_server, tmp_path):
    fake_server.defaults.update(agent=1, agent_vary=1)
    dataset = sums(tmp_path / "d.jsonl", 3)
    common = dict(num_return_sequences=3, multi_turn_scheduler="tools", tools=["calculator"], orm_model="math")
    raw, manifest, summary = client_run(fake_server, tmp_path, dataset, output_format="raw", **common)
    assert len(raw) == 3 and summary.samples == 9
    record = raw[0]
    assert record["tools"][0]["function"]["name"] == "calculator"
    first = fake_server.chat_requests
    assert first == 3 + 9  # each prompt's first turn once with n=3, then one request per trajectory
    for c in record["completions"]:
        assert roles(c["turns"]) == ["assistant", "tool", "assistant"]
        call = c["turns"][0]["tool_calls"][0]
        assert c["turns"][0]["content"] is None and call["function"]["name"] == "calculator"
        result = c["turns"][1]
        assert result["tool_call_id"] == call["id"] and result["name"] == "calculator"
        assert result["content"] == calculator(json.loads(call["function"]["arguments"])["expression"])
        assert c["text"] == f"The answer is \\boxed{{{result['content']}}}."
        assert c["trace"] == {"num_turns": 2, "stop_reason": "done", "turn_infos": [{"tool_calls": ["calculator"]}, {}]}
    # the first sample's call was right, the others slipped: the ORM sees the trajectories' answers
    assert [c["scores"]["math"]["value"] for c in record["completions"]] == [1.0, 0.0, 0.0]
    compute = manifest["compute"]
    assert compute["trajectories"] == 9 and compute["turns"] == 18 and compute["tool_calls"] == 9
    assert manifest["strategy"]["multi_turn"]["scheduler"] == "tools"

    records, _, _ = client_run(fake_server, tmp_path, dataset, output_format="swift", **common)
    assert len(records) == 3  # the right trajectory, paired with a wrong one
    line = records[0]
    assert roles(line["messages"]) == ["user", "assistant", "tool", "assistant"]
    assert line["tools"][0]["function"]["name"] == "calculator" and "rejected_response" not in line
    rejected = line["rejected_messages"]
    assert rejected[:1] == line["messages"][:1] and roles(rejected) == roles(line["messages"])
    assert rejected[-1]["content"] != line["messages"][-1]["content"]

    dpo, _, _ = client_run(fake_server, tmp_path, dataset, output_format="dpo", **common)
    assert len(dpo) == 3 and roles(dpo[0]["prompt"]) == ["user"]
    assert roles(dpo[0]["chosen"]) == roles(dpo[0]["rejected"]) == ["assistant", "tool", "assistant"]
    assert dpo[0]["score_chosen"] == 1.0 and dpo[0]["score_rejected"] == 0.0

    sft, _, _ = client_run(fake_server, tmp_path, dataset, output_format="sft", **common)
    assert len(sft) == 3 and roles(sft[0]["messages"]) == ["user", "assistant", "tool", "assistant"]

    pc, _, _ = client_run(fake_server, tmp_path, dataset, output_format="prompt_completion", **common)
    assert roles(pc[0]["prompt"]) == ["user"] and roles(pc[0]["completion"]) == ["assistant", "tool", "assistant"]

    grpo, _, _ = client_run(fake_server, tmp_path, dataset, output_format="grpo", output_parquet=True, **common)
    assert grpo[0]["winnow_pass_rate"] == pytest.approx(1 / 3) and grpo[0]["tools"]
    import pyarrow.parquet as pq

    raw_again, _, _ = client_run(fake_server, tmp_path, dataset, output_format="raw", output_parquet=True, **common)
    table = pq.read_table(tmp_path / "out" / "o.parquet").to_pylist()
    turns = table[0]["completions"][0]["turns"]
    assert [t["role"] for t in turns] == ["assistant", "tool", "assistant"]
    assert json.loads(table[0]["completions"][0]["trace"])["num_turns"] == 2


def test_stage_two_scores_trajectories_from_a_raw_stage_one(fake_server, tmp_path):
    fake_server.defaults.update(agent=1, agent_vary=1)
    dataset = sums(tmp_path / "d.jsonl", 2)
    client_run(
        fake_server,
        tmp_path,
        dataset,
        num_return_sequences=2,
        multi_turn_scheduler="tools",
        tools=["calculator"],
        output_format="raw",
    )
    stage1 = tmp_path / "stage1.jsonl"
    (tmp_path / "out" / "o.jsonl").rename(stage1)
    summary = sample(
        sampler_engine="no",
        cache_files=[str(stage1)],
        dataset=[str(dataset)],
        num_return_sequences=2,
        orm_model="math",
        output_dir=str(tmp_path / "two"),
        output_file="s.jsonl",
        progress=False,
    )
    assert summary.status == "finished" and summary.groups_written == 2
    for record in read_jsonl(tmp_path / "two" / "s.jsonl"):
        assert roles(record["messages"]) == ["user", "assistant", "tool", "assistant"]
        assert roles(record["rejected_messages"]) == ["user", "assistant", "tool", "assistant"]


def test_many_trajectories_are_in_flight_at_once(fake_server, tmp_path):
    fake_server.defaults.update(agent=2, latency=0.2)
    records, manifest, _ = client_run(
        fake_server,
        tmp_path,
        sums(tmp_path / "d.jsonl", 8),
        num_return_sequences=2,
        multi_turn_scheduler="tools",
        tools=["calculator"],
        output_format="raw",
    )
    assert len(records) == 8 and manifest["compute"]["turns"] == 16 * 3
    # 16 trajectories, each waiting on the server 3 times: their turns overlapped, not one trajectory at a time
    assert fake_server.max_in_flight >= 12


def test_bad_multi_turn_options_are_one_line(tmp_path, fake_server):
    dataset = sums(tmp_path / "d.jsonl", 1)
    with pytest.raises(ConfigError, match="add --multi_turn_scheduler tools"):
        client_run(fake_server, tmp_path, dataset, tools=["calculator"])
    with pytest.raises(ConfigError, match="replaces run"):
        client_run(
            fake_server, tmp_path, dataset, external_plugins=[str(SWIFT_PLUGIN)], multi_turn_scheduler="run_owner"
        )
    with pytest.raises(ConfigError, match="Unknown tool 'nope'"):
        client_run(
            fake_server,
            tmp_path,
            dataset,
            external_plugins=[str(SWIFT_PLUGIN)],
            multi_turn_scheduler="tools",
            tools=["nope"],
        )
    with pytest.raises(ConfigError, match="with --sampler_type sample or distill .*, not beam"):
        client_run(
            fake_server, tmp_path, dataset, multi_turn_scheduler="tools", tools=["calculator"], sampler_type="beam"
        )
    proc = run_winnow(
        "sample",
        "--model",
        "fake",
        "--sampler_engine",
        "client",
        "--dataset",
        str(dataset),
        "--multi_turn_scheduler",
        "nope",
        "--output_dir",
        str(tmp_path / "o"),
    )
    assert proc.returncode == 2 and "--multi_turn_scheduler 'nope': not one of" in proc.stderr


def test_a_scheduler_that_raises_fails_the_run_naming_it(fake_server, tmp_path):
    plugin = tmp_path / "broken.py"
    plugin.write_text(
        "from winnow.registry import scheduler\n\n@scheduler('broken')\n"
        "async def broken(trajectory):\n    raise KeyError('oops')\n"
    )
    with pytest.raises(SchedulerError, match="scheduler broken failed in step at turn 1 of .*#0: KeyError"):
        client_run(
            fake_server,
            tmp_path,
            sums(tmp_path / "d.jsonl", 1),
            external_plugins=[str(plugin)],
            multi_turn_scheduler="broken",
        )


def test_the_demo_policy_served_plays_the_environment_through_the_client_engine(tmp_path):
    """The same environment with the demo policy behind `winnow serve`: every turn a chat request."""

    srv = Server(tmp_path / "serve.log", "--model", "demo-policy", "--served_model_name", "demo", "--max_wait_ms", "20")
    try:
        out = tmp_path / "out"
        proc = run_winnow(
            "sample",
            "--sampler_engine",
            "client",
            "--model",
            "demo",
            "--dataset",
            "demo-arith#4",
            "--num_return_sequences",
            "3",
            *RETRY_ENV,
            *raw_output(out),
            "--engine_kwargs",
            json.dumps({"base_url": f"{srv.url}/v1"}),
            timeout=300,
        )
    finally:
        assert srv.stop(signal.SIGINT) == 0, srv.output()[-2000:]
    assert proc.returncode == 0, proc.stderr
    completions = [c for r in read_jsonl(out / "o.jsonl") for c in r["completions"]]
    assert len(completions) == 12
    for c in completions:
        right = bool(c["trace"]["turn_infos"][0]["info"].get("correct"))
        assert roles(c["turns"]) == (["assistant"] if right else ["assistant", "user", "assistant"])


def test_a_multi_turn_run_killed_mid_run_resumes_at_the_prompt_level(tmp_path):
    with FakeServer(agent=2, latency=0.05).running() as fake_server:
        dataset = sums(tmp_path / "d.jsonl", 40)
        out = tmp_path / "out"
        args = [
            "sample",
            "--sampler_engine",
            "client",
            "--model",
            "fake",
            "--dataset",
            str(dataset),
            "--num_return_sequences",
            "2",
            "--multi_turn_scheduler",
            "tools",
            "--tools",
            "calculator",
            *raw_output(out),
            "--max_concurrency",
            "4",
            "--engine_kwargs",
            json.dumps({"base_url": fake_server.url}),
        ]
        proc = subprocess.Popen(
            [sys.executable, "-m", "winnow", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            deadline = time.monotonic() + 120
            while not ((out / "o.jsonl").exists() and len((out / "o.jsonl").read_text().splitlines()) >= 5):
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "the run wrote nothing"
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        done = len(read_jsonl(out / "o.jsonl"))
        assert 5 <= done < 40
        before = fake_server.chat_requests
        again = run_winnow(*args, "--resume", "true")
        assert again.returncode == 0, again.stderr
        records = read_jsonl(out / "o.jsonl")
        assert sorted(r["k"] for r in records) == list(range(40))  # none lost, none twice
        for r in records:  # every trajectory whole: call, result, call, result, answer
            for c in r["completions"]:
                assert roles(c["turns"]) == ["assistant", "tool", "assistant", "tool", "assistant"]
        redone = 40 - done
        # only the rows not written were sampled again: per row, one first request (n=2) and 2 x 2 more
        assert fake_server.chat_requests - before == 5 * redone
        assert f"{done} rows already done" in again.stderr
