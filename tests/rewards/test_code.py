"""The ``code`` reward: program extraction, the three test formats, scores and verdicts, and the ORM in a
two-stage CLI run. HumanEval problems from tests/data/humaneval_10.jsonl (see tests/data/README.md).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from tests.support import DATA
from tests.support.commands import run_winnow
from tests.support.files import read_jsonl, write_jsonl
from winnow import data, registry
from winnow.errors import ConfigError
from winnow.rewards.base import Sample
from winnow.rewards.code import CodeReward, extract_program
from winnow.schema import Completion, Prompt

HUMANEVAL = DATA / "humaneval_10.jsonl"

ROWS = [json.loads(line) for line in HUMANEVAL.read_text().splitlines()]


@pytest.fixture(scope="module")
def code_reward():
    r = CodeReward(timeout_s=5, workers=2)
    yield r
    asyncio.run(r.aclose())


def prompts_from(path: Path) -> list[Prompt]:
    """The rows of a dataset file as the pipeline sees them."""
    plan = data.build_plan([str(path)], seed=0)
    return sorted((plan.read(i) for i in range(len(plan))), key=lambda p: p.columns.get("task_id", p.id))


def score(reward: CodeReward, prompt: Prompt, texts: list[str]):
    return asyncio.run(reward.score([Sample(prompt, Completion(text=t)) for t in texts]))


def row_prompt(**columns) -> Prompt:
    return Prompt(id="row", messages=[{"role": "user", "content": "Write the program."}], columns=columns)


def test_extract_program():
    assert extract_program("just code()") == "just code()"
    assert extract_program("a\n```python\nx = 1\n```\nthen\n```py\ny = 2\n```\nbye") == "y = 2\n"
    assert extract_program("```\nbare = 1\n```") == "bare = 1\n"
    assert extract_program("```python\nz = 3\n```\n```text\nnot code\n```") == "z = 3\n"
    assert extract_program("cut off:\n```python\nw = 4\n") == "w = 4\n"  # a truncated answer


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(code_reward):
    prompts = prompts_from(HUMANEVAL)
    assert len(prompts) == 10 and "prompt" not in prompts[0].columns  # the prompt is the user turn
    texts = {
        "canonical": lambda row: row["canonical_solution"],
        "full program in a fence": lambda row: f"Here it is:\n```python\n{row['prompt']}{row['canonical_solution']}```",
        "wrong": lambda row: "    return None\n",
        "exit(0) before the tests": lambda row: "    import sys\n    sys.exit(0)\n",
        "os._exit(0) before the tests": lambda row: "    import os\n    os._exit(0)\n",
        "syntax error": lambda row: "    return (\n",
    }
    samples = [
        Sample(p, Completion(text=make(row))) for p, row in zip(prompts, ROWS, strict=True) for make in texts.values()
    ]
    scores = asyncio.run(code_reward.score(samples))
    by_kind = {kind: [s.value for s in scores[i :: len(texts)]] for i, kind in enumerate(texts)}
    assert by_kind["canonical"] == [1.0] * 10
    assert by_kind["full program in a fence"] == [1.0] * 10
    for kind in ("wrong", "exit(0) before the tests", "os._exit(0) before the tests", "syntax error"):
        assert by_kind[kind] == [0.0] * 10, kind
    assert scores[0].info == {"passed": 1, "total": 1, "verdict": "passed"}
    assert scores[len(texts) - 1].info["verdict"].startswith("exit 1: SyntaxError")


def test_humaneval_definition_without_the_prompt_still_sees_its_imports(code_reward):
    prompt = prompts_from(HUMANEVAL)[0]  # has_close_elements(numbers: List[float], ...): List comes from the prompt
    header = "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
    solution = header + ROWS[0]["canonical_solution"]
    assert [s.value for s in score(code_reward, prompt, [solution])] == [1.0]


def test_hanging_and_hostile_samples_fail_within_the_timeout():
    reward = CodeReward(timeout_s=2, workers=2)
    try:
        prompt = prompts_from(HUMANEVAL)[2]  # truncate_number
        hostile = [
            "    while True:\n        pass\n",
            "    import os\n    while True:\n        os.fork()\n",
            "    x = bytearray(2 ** 40)\n",
        ]
        scores = score(reward, prompt, [*hostile, ROWS[2]["canonical_solution"]])
        assert [s.value for s in scores] == [0.0, 0.0, 0.0, 1.0]
        assert scores[0].info["verdict"] == "limit: timeout"
        assert "MemoryError" in scores[2].info["verdict"]
    finally:
        asyncio.run(reward.aclose())


def test_mbpp_asserts_pass_fraction_and_all_or_nothing():
    columns = {
        "test_setup_code": "OFFSET = 0",
        "test_imports": ["import math"],
        "test_list": ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(2, 2) == 5"],
    }
    prompt = row_prompt(**columns)
    fraction = CodeReward(mode="pass_fraction", workers=1)
    strict = CodeReward(workers=1)
    try:
        text = "```python\ndef add(a, b):\n    return a + b + OFFSET + math.floor(0.5)\n```"
        assert [s.value for s in score(fraction, prompt, [text, "def add(a, b): return 3"])] == [2 / 3, 1 / 3]
        scores = score(strict, prompt, [text])
        assert scores[0].value == 0.0 and scores[0].info["passed"] == 2 and scores[0].info["total"] == 3
        assert scores[0].info["verdict"] == "failed: test 2: AssertionError:"
        two = row_prompt(test_list=columns["test_list"][:2])
        assert [s.value for s in score(strict, two, ["def add(a, b):\n    return a + b"])] == [1.0]
    finally:
        asyncio.run(fraction.aclose())
        asyncio.run(strict.aclose())


@pytest.mark.parametrize(
    "columns",
    [
        {"inputs": ["1 2\n", "5 7\n"], "outputs": ["3\n", "12"]},
        {"input_output": json.dumps({"inputs": ["1 2\n", "5 7\n"], "outputs": ["3\n", "12\n"]})},
        {"input_output": {"inputs": [["1 2"], ["5 7"]], "outputs": [["3"], ["12"]]}},
        {
            "public_tests": {"input": ["1 2\n"], "output": ["3\n"]},
            "private_tests": {"input": ["5 7\n"], "output": ["12"]},
        },
    ],
    ids=["inputs-outputs", "apps-json", "apps-lists", "codecontests"],
)
def test_stdin_stdout_pairs(columns):
    reward = CodeReward(mode="pass_fraction", workers=2)
    try:
        prompt = row_prompt(**columns)
        right = "a, b = map(int, input().split())\nprint(a + b, '  ')\n\n"  # trailing spaces are forgiven
        first_only = "a, b = map(int, input().split())\nprint(3)"
        crash = "print(3)\nraise SystemExit(2)"
        scores = score(reward, prompt, [right, first_only, crash])
        assert [s.value for s in scores] == [1.0, 0.5, 0.0]
        assert scores[1].info["verdict"] == "wrong output" and scores[2].info["verdict"].startswith("exit 2")
    finally:
        asyncio.run(reward.aclose())


def test_rows_it_cannot_judge_are_none(code_reward):
    cases = [
        row_prompt(),
        row_prompt(input_output=json.dumps({"fn_name": "f", "inputs": [[1]], "outputs": [[2]]})),
        row_prompt(inputs=["1"], outputs=["1", "2"]),
        row_prompt(input_output="{not json"),
    ]
    scores = asyncio.run(code_reward.score([Sample(p, Completion(text="print(1)")) for p in cases]))
    assert [s.value for s in scores] == [None] * 4
    assert "no tests" in scores[0].info["verdict"] and "call-based" in scores[1].info["verdict"]


def test_options_are_checked_and_registered():
    with pytest.raises(ConfigError, match="mode must be one of"):
        CodeReward(mode="most")
    entry = registry.get_entry("code")
    reward = registry.build(entry, {"timeout_s": 3, "mode": "pass_fraction", "workers": 1})
    try:
        args = reward.describe()["args"]
        assert args["mode"] == "pass_fraction" and args["timeout_s"] == 3 and args["workers"] == 1
    finally:
        asyncio.run(reward.aclose())
    with pytest.raises(ConfigError, match="unknown option"):
        registry.build(entry, {"timout_s": 3})


def test_code_as_the_orm_of_a_two_stage_run(tmp_path):
    dataset = shutil.copy(HUMANEVAL, tmp_path / "humaneval.jsonl")
    prompts = {p.columns["task_id"]: p for p in prompts_from(Path(dataset))}
    canonical = {row["task_id"]: row["canonical_solution"] for row in ROWS}
    samples = {
        "HumanEval/0": [
            canonical["HumanEval/0"],
            "    return None\n",
            f"```python\n{ROWS[0]['prompt']}{canonical['HumanEval/0']}```",
        ],
        "HumanEval/1": ["    return []\n", "    while True:\n        pass\n", "    import sys\n    sys.exit(0)\n"],
        "HumanEval/2": ["    return number\n", canonical["HumanEval/2"], "    return 0.5\n"],
    }
    lines = [
        {"id": prompts[task].id, "messages": [*prompts[task].messages, {"role": "assistant", "content": t}]}
        for task, texts in samples.items()
        for t in texts
    ]
    cache = write_jsonl(tmp_path / "stage1.jsonl", lines)
    proc = run_winnow(
        "sample",
        "--sampler_engine",
        "no",
        "--cache_files",
        str(cache),
        "--dataset",
        str(dataset),
        "--orm_model",
        "code",
        "--reward_kwargs",
        '{"code": {"timeout_s": 2, "workers": 2}}',
        "--num_return_sequences",
        "3",
        "--n_best_to_keep",
        "2",
        "--output_dir",
        str(tmp_path / "out"),
        "--output_file",
        "code.jsonl",
        "--progress",
        "false",
    )
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(tmp_path / "out" / "code.jsonl")
    got = {}
    for r in records:
        got.setdefault(r["task_id"], []).append((r["messages"][-1]["content"], r["rejected_response"]))
    assert got == {
        "HumanEval/0": [
            (samples["HumanEval/0"][0], "    return None\n"),
            (samples["HumanEval/0"][2], "    return None\n"),
        ],
        "HumanEval/2": [(canonical["HumanEval/2"], "    return number\n")],
    }
    assert "rows filtered (all samples failed the ORM: 1)" in proc.stderr  # HumanEval/1; 7 rows had no samples
