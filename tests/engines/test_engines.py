"""The Engine contract for every engine (engines/__init__.py): a missing library is one line naming the
extra, and each real library (vLLM, SGLang, LMDeploy) on a real tiny model gives N samples with their
token counts, stops, fails a too-long prompt alone, copies a greedy answer and leaves no process behind.

The real libraries run in a subprocess (tests/support/engine_probe.py) with the Python that has them, and
are skipped where they are absent (``pytest -rs`` prints why): vLLM runs on CPU here; SGLang and LMDeploy
need a CUDA device.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.support.commands import run_winnow
from tests.support.engines import (
    GPU_ENGINES,
    PROBE_CONTEXT,
)


def _texts(group: list[dict]) -> list[str]:
    return [c["text"] for c in group]


def _is_resource_tracker(process: dict) -> bool:
    # Python's multiprocessing starts it for shared memory and it ends with its parent: not the engine's
    return "multiprocessing.resource_tracker" in process["cmdline"]


@pytest.mark.parametrize("engine", GPU_ENGINES)
def test_missing_library_is_one_line_naming_the_extra(engine, tmp_path, math_jsonl):
    if importlib.util.find_spec(engine) is not None:
        pytest.skip(f"{engine} is installed here; this test checks the message shown where it is not")
    proc = run_winnow(
        "sample",
        "--sampler_engine",
        engine,
        "--model",
        str(tmp_path),
        "--dataset",
        str(math_jsonl),
        "--output_dir",
        str(tmp_path / "out"),
    )
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"pip install 'winnow[{engine}]'" in lines[0]


@pytest.mark.slow
def test_real_engine_gives_n_samples_with_their_token_counts(probe):
    sampled = probe["sampled"]
    assert [len(group) for group in sampled["out"]] == [3, 3]
    for group, prompt_tokens in zip(sampled["out"], sampled["prompt_tokens"], strict=True):
        for c in group:
            assert c["error"] is None and c["finish_reason"] in ("stop", "length"), c
            assert c["prompt_tokens"] == prompt_tokens  # the backend counted winnow's own prompt tokens
            assert 1 <= c["completion_tokens"] <= 8
            if c["finish_reason"] == "length":
                assert c["completion_tokens"] == 8
    assert "length" in {c["finish_reason"] for group in sampled["out"] for c in group}


@pytest.mark.slow
def test_real_engine_stops_on_a_stop_word(probe):
    assert "stop" in probe, f"the model's greedy answer has no usable stop word: {probe['greedy'][0][0]}"
    greedy = probe["greedy"][0][0]["text"]
    word = probe["stop"]["word"]
    (c,) = probe["stop"]["out"][0]
    assert c["text"] == greedy[: greedy.find(word)] and c["text"] and word not in c["text"]
    assert c["finish_reason"] == "stop" and c["completion_tokens"] < probe["greedy"][0][0]["completion_tokens"]


@pytest.mark.slow
def test_real_engine_fails_a_too_long_prompt_alone(probe):
    first, too_long, last = probe["too_long"]
    assert len(too_long) == 2 and all(c["finish_reason"] == "error" and c["error"] for c in too_long)
    # winnow's prompt check refuses it first, against the backend's own context (not the model's larger one)
    assert f"the limit is {PROBE_CONTEXT}" in too_long[0]["error"], too_long[0]["error"]
    assert [len(first), len(last)] == [2, 2]
    assert all(c["error"] is None and c["completion_tokens"] >= 1 for c in first + last)


@pytest.mark.slow
def test_real_engine_copies_a_greedy_answer(probe):
    (group,) = probe["greedy"]
    assert len(group) == 3 and len(set(_texts(group))) == 1 and group[0]["error"] is None
    assert len({(c["finish_reason"], c["completion_tokens"]) for c in group}) == 1


@pytest.mark.slow
def test_real_engine_leaves_no_process_after_close(probe):
    engine_procs = [p for p in probe["processes_running"] if not _is_resource_tracker(p)]
    if probe["engine"] == "vllm":  # the engine core and its worker are spawned processes
        assert {p["name"] for p in engine_procs} >= {"VLLM::EngineCor", "VLLM::Worker"}, engine_procs
    left = [p for p in probe["processes_after_close"] if not _is_resource_tracker(p)]
    assert left == [], f"still there after close: {left}"
    # and once the probe has exited, nothing it started lives on (reparented to init)
    alive = [
        p
        for p in probe["processes_running"]
        if Path(f"/proc/{p['pid']}").exists()
        and Path(f"/proc/{p['pid']}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip() == p["cmdline"]
    ]
    assert alive == [], alive
