"""Multi-turn sampling: trajectories through the client engine (the fake server scripted to call tools), the
transformers engine (the demo policy with a calculator scheduler and an environment), ms-swift scheduler and
environment plugins loaded unchanged, every output format, shared engine calls, and kill -9 + resume."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import PLUGINS, ROOT
from tests.support.commands import Server, raw_output, run_winnow
from tests.support.fakeserver import FakeServer
from tests.support.files import read_jsonl, write_jsonl
from winnow import sample
from winnow.errors import ConfigError, SchedulerError
from winnow.multiturn import Trajectory, TurnResult
from winnow.multiturn.driver import MultiTurn, TurnBatcher, build_scheduler
from winnow.multiturn.tools import ToolScheduler, calculator, function_spec, parse_tool_calls, trailing_code
from winnow.schema import Completion, Prompt, SamplingParams

SWIFT_PLUGIN = PLUGINS / "swift_multi_turn.py"
CALCULATOR_CHECK = ROOT / "docs" / "examples" / "calculator_check.py"
STEP = re.compile(r"^\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")
ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "a + b",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}


def sums(path: Path, n: int, tools: list | None = None) -> Path:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} + {i + 1}?"},
                {"role": "assistant", "content": str(2 * i + 1)},
            ],
            "k": i,
            **({"tools": tools} if tools else {}),
        }
        for i in range(n)
    ]
    return write_jsonl(path, rows)


def client_run(fake_server, tmp_path: Path, dataset: Path, model: str = "fake", **options):
    """One in-process multi-turn run on the fake server; its records."""
    engine = {"base_url": fake_server.url, "retry_base_s": 0.01, **options.pop("engine", {})}
    out = tmp_path / "out"
    summary = sample(
        model=model,
        sampler_engine="client",
        dataset=[str(dataset)],
        engine_kwargs=engine,
        output_dir=str(out),
        output_file="o.jsonl",
        override_exist_file=True,
        progress=False,
        **options,
    )
    assert summary.status == "finished", summary.error
    return read_jsonl(out / "o.jsonl"), json.loads((out / "o.manifest.json").read_text()), summary


def row(records: list[dict], k: int) -> dict:
    """The record of the k-th row (runs shuffle the rows)."""
    return next(r for r in records if r["k"] == k)


def roles(messages: list[dict]) -> list[str]:
    return [m["role"] for m in messages]


# ----------------------------------------------------------------------------- pieces


def test_tool_calls_and_code_are_found_in_text():
    text = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    rest, calls = parse_tool_calls(text)
    assert rest == "Let me add."
    assert calls == [{"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]
    assert parse_tool_calls("<tool_call>not json</tool_call>")[1] == []
    assert trailing_code("So:\n```python\nprint(1 + 2)\n```\n") == "print(1 + 2)\n"
    assert trailing_code("```python\nx = 1\n```\nThe answer is 1.") is None  # the model went on: not a request
    assert trailing_code("```python\nx = 1\n```\n```python\nprint(x)\n```") == "print(x)\n"
    assert calculator("(17 + 25) * 2") == "84" and calculator("7 / 2") == "3.5"
    assert calculator("__import__('os')").startswith("error") and calculator("1 / 0") == "error: division by zero"
    assert calculator("9 ** 99999").startswith("error")


def test_a_functions_tool_definition_comes_from_its_signature():
    def lookup(word: str, limit: int = 3) -> str:
        """The definition of a word.

        Args:
            word: the word to define
        """

    spec = function_spec("lookup", lookup)["function"]
    assert spec["name"] == "lookup" and spec["description"] == "The definition of a word."
    assert spec["parameters"]["properties"] == {
        "word": {"type": "string", "description": "the word to define"},
        "limit": {"type": "integer"},
    }
    assert spec["parameters"]["required"] == ["word"]


def test_a_trailing_python_block_runs_in_the_sandbox_and_the_model_continues_after_its_output():
    async def go():
        scheduler = ToolScheduler(["python"], timeout_s=20)
        prompt = Prompt(id="p", messages=[{"role": "user", "content": "What is 6 * 7?"}])
        t = Trajectory(prompt, 0, list(prompt.messages), None, max_turns=5)
        await scheduler.start(t)
        assert [spec["function"]["name"] for spec in t.tools] == ["python"]
        assert scheduler.stop_words == ["```output"]
        t.turn = 1
        t.replies.append(Completion(text="Let me compute.\n```python\nprint(6 * 7)\n```"))
        t.messages.append({"role": "assistant", "content": t.reply.text})
        result = await scheduler.step(t)
        t.turn, t.replies = 2, [*t.replies, Completion(text="The answer is 42.")]
        t.messages[-1]["content"] += t.reply.text
        done = await scheduler.step(t)
        await scheduler.aclose()
        return t, result, done

    t, result, done = asyncio.run(go())
    assert not result.done and result.info == {"tool_calls": ["python"], "code_block": True}
    assert t.messages[-1]["content"] == (
        "Let me compute.\n```python\nprint(6 * 7)\n```\n```output\n42\n```\nThe answer is 42."
    )
    assert done.done


def test_tool_errors_are_results_the_model_reads():
    async def go():
        scheduler = ToolScheduler(["calculator"])
        calls = [
            {"function": {"name": "calculator", "arguments": "{not json"}},
            {"function": {"name": "missing", "arguments": "{}"}},
            {"function": {"name": "calculator", "arguments": '{"wrong": 1}'}},
            {"function": {"name": "calculator", "arguments": '{"expression": "2 + 2"}'}},
        ]
        return [await scheduler.call(c) for c in calls]

    bad_json, missing, bad_args, ok = asyncio.run(go())
    assert bad_json.startswith("error: the arguments of calculator are not valid JSON")
    assert missing == "error: no tool named 'missing'; the tools are calculator"
    assert bad_args.startswith("error: bad arguments for calculator") and ok == "4"


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


# ----------------------------------------------------------------------------- the client engine


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


def test_the_python_tool_runs_the_models_program_streamed_calls_too(fake_server, tmp_path):
    fake_server.defaults.update(agent=1)
    records, manifest, _ = client_run(
        fake_server,
        tmp_path,
        sums(tmp_path / "d.jsonl", 2),
        num_return_sequences=2,
        multi_turn_scheduler="tools",
        tools=["python"],
        output_format="raw",
        engine={"stream": True},
        stream=True,
    )
    for record in records:
        for c in record["completions"]:
            code = json.loads(c["turns"][0]["tool_calls"][0]["function"]["arguments"])["code"]
            assert c["turns"][1]["content"] == str(eval(code.removeprefix("print(")[:-1]))  # the sandbox's output
            assert c["text"] == f"The answer is \\boxed{{{c['turns'][1]['content']}}}."
    assert manifest["strategy"]["multi_turn"]["sandbox"]["timeout_s"] > 0


def test_a_tool_the_row_offers_runs_the_function_a_plugin_registered(fake_server, tmp_path):
    fake_server.defaults.update(agent=1)
    plugin = tmp_path / "tools.py"
    plugin.write_text(
        "from winnow.registry import tool\n\n@tool\ndef add(a: int, b: int) -> int:\n"
        '    """a + b"""\n    return a + b\n'
    )
    records, manifest, _ = client_run(
        fake_server,
        tmp_path,
        sums(tmp_path / "d.jsonl", 2, tools=[ADD_TOOL]),
        num_return_sequences=1,
        external_plugins=[str(plugin)],
        multi_turn_scheduler="tools",
        output_format="sft",
    )
    messages = row(records, 1)["messages"]
    assert roles(messages) == ["user", "assistant", "tool", "assistant"]
    assert messages[2]["content"] == "3" and messages[3]["content"] == "The answer is \\boxed{3}."
    assert fake_server.last_body["tools"] == [ADD_TOOL]  # the row's own definition, offered as it is


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


def test_the_gym_scheduler_retries_with_the_environments_feedback(fake_server, tmp_path):
    fake_server.defaults.update(wrong_turns=1)
    records, manifest, _ = client_run(
        fake_server,
        tmp_path,
        sums(tmp_path / "d.jsonl", 2),
        num_return_sequences=2,
        multi_turn_scheduler="gym",
        gym_env="math_retry",
        max_turns=3,
        orm_model="math",
        reward_funcs=["env_reward"],
        output_format="raw",
    )
    c = row(records, 0)["completions"][0]
    assert roles(c["turns"]) == ["assistant", "user", "assistant"]
    assert c["turns"][1]["content"] == "That is not right. Try again: What is 0 + 1?"
    assert c["text"] == "The answer is \\boxed{1}." and c["scores"]["math"]["value"] == 1.0
    assert c["scores"]["env_reward"]["value"] == 1.0
    assert [i["reward"] for i in c["trace"]["turn_infos"]] == [0.0, 1.0]
    assert c["trace"]["rollout_infos"] == {"total_reward": 1.0, "step_rewards": [0.0, 1.0], "gym_done": True}


# ----------------------------------------------------------------------------- ms-swift plugins, unchanged


def test_a_swift_scheduler_plugin_runs_unchanged(fake_server, tmp_path):
    fake_server.defaults.update(agent=1)
    dataset = sums(tmp_path / "d.jsonl", 2, tools=[ADD_TOOL])
    records, manifest, _ = client_run(
        fake_server,
        tmp_path,
        dataset,
        num_return_sequences=2,
        external_plugins=[str(SWIFT_PLUGIN)],
        multi_turn_scheduler="adder_tools",
        output_format="raw",
    )
    c = row(records, 1)["completions"][0]
    assert roles(c["turns"]) == ["assistant", "tool", "assistant"]
    assert c["turns"][1]["content"] == "3" and c["text"] == "The answer is \\boxed{3}."
    assert c["trace"]["rollout_infos"] == {"tool_results": ["3"], "num_tool_turns": 1}
    assert manifest["strategy"]["multi_turn"]["swift_class"].endswith("AdderToolScheduler")


def test_a_swift_3_plugin_runs_unchanged(fake_server, tmp_path):
    records, _, _ = client_run(
        fake_server,
        tmp_path,
        sums(tmp_path / "d.jsonl", 1),
        num_return_sequences=1,
        external_plugins=[str(PLUGINS / "swift3_multi_turn.py")],
        multi_turn_scheduler="one_more",
        output_format="raw",
    )
    c = records[0]["completions"][0]
    assert roles(c["turns"]) == ["assistant", "user", "assistant"]
    assert c["turns"][1]["content"] == "One more time: What is 0 + 1?"
    assert c["trace"]["rollout_infos"] == {"asked_again": True}
    from winnow.registry import REGISTRY

    assert REGISTRY.get("environment", "quiet").source == "swift3_multi_turn.py"


def test_swift_hooks_and_continued_answers(fake_server, tmp_path):
    """on_trajectory_start edits the messages, on_turn_end decides, step writes a tip into the answer."""
    fake_server.defaults.update(wrong_turns=1)
    records, _, _ = client_run(
        fake_server,
        tmp_path,
        sums(tmp_path / "d.jsonl", 2),
        num_return_sequences=1,
        external_plugins=[str(SWIFT_PLUGIN)],
        multi_turn_scheduler="tips",
        output_format="sft",
    )
    messages = row(records, 1)["messages"]
    assert roles(messages) == ["system", "user", "assistant"]
    assert messages[-1]["content"] == (
        "The answer is \\boxed{4}. But wait... let me check again.The answer is \\boxed{3}."
    )
    assert fake_server.last_body["continue_final_message"] is True


def test_a_swift_environment_plugin_plays_through_the_gym_scheduler(fake_server, tmp_path):
    fake_server.defaults.update(wrong_turns=1)
    records, _, _ = client_run(
        fake_server,
        tmp_path,
        sums(tmp_path / "d.jsonl", 1),
        num_return_sequences=2,
        external_plugins=[str(SWIFT_PLUGIN)],
        multi_turn_scheduler="gym_scheduler",
        gym_env="guess",
        reward_funcs=["env_reward"],
        output_format="raw",
    )
    record = records[0]
    assert record["messages"] == [
        {"role": "system", "content": "You guess numbers."},
        {"role": "user", "content": "What is 0 + 1?"},
    ]  # what the environment set
    c = record["completions"][0]
    assert roles(c["turns"]) == ["assistant", "user", "assistant"]
    assert c["turns"][1]["content"] == "Wrong. What is 0 + 1?"
    assert c["scores"]["env_reward"]["value"] == 0.5
    assert c["trace"]["rollout_infos"]["reset_info"] == {"answer": "1"}


SWIFT_PYTHON = Path.home() / ".cache/winnow-peers/ms-swift/venv/bin/python"
WITH_REAL_SWIFT = r"""
import asyncio, json, sys
from winnow import registry
from winnow.multiturn.driver import MultiTurn, build_scheduler
from winnow.schema import Completion, Prompt, SamplingParams

names = registry.load_plugin(sys.argv[1])
target = registry.REGISTRY.get("scheduler", "adder_tools").obj

class Scripted:  # calls add(2, 3), then answers with the tool's result
    name = "scripted"
    def batch_plan(self, n):
        return 64, 1
    async def generate(self, prompts, params):
        def reply(p, i):
            tool = [m for m in p.messages if m["role"] == "tool"]
            if tool:
                return Completion(text="The answer is \\boxed{%s}." % tool[-1]["content"])
            return Completion(text="", finish_reason="tool_calls", tool_calls=[{"id": f"c{i}", "type": "function",
                              "function": {"name": "add", "arguments": json.dumps({"a": 2, "b": 3})}}])
        return [[reply(p, i) for i in range(params.n)] for p in prompts]

class Ctx:
    def __init__(self):
        self.engine, self.params, self.counters = Scripted(), SamplingParams(n=2), {}
    def count(self, name, value=1):
        self.counters[name] = self.counters.get(name, 0) + value

strategy = MultiTurn(build_scheduler("adder_tools", target, {}, {"max_turns": 4}), scheduler_name="adder_tools",
                     max_turns=4)
groups = asyncio.run(strategy.run([Prompt(id="p", messages=[{"role": "user", "content": "What is 2 + 3?"}])], Ctx()))
print(json.dumps({"names": names, "bases": [f"{c.__module__}.{c.__name__}" for c in target.__mro__[1:3]],
                  "turns": groups[0].completions[1].turns, "trace": groups[0].completions[1].trace}))
"""


@pytest.mark.skipif(
    not SWIFT_PYTHON.exists(),
    reason="ms-swift is not installed beside (bash ../shared/peers/ms-swift/run_peer_bench.sh installs it)",
)
def test_with_the_real_ms_swift_installed_its_own_classes_are_driven():
    proc = subprocess.run(
        [str(SWIFT_PYTHON), "-c", WITH_REAL_SWIFT, str(SWIFT_PLUGIN)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["names"] == ["adder_tools", "tips", "run_owner", "guess"]  # read from swift's own tables
    assert out["bases"] == ["swift.rollout.multi_turn.MultiTurnScheduler", "swift.rollout.multi_turn.RolloutScheduler"]
    assert roles(out["turns"]) == ["assistant", "tool", "assistant"] and out["turns"][1]["content"] == "5"
    assert out["turns"][1]["tool_call_id"] == "c1" and out["turns"][2]["content"] == "The answer is \\boxed{5}."
    assert out["trace"]["rollout_infos"] == {"tool_results": ["5"], "num_tool_turns": 1}


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


# ----------------------------------------------------------------------------- the transformers engine


def test_the_demo_policy_with_a_calculator_scheduler(tmp_path):
    out = tmp_path / "out"
    proc = run_winnow(
        "sample",
        "--model",
        "demo-policy",
        "--dataset",
        "demo-arith#12",
        "--num_return_sequences",
        "3",
        "--external_plugins",
        str(CALCULATOR_CHECK),
        "--multi_turn_scheduler",
        "calculator_check",
        "--max_turns",
        "4",
        "--orm_model",
        "math",
        *raw_output(out),
    )
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(out / "o.jsonl")
    compute = json.loads((out / "o.manifest.json").read_text())["compute"]
    assert len(records) == 12 and compute["trajectories"] == 36
    assert compute["engine_calls"] < compute["turns"] / 4  # the turns of all trajectories shared the calls
    corrected = 0
    for record in records:
        for c in record["completions"]:
            assert roles(c["turns"]) == ["assistant"]  # corrections are written into the one answer
            infos = c["trace"]["turn_infos"]
            corrected += sum(1 for i in infos if "corrected" in i)
            for info in infos:
                if "corrected" in info:  # the corrected line is in the final answer
                    assert info["corrected"].split(" = ")[0] + " = " + info["corrected"].split(" -> ")[1] in c["text"]
            if c["trace"]["stop_reason"] == "done":  # every step of a finished answer is right
                for step in map(STEP.match, c["text"].splitlines()):
                    if step:
                        assert calculator(f"{step[1]} {step[2]} {step[3]}") == str(int(step[4]))
    assert corrected > 0


# the demo policy in the math_retry environment, two turns at most, scored by the math verifier
RETRY_ENV = ("--multi_turn_scheduler", "gym", "--gym_env", "math_retry", "--max_turns", "2", "--orm_model", "math")


def test_the_demo_policy_plays_the_retry_environment(tmp_path):
    out = tmp_path / "out"
    proc = run_winnow(
        "sample",
        "--model",
        "demo-policy",
        "--dataset",
        "demo-arith#6",
        "--num_return_sequences",
        "4",
        *RETRY_ENV,
        *raw_output(out),
    )
    assert proc.returncode == 0, proc.stderr
    completions = [c for r in read_jsonl(out / "o.jsonl") for c in r["completions"]]
    for c in completions:
        infos = c["trace"]["turn_infos"]
        assert infos[0]["reward"] == (1.0 if infos[0]["info"].get("correct") else 0.0)
        if infos[0]["info"].get("correct"):
            assert roles(c["turns"]) == ["assistant"] and c["scores"]["math"]["value"] == 1.0
        else:
            assert roles(c["turns"]) == ["assistant", "user", "assistant"]
            assert c["turns"][1]["content"].startswith("That is not right. Try again: Compute ")


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


# ----------------------------------------------------------------------------- kill -9 and resume


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
