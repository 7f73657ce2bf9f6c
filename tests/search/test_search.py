"""Search strategies as users run them (search/__init__.py): built from the config, on the demo world's
policy and PRM through the pipeline, the CLI with kill -9 and resume, a plugin strategy, and
``winnow serve`` as the engine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support.commands import raw_output, run_winnow
from tests.support.files import read_jsonl, write_jsonl
from tests.support.search import SEP
from winnow.errors import ConfigError
from winnow.schema import Prompt, SamplingParams
from winnow.search import build_strategy, decode_escapes
from winnow.search.beam import DVTS

DEMO = [
    "--model",
    "demo-policy",
    "--temperature",
    "1.0",
    "--max_new_tokens",
    "64",
    "--orm_model",
    "math",
    "--prm_model",
    "demo-prm",
    "--progress",
    "false",
]

PLUGIN = '''
import dataclasses
from winnow.registry import strategy
from winnow.schema import Group


@strategy("greedy_then_sample")
class GreedyThenSample:
    """One greedy answer, then N-1 samples (a user's own strategy)."""

    name = "greedy_then_sample"

    def __init__(self, n=1, **options):
        self.n = n

    def describe(self):
        return {"name": self.name, "n": self.n}

    async def run(self, prompts, ctx):
        greedy = await ctx.engine.generate(prompts, dataclasses.replace(ctx.params, n=1, temperature=0.0))
        rest = await ctx.engine.generate(prompts, dataclasses.replace(ctx.params, n=self.n - 1))
        ctx.count("engine_calls", 2)
        return [Group(p, g + r, compute={"completion_tokens": sum(c.completion_tokens for c in g + r)})
                for p, g, r in zip(prompts, greedy, rest)]
'''


def test_strategies_are_built_from_the_config_and_escapes_are_read():
    from winnow.config import SampleConfig

    config = SampleConfig(
        model="m",
        dataset=["d.jsonl"],
        sampler_type="dvts",
        num_return_sequences=8,
        search_width=2,
        step_separator="\\n",
        search_kwargs={"unknown_option": 1},
    )
    strategy = build_strategy(config)
    assert isinstance(strategy, DVTS) and strategy.n == 8 and strategy.width == 2 and strategy.separator == "\n"
    assert decode_escapes("a\\n\\tb\\\\n") == "a\n\tb\\n"
    assert build_strategy(SampleConfig(model="m", dataset=["d"], num_return_sequences=6)).describe() == {
        "name": "sample"
    }
    with pytest.raises(ConfigError, match="multiple of M"):
        build_strategy(SampleConfig(model="m", dataset=["d"], sampler_type="beam", num_return_sequences=6))


@pytest.mark.parametrize("strategy", ["beam", "dvts", "mcts"])
def test_each_strategy_on_the_demo_world_ends_in_ordinary_groups(tmp_path, strategy):
    from winnow.config import SampleConfig
    from winnow.pipeline import sample

    out = tmp_path / "out"
    config = SampleConfig(
        model="demo-policy",
        dataset=["demo-arith#6"],
        sampler_type=strategy,
        num_return_sequences=4,
        search_width=2,
        temperature=1.0,
        max_new_tokens=64,
        orm_model="math",
        prm_model="demo-prm",
        output_format="raw",
        output_dir=str(out),
        output_file="raw.jsonl",
        progress=False,
    )
    summary = sample(config)
    records = read_jsonl(out / "raw.jsonl")
    manifest = json.loads((out / "raw.manifest.json").read_text())
    assert summary.groups_written == 6 and len(records) == 6
    assert manifest["strategy"]["name"] == strategy and manifest["strategy"]["step_separator"] is None
    for r in records:
        assert r["search"]["step_separator"] == "\n"  # demo-prm's own: the demo's steps are lines
        assert r["compute"]["completion_tokens"] >= max(c["completion_tokens"] for c in r["completions"])
        assert r["compute"]["prm_evaluations"] > 0 and r["compute"]["engine_calls"] > 0
        nodes = {n["id"]: n for n in r["search"]["nodes"]}
        for c in r["completions"]:
            path = [nodes[s["id"]] for s in c["trace"]["steps"]]
            assert "".join(n["text"] for n in path) == c["text"]  # steps join back into the answer
            assert c["completion_tokens"] == sum(n["tokens"] for n in path)
            assert c["scores"]["demo-prm"]["steps"] and "math" in c["scores"]
            assert len(c["scores"]["demo-prm"]["steps"]) == c["text"].strip().count("\n") + 1
    assert (
        sum(r["compute"]["completion_tokens"] for r in records)
        == summary.completion_tokens
        == manifest["compute"]["completion_tokens"]
    )
    assert manifest["compute"]["prm_evaluations"] == sum(r["compute"]["prm_evaluations"] for r in records)
    # the run's quality at N, the group's size; a group of beams or of tree answers is not N independent
    # draws, so it has no pass@1 unless it is one answer (DVTS's subtrees are independent)
    n = max(len(r["completions"]) for r in records)
    with_pass_at_1 = strategy == "dvts" or n == 1
    assert f"pass@{n}" in summary.quality and ("pass@1" in summary.quality) == with_pass_at_1
    assert manifest["counts"]["quality"] == summary.quality


def test_a_search_run_writes_swift_records_with_rejected_responses(tmp_path):
    out = tmp_path / "out"
    proc = run_winnow(
        "sample",
        *DEMO,
        "--dataset",
        "demo-arith#4",
        "--sampler_type",
        "beam",
        "--num_return_sequences",
        "4",
        "--search_width",
        "2",
        "--n_best_to_keep",
        "1",
        "--output_dir",
        str(out),
        "--output_file",
        "s.jsonl",
    )
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(out / "s.jsonl")
    assert records and len({r["id"] for r in records}) == len(records)  # n_best_to_keep 1: one line a prompt
    assert all(r["messages"][-1]["role"] == "assistant" for r in records)
    assert "compute" not in records[0] and "search" not in records[0]


@pytest.mark.slow
def test_kill_9_during_a_search_run_then_resume_loses_and_repeats_no_group(tmp_path):
    rows = [
        json.loads(line)
        for line in (__import__("winnow.demo", fromlist=["DATA"]).DATA / "arith_test.jsonl")
        .read_text()
        .splitlines()[:40]
    ]
    dataset = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    args = [
        "sample",
        *DEMO,
        "--dataset",
        str(dataset),
        "--sampler_type",
        "beam",
        "--num_return_sequences",
        "4",
        "--search_width",
        "2",
        "--num_sampling_batch_size",
        "2",
        "--output_format",
        "raw",
        "--output_dir",
        str(out),
        "--output_file",
        "o.jsonl",
        "--dataset_shuffle",
        "false",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "winnow", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 300
        while not ((out / "o.jsonl").exists() and len((out / "o.jsonl").read_bytes().splitlines()) >= 6):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no groups written in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    written = (out / "o.jsonl").read_bytes()
    before = [json.loads(line) for line in written[: written.rfind(b"\n") + 1].splitlines()]  # whole lines
    assert 6 <= len(before) < 40
    again = run_winnow(*args, "--resume", "true", timeout=600)
    assert again.returncode == 0, again.stderr
    after = read_jsonl(out / "o.jsonl")
    assert sorted(r["id"] for r in after) == sorted(r["id"] for r in rows)  # none lost, none twice
    assert after[: len(before)] == before  # what was written stays as it was
    assert all(r["compute"]["completion_tokens"] > 0 for r in after)


def test_a_strategy_from_a_plugin_file_runs_with_the_usual_command(tmp_path, tiny_model):
    plugin = tmp_path / "my_strategy.py"
    plugin.write_text(PLUGIN)
    dataset = write_jsonl(tmp_path / "d.jsonl", [{"query": f"Count to {i}."} for i in range(3)])
    out = tmp_path / "out"
    proc = run_winnow(
        "sample",
        "--model",
        str(tiny_model),
        "--dataset",
        str(dataset),
        "--sampler_type",
        "greedy_then_sample",
        "--external_plugins",
        str(plugin),
        "--num_return_sequences",
        "3",
        "--max_new_tokens",
        "4",
        *raw_output(out),
    )
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(out / "o.jsonl")
    assert len(records) == 3 and all(len(r["completions"]) == 3 for r in records)
    manifest = json.loads((out / "o.manifest.json").read_text())
    assert manifest["strategy"] == {"name": "greedy_then_sample", "n": 3} and manifest["compute"]["engine_calls"] == 2
    unknown = run_winnow(
        "sample",
        "--model",
        str(tiny_model),
        "--dataset",
        str(dataset),
        "--sampler_type",
        "nope",
        "--external_plugins",
        str(plugin),
        "--output_dir",
        str(out),
    )
    assert unknown.returncode != 0 and "Unknown strategy 'nope'" in unknown.stderr
    assert "greedy_then_sample" in unknown.stderr and "Traceback" not in unknown.stderr


def test_search_through_winnow_serve_with_continue_final_message(tmp_path):
    import httpx
    import openai

    from tests.support.commands import Server

    srv = Server(tmp_path / "serve.log", "--model", "demo-policy", "--served_model_name", "demo")
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=60)
        problem = [{"role": "user", "content": "Compute (17 + 25) * 2 - 8."}]
        partial = {"role": "assistant", "content": "17 + 25 = 42\n"}
        extra = {"continue_final_message": True, "add_generation_prompt": False}
        resp = client.chat.completions.create(
            model="demo", messages=[*problem, partial], max_tokens=30, temperature=0, stop=[SEP], extra_body=extra
        )
        choice = resp.choices[0].model_dump()
        assert choice["message"]["content"] == "42 * 2 = 84" and choice["stop_reason"] == SEP
        # the same continuation as the local engine's, which renders a partial answer the same way
        from winnow.engines import generate_sync, get_engine

        local = get_engine("transformers", "demo-policy", device="cpu")
        (mine,) = generate_sync(
            local,
            [Prompt(id="a", messages=problem, prefix=partial["content"])],
            SamplingParams(n=1, max_new_tokens=30, temperature=0.0, stop=[SEP]),
        )
        assert mine[0].text == choice["message"]["content"]
        ended = (
            client.chat.completions.create(
                model="demo",
                messages=[*problem, {"role": "assistant", "content": "17 + 25 = 42\n42 * 2 = 84\n84 - 8 = 76\n"}],
                max_tokens=30,
                temperature=0,
                stop=[SEP],
                extra_body=extra,
            )
            .choices[0]
            .model_dump()
        )
        assert ended["message"]["content"] == "The answer is \\boxed{76}." and ended["stop_reason"] is None
        bad = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "demo", "messages": problem, **extra})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
        both = httpx.post(
            f"{srv.url}/v1/chat/completions",
            json={
                "model": "demo",
                "messages": [*problem, partial],
                "continue_final_message": True,
                "add_generation_prompt": True,
            },
        )
        assert both.status_code == 400 and both.json()["error"]["param"] == "add_generation_prompt"
        # a beam search with the client engine against the server
        out = tmp_path / "out"
        proc = run_winnow(
            "sample",
            *DEMO,
            "--sampler_engine",
            "client",
            "--model",
            "demo",
            "--engine_kwargs",
            json.dumps({"base_url": f"{srv.url}/v1"}),
            "--dataset",
            "demo-arith#4",
            "--sampler_type",
            "beam",
            "--num_return_sequences",
            "4",
            "--search_width",
            "2",
            "--output_format",
            "raw",
            "--output_dir",
            str(out),
            "--output_file",
            "o.jsonl",
        )
        assert proc.returncode == 0, proc.stderr
        records = read_jsonl(out / "o.jsonl")
        assert len(records) == 4
        for r in records:
            nodes = {n["id"]: n for n in r["search"]["nodes"]}
            assert all(n.get("end") != "error" for n in nodes.values())
            for c in r["completions"]:
                assert "".join(nodes[s["id"]]["text"] for s in c["trace"]["steps"]) == c["text"]
                assert len(c["trace"]["steps"]) >= 3 and "\\boxed{" in c["text"]  # step by step, to the answer
            assert r["compute"]["completion_tokens"] > 0 and r["compute"]["engine_calls"] >= 3
    finally:
        srv.stop()
