"""Tools (multiturn/tools.py): tool calls and code found in text, tool definitions from signatures, the
Python tool in the sandbox, tool errors as results, plugin tools, and the demo policy with a calculator.
"""

from __future__ import annotations

import asyncio
import json
import re

from tests.support import ROOT
from tests.support.commands import raw_output, run_winnow
from tests.support.files import read_jsonl
from tests.support.multiturn import ADD_TOOL, client_run, roles, row, sums
from winnow.multiturn import Trajectory
from winnow.multiturn.tools import ToolScheduler, calculator, function_spec, parse_tool_calls, trailing_code
from winnow.schema import Completion, Prompt

CALCULATOR_CHECK = ROOT / "docs" / "examples" / "calculator_check.py"

STEP = re.compile(r"^\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")


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
