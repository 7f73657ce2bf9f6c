"""The ``code`` reward: runs the completion's program against the row's tests in the sandbox
(:mod:`winnow.rewards.sandbox`).

The program is the completion's last fenced Python block (```python, ```py or a bare fence; an
unclosed last fence counts), else the whole completion. The tests come from the row's columns:

- HumanEval: ``test`` (defining ``check(candidate)``) and ``entry_point``; the program continues the
  row's ``prompt`` (the prompt column, else the last user turn), unless it defines the entry point
  itself, when the prompt is kept before it only if it is code on its own (its imports and helpers).
  One test program: 1 or 0.
- MBPP: ``test_list`` (assert statements), with ``test_setup_code`` and ``test_imports`` if present;
  each assert is a test, all run in one program.
- stdin/stdout pairs: ``inputs``/``outputs``, ``input_output`` (APPS/TACO: JSON or a dict), or
  CodeContests' ``public_tests``/``private_tests`` (``input``/``output`` lists); one run per pair,
  passed when the program exits 0 and its output equals the expected one after trimming trailing
  whitespace on each line and blank lines at the ends.

A test passes only if the harness's closing line, carrying a per-program random nonce, is printed:
a program that calls ``exit(0)`` before the tests have run does not pass. Score: ``mode``
``all_or_nothing`` (default: 1 when every test passes, else 0) or ``pass_fraction``; ``None`` (cannot
judge) when the row has no tests this reward knows, or the sandbox itself failed.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from winnow.errors import ConfigError
from winnow.rewards.base import Sample
from winnow.rewards.sandbox import Limits, RunResult, Sandbox, default_python
from winnow.schema import Score

MODES = ("all_or_nothing", "pass_fraction")
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = ("", "python", "python3", "py")


@dataclass
class TestRun:
    """One sandbox run for one sample: a program, its stdin, and how to read its verdict."""

    program: str
    stdin: str | None = None
    expected: str | None = None  # stdin/stdout pairs: the output to match
    nonce: str = ""  # harness programs: each passing test prints "<nonce> <index>"
    tests: int = 1


def extract_program(completion: str) -> str:
    """The last fenced Python (or bare) code block of a completion, else the whole completion."""
    blocks = [body for lang, body in _FENCE.findall(completion) if lang.lower() in _PYTHON_TAGS]
    return blocks[-1] if blocks else completion


def _normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def _as_text(value: Any) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def _is_code(text: str) -> bool:
    try:
        compile(text, "<prompt>", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


def _prompt_text(sample: Sample) -> str:
    prompt = sample.prompt.columns.get("prompt")
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in sample.prompt.messages if m["role"] == "user"]
    return users[-1] if users else ""


def _harness(body: str, tests: list[str]) -> TestRun:
    """``body`` then each test source run in turn, each success announced with a fresh nonce."""
    nonce = secrets.token_hex(12)
    program = (
        f"{body}\n\n"
        f"def _winnow_test(_index, _source):\n"
        f"    try:\n"
        f"        exec(_source, globals())\n"
        f"    except BaseException as _error:\n"
        f"        import sys\n"
        f"        print(f'test {{_index}}: {{type(_error).__name__}}: {{_error}}'[:300], file=sys.stderr)\n"
        f"        return\n"
        f"    print('\\n{nonce}', _index, flush=True)\n\n"
        f"for _index, _source in enumerate({tests!r}):\n"
        f"    _winnow_test(_index, _source)\n"
    )
    return TestRun(program, nonce=nonce, tests=len(tests))


def _io_pairs(columns: dict[str, Any]) -> tuple[list, list] | str | None:
    """(inputs, outputs) of a stdin/stdout row, a reason it cannot be judged, or None if it has none."""
    spec = columns.get("input_output")
    if isinstance(spec, str) and spec.strip():
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError:
            return "input_output is not valid JSON"
    if isinstance(spec, dict):
        if spec.get("fn_name"):
            return "call-based tests (fn_name) are not supported"
        return list(spec.get("inputs") or []), list(spec.get("outputs") or [])
    if isinstance(columns.get("inputs"), list) and isinstance(columns.get("outputs"), list):
        return columns["inputs"], columns["outputs"]
    inputs, outputs = [], []
    for key in ("public_tests", "private_tests"):
        tests = columns.get(key)
        if isinstance(tests, dict):
            inputs += list(tests.get("input") or [])
            outputs += list(tests.get("output") or [])
    return (inputs, outputs) if inputs else None


def build_runs(sample: Sample, max_tests: int | None = None) -> list[TestRun] | str:
    """The sandbox runs that judge one sample, or the reason it cannot be judged."""
    columns = sample.prompt.columns
    code = extract_program(sample.text)
    if isinstance(columns.get("test"), str) and columns.get("entry_point"):
        entry, prompt = str(columns["entry_point"]), _prompt_text(sample)
        if re.search(rf"^(async\s+)?def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
            body = f"{prompt}\n{code}" if _is_code(prompt) else code
        else:
            body = prompt + code
        return [_harness(f"{body}\n\n{columns['test']}", [f"check({entry})"])]
    if isinstance(columns.get("test_list"), list) and columns["test_list"]:
        imports = "\n".join(columns.get("test_imports") or [])
        setup = columns.get("test_setup_code") or ""
        tests = [str(t) for t in columns["test_list"]][:max_tests]
        return [_harness(f"{imports}\n{setup}\n{code}", tests)]
    pairs = _io_pairs(columns)
    if pairs is None:
        return "no tests in the row (test + entry_point, test_list, or input/output pairs)"
    if isinstance(pairs, str):
        return pairs
    inputs, outputs = pairs
    if len(inputs) != len(outputs) or not inputs:
        return f"{len(inputs)} inputs for {len(outputs)} outputs"
    return [TestRun(code, stdin=_as_text(i), expected=_as_text(o)) for i, o in zip(inputs, outputs, strict=True)][
        :max_tests
    ]


def passed_tests(run: TestRun, result: RunResult) -> int:
    """How many of a run's tests passed."""
    if run.expected is not None:
        return int(result.ok and _normalise(result.stdout) == _normalise(run.expected))
    lines = {line.split(" ", 1)[1] for line in result.stdout.splitlines() if line.startswith(run.nonce + " ")}
    return len(lines & {str(i) for i in range(run.tests)})


def _verdict(result: RunResult, run: TestRun, passed: int) -> str:
    if passed == run.tests:
        return "passed"
    if result.limit:
        return f"limit: {result.limit}"
    if result.signal:
        return f"signal {result.signal}"
    last = (result.stderr.strip().splitlines() or [""])[-1][:200]
    if result.exit_code != 0:
        return f"exit {result.exit_code}: {last}"
    if run.expected is not None:
        return "wrong output"
    return f"failed: {last}" if last else "failed: the tests did not run to the end"


class CodeReward:
    """Runs the completion's code against the row's tests (HumanEval, MBPP, stdin/stdout) in a sandbox."""

    def __init__(
        self,
        mode: str = "all_or_nothing",
        timeout_s: float = 5.0,
        cpu_s: float | None = None,
        memory_mb: int = 1024,
        file_size_mb: int = 16,
        disk_mb: int = 64,
        max_processes: int = 16,
        max_output_bytes: int = 1 << 20,
        network: bool = False,
        workers: int | None = None,
        max_tests: int | None = None,
        python: str | None = None,
    ):
        if mode not in MODES:
            raise ConfigError(f"reward code: mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.name = "code"
        self.mode = mode
        self.max_tests = max_tests
        limits = Limits(
            timeout_s=timeout_s,
            cpu_s=cpu_s,
            memory_mb=memory_mb,
            file_size_mb=file_size_mb,
            disk_mb=disk_mb,
            max_processes=max_processes,
            max_output_bytes=max_output_bytes,
            network=network,
        )
        self.sandbox = Sandbox(limits, workers=workers, python=python or default_python())

    def describe(self) -> dict[str, Any]:
        return {"args": {"mode": self.mode, "max_tests": self.max_tests, **self.sandbox.describe()}}

    async def _judge(self, sample: Sample) -> Score:
        runs = build_runs(sample, self.max_tests)
        if isinstance(runs, str):
            return Score(value=None, info={"verdict": runs})
        results = await asyncio.gather(*(self.sandbox.arun(r.program, r.stdin) for r in runs))
        broken = next((res.error for res in results if res.error), None)
        if broken:
            return Score(value=None, info={"verdict": f"sandbox error: {broken}"})
        passed = [passed_tests(r, res) for r, res in zip(runs, results, strict=True)]
        total, ok = sum(r.tests for r in runs), sum(passed)
        verdicts = [_verdict(res, r, p) for r, res, p in zip(runs, results, passed, strict=True)]
        first_failure = next((v for v in verdicts if v != "passed"), "passed")
        value = ok / total if self.mode == "pass_fraction" else float(ok == total)
        return Score(value=value, info={"passed": ok, "total": total, "verdict": first_failure})

    async def score(self, samples: list[Sample]) -> list[Score]:
        return list(await asyncio.gather(*(self._judge(s) for s in samples)))

    async def aclose(self) -> None:
        await asyncio.to_thread(self.sandbox.close)
