"""A client-engine run against the fake server, as the reliability tests drive it."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.files import write_jsonl

SECRET = "sk-test-SECRET-4f9a1c"


def client_args(fake_server, out: Path, dataset: Path, *extra: str, **engine: object) -> list[str]:
    kwargs = {"base_url": fake_server.url, "retry_base_s": 0.01, "api_key": SECRET, **engine}
    return [
        "sample",
        "--sampler_engine",
        "client",
        "--model",
        "fake",
        "--dataset",
        str(dataset),
        "--num_return_sequences",
        "1",
        "--output_dir",
        str(out),
        "--output_file",
        "o.jsonl",
        "--progress",
        "false",
        "--engine_kwargs",
        json.dumps(kwargs),
        *extra,
    ]


def sums(tmp_path: Path, n: int, marked: dict[int, str] | None = None) -> Path:
    rows = [{"query": f"What is {i} + {i}? {(marked or {}).get(i, '')}".strip(), "k": i} for i in range(n)]
    return write_jsonl(tmp_path / "d.jsonl", rows)


def distill_args(server, dataset: str | Path, *more: str, **engine: object) -> list[str]:
    """swift's documented distill command (the seed's: deepseek-r1, streamed, T=0.6, top_p 0.95), pointed at
    the fake server."""
    return [
        "sample",
        "--sampler_type",
        "distill",
        "--sampler_engine",
        "client",
        "--model",
        "deepseek-r1",
        "--stream",
        "true",
        "--dataset",
        str(dataset),
        "--num_return_sequences",
        "1",
        "--temperature",
        "0.6",
        "--top_p",
        "0.95",
        "--engine_kwargs",
        json.dumps({"base_url": server.url, **engine}),
        *more,
    ]
