"""End to end: ``winnow sample --sampler_engine client`` against a real ``winnow serve`` subprocess."""

from __future__ import annotations

import json
import signal

import pytest

from tests.support.commands import Server, run_winnow
from tests.support.files import read_jsonl, write_jsonl

KEY = "sk-client-serve-test"


@pytest.mark.slow
def test_client_engine_samples_from_winnow_serve(tmp_path, tiny_model):
    srv = Server(
        tmp_path / "serve.log",
        "--model",
        str(tiny_model),
        "--served_model_name",
        "tiny",
        "--api_key",
        KEY,
        "--max_wait_ms",
        "20",
    )
    try:
        data = write_jsonl(tmp_path / "d.jsonl", [{"query": f"What is {i} + 1?"} for i in range(3)])
        proc = run_winnow(
            "sample",
            "--sampler_engine",
            "client",
            "--model",
            "tiny",
            "--dataset",
            str(data),
            "--num_return_sequences",
            "3",
            "--max_new_tokens",
            "8",
            "--stream",
            "true",
            "--engine_kwargs",
            json.dumps({"base_url": f"{srv.url}/v1", "keep_truncated": True}),
            "--output_file",
            "o.jsonl",
            cwd=tmp_path,
            env={"OPENAI_API_KEY": KEY},
            timeout=300,
            check=True,
        )
    finally:
        assert srv.stop(signal.SIGINT) == 0, srv.output()[-2000:]
    out = read_jsonl(tmp_path / "sample_output" / "o.jsonl")
    manifest = json.loads((tmp_path / "sample_output" / "o.manifest.json").read_text())
    # tiny random weights mostly run to max_new_tokens: keep_truncated keeps those answers
    assert len(out) == 3 * 3, proc.stderr[-2000:]
    assert all(r["messages"][-1]["role"] == "assistant" for r in out)
    assert manifest["counts"]["completion_tokens"] > 0 and manifest["counts"]["prompt_tokens"] > 0
    assert KEY not in (tmp_path / "sample_output" / "o.manifest.json").read_text() + proc.stderr
