"""Multi-turn runs on the fake server: the rows, one in-process run, and the records it writes."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support import PLUGINS
from tests.support.files import read_jsonl, write_jsonl
from winnow import sample

SWIFT_PLUGIN = PLUGINS / "swift_multi_turn.py"

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


# the demo policy in the math_retry environment, two turns at most, scored by the math verifier
RETRY_ENV = ("--multi_turn_scheduler", "gym", "--gym_env", "math_retry", "--max_turns", "2", "--orm_model", "math")
