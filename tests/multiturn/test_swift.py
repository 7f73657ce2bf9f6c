"""ms-swift's multi-turn plugins (multiturn/swift.py): scheduler and environment plugins of swift 3 and 4
loaded unchanged, their hooks, and ms-swift's own classes when it is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support import PLUGINS, ROOT
from tests.support.multiturn import ADD_TOOL, SWIFT_PLUGIN, client_run, roles, row, sums

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
