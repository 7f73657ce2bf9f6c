"""winnow sample end to end on a tiny real model: CLI, Python API, outputs, failures, resume."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import winnow
from tests.support.commands import run_winnow
from tests.support.files import read_jsonl, write_jsonl
from winnow.config import SampleConfig


def _outputs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.jsonl") if not p.name.endswith(".failed.jsonl"))


def test_seed_example_writes_25_conversations(tmp_path, tiny_model, math_jsonl):
    proc = run_winnow(
        "sample",
        "--model",
        str(tiny_model),
        "--sampler_engine",
        "pt",
        "--num_return_sequences",
        "5",
        "--dataset",
        f"{math_jsonl}#5",
        "--max_new_tokens",
        "12",
        cwd=tmp_path,
        check=True,
    )
    (out,) = _outputs(tmp_path / "sample_output")
    records = read_jsonl(out)
    assert len(records) == 25
    source = {json.dumps(r["messages"][:-1]) for r in read_jsonl(math_jsonl)}
    per_id = collections.Counter(r["id"] for r in records)
    assert len(per_id) == 5 and set(per_id.values()) == {5}
    for r in records:
        msgs = r["messages"]
        assert msgs[-1]["role"] == "assistant" and isinstance(msgs[-1]["content"], str)
        assert json.dumps(msgs[:-1]) in source  # the dataset's conversation, last turn replaced
    assert "finished: 5 groups (25 lines) from 5 rows" in proc.stderr
    manifest = json.loads(out.with_name(out.name[:-6] + ".manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["seed"] == 42
    assert manifest["engine"]["name"] == "transformers"
    assert {"winnow", "torch", "transformers"} <= set(manifest["versions"])
    assert manifest["counts"]["samples"] == 25 and manifest["wall_s"] > 0 and manifest["tokens_per_s"] > 0


def test_python_api_matches_cli(tmp_path, tiny_model, math_jsonl):
    args = dict(
        model=str(tiny_model),
        dataset=[f"{math_jsonl}#4"],
        num_return_sequences=3,
        max_new_tokens=8,
        temperature=0.0,
        output_dir=str(tmp_path / "api"),
        output_file="o.jsonl",
        progress=False,
    )
    summary = winnow.sample(SampleConfig(**args))
    assert summary.groups_written == 4 and summary.records_written == 12
    run_winnow(
        "sample",
        "--model",
        str(tiny_model),
        "--dataset",
        f"{math_jsonl}#4",
        "--num_return_sequences",
        "3",
        "--max_new_tokens",
        "8",
        "--temperature",
        "0",
        "--output_dir",
        str(tmp_path / "cli"),
        "--output_file",
        "o.jsonl",
        check=True,
    )
    api = read_jsonl(tmp_path / "api" / "o.jsonl")
    cli = read_jsonl(tmp_path / "cli" / "o.jsonl")
    key = lambda r: (r["id"], r["messages"][-1]["content"])  # noqa: E731
    assert sorted(api, key=key) == sorted(cli, key=key)  # greedy: identical records
    # sampling_main takes the swift-shaped entry too
    summary = winnow.sampling_main(
        [
            "--model",
            str(tiny_model),
            "--dataset",
            f"{math_jsonl}#2",
            "--num_return_sequences",
            "2",
            "--max_new_tokens",
            "4",
            "--output_dir",
            str(tmp_path / "main"),
            "--progress",
            "false",
        ]
    )
    assert summary.records_written == 4


def test_existing_output_is_never_silently_overwritten(tmp_path, tiny_model, math_jsonl):
    common = [
        "sample",
        "--model",
        str(tiny_model),
        "--dataset",
        f"{math_jsonl}#2",
        "--num_return_sequences",
        "2",
        "--max_new_tokens",
        "4",
        "--output_file",
        "x.jsonl",
    ]
    run_winnow(*common, cwd=tmp_path, check=True)
    before = (tmp_path / "sample_output" / "x.jsonl").read_text()
    proc = run_winnow(*common, cwd=tmp_path)
    assert proc.returncode == 2
    assert "already exists" in proc.stderr and "--resume true" in proc.stderr
    assert (tmp_path / "sample_output" / "x.jsonl").read_text() == before
    run_winnow(*common, "--override_exist_file", "true", cwd=tmp_path, check=True)
    assert len(read_jsonl(tmp_path / "sample_output" / "x.jsonl")) == 4


def test_bad_rows_are_logged_or_stop_the_run_with_strict(tmp_path, tiny_model):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"messages": [{"role": "user", "content": "good one"}]},
            "{broken",
            {"messages": [{"role": "user", "content": "good two"}]},
            {"instruction": ""},
        ],
    )
    common = [
        "sample",
        "--model",
        str(tiny_model),
        "--dataset",
        str(path),
        "--num_return_sequences",
        "2",
        "--max_new_tokens",
        "4",
        "--output_file",
        "o.jsonl",
        "--dataset_shuffle",
        "false",
    ]
    proc = run_winnow(*common, "--strict", "true", cwd=tmp_path)
    assert proc.returncode == 2
    assert f"{path}:2" in proc.stderr and "invalid JSON" in proc.stderr
    assert not (tmp_path / "sample_output" / "o.jsonl").exists()  # nothing generated
    proc = run_winnow(*common, cwd=tmp_path, check=True)
    assert "2 rows failed" in proc.stderr
    assert len(read_jsonl(tmp_path / "sample_output" / "o.jsonl")) == 4
    failed = read_jsonl(tmp_path / "sample_output" / "o.failed.jsonl")
    assert [f["source"] for f in failed] == [f"{path}:2", f"{path}:4"]
    assert all(f["reason"] and f["stage"] == "data" for f in failed)


def test_data_range_shards_union_is_the_whole_run(tmp_path, tiny_model):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(7)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ids = []
    for i in range(3):
        winnow.sample(
            model=str(tiny_model),
            dataset=[str(path)],
            num_return_sequences=1,
            max_new_tokens=2,
            data_range=[i, 3],
            output_dir=str(tmp_path),
            output_file=f"s{i}.jsonl",
            progress=False,
        )
        ids += [r["id"] for r in read_jsonl(tmp_path / f"s{i}.jsonl")]
    assert len(ids) == 7 and len(set(ids)) == 7


def test_stop_words_and_finish_reasons(tiny_model):
    from winnow.engines import generate_sync
    from winnow.engines.transformers import TransformersEngine
    from winnow.schema import Prompt, SamplingParams

    engine = TransformersEngine(str(tiny_model), seed=0, max_batch_sequences=4)
    prompts = [Prompt(id=str(i), messages=[{"role": "user", "content": "hello " * (i + 1)}]) for i in range(3)]
    out = generate_sync(engine, prompts, SamplingParams(n=5, max_new_tokens=6))
    assert [len(c) for c in out] == [5, 5, 5]  # split over calls of at most 4 sequences, still 5 each
    for cs in out:
        for c in cs:
            assert c.finish_reason in ("stop", "length")
            assert c.prompt_tokens > 0 and 0 < c.completion_tokens <= 6
            if c.finish_reason == "length":
                assert c.completion_tokens == 6
    # a stop word cuts the text before it
    words = [w for c in out[0] for w in c.text.split() if len(w) > 1]
    if words:
        stop = words[0]
        cut = generate_sync(engine, prompts[:1], SamplingParams(n=3, max_new_tokens=6, stop=[stop], temperature=0))
        assert all(stop not in c.text for c in cut[0])
    # too long for max_length: that prompt fails, the others do not
    engine.encoder.max_length = 60
    mixed = [Prompt(id="long", messages=[{"role": "user", "content": "word " * 200}]), prompts[0]]
    out = generate_sync(engine, mixed, SamplingParams(n=2, max_new_tokens=4))
    assert all(c.finish_reason == "error" and "max_length" in c.error for c in out[0])
    assert all(c.finish_reason != "error" for c in out[1])


def test_llama_architecture_and_template_file(tmp_path, tiny_llama, math_jsonl):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] ")
    summary = winnow.sample(
        model=str(tiny_llama),
        dataset=[f"{math_jsonl}#2"],
        num_return_sequences=2,
        max_new_tokens=4,
        template=str(template),
        system="Be brief.",
        output_dir=str(tmp_path),
        output_file="l.jsonl",
        progress=False,
    )
    assert summary.records_written == 4
    records = read_jsonl(tmp_path / "l.jsonl")
    assert records[0]["messages"][0] == {"role": "system", "content": "Be brief."}


def _wait_lines(path: Path, n: int, proc: subprocess.Popen, deadline_s: float = 120) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {n} lines: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.01)  # polling a file another process writes; no server involved
    raise AssertionError(f"no {n} lines within {deadline_s}s")


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_model):
    rows = [{"messages": [{"role": "user", "content": f"question {i}: what is {i} + {i}?"}]} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    common = [
        "--model",
        str(tiny_model),
        "--dataset",
        str(path),
        "--num_return_sequences",
        "3",
        "--max_new_tokens",
        "24",
        "--num_sampling_batch_size",
        "1",
        "--output_dir",
        str(tmp_path),
        "--progress",
        "false",
    ]
    run_winnow("sample", *common, "--output_file", "full.jsonl", check=True)
    full = read_jsonl(tmp_path / "full.jsonl")

    for attempt, kill_after in enumerate((9, 60)):
        name = f"killed{attempt}.jsonl"
        out = tmp_path / name
        proc = subprocess.Popen(
            [sys.executable, "-m", "winnow", "sample", *common, "--output_file", name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_lines(out, kill_after, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        partial = out.read_bytes().count(b"\n")
        assert partial < len(full), "the run finished before it was killed; make it longer"
        resumed = run_winnow("sample", *common, "--output_file", name, "--resume", "true", check=True)
        assert "rows already done" in resumed.stderr
        records = read_jsonl(out)  # every line parses: nothing torn
        assert collections.Counter(r["id"] for r in records) == collections.Counter(r["id"] for r in full)
        assert all(len(r["messages"]) == 2 for r in records)
        # resuming a finished run does nothing more
        again = run_winnow("sample", *common, "--output_file", name, "--resume", "true", check=True)
        assert "0 groups" in again.stderr and len(read_jsonl(out)) == len(full)


def test_sigint_stops_cleanly_and_resumes(tmp_path, tiny_model):
    rows = [{"messages": [{"role": "user", "content": f"q {i}"}]} for i in range(60)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    common = [
        "--model",
        str(tiny_model),
        "--dataset",
        str(path),
        "--num_return_sequences",
        "2",
        "--max_new_tokens",
        "24",
        "--num_sampling_batch_size",
        "1",
        "--output_dir",
        str(tmp_path),
        "--output_file",
        "i.jsonl",
        "--progress",
        "false",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "winnow", "sample", *common],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_lines(tmp_path / "i.jsonl", 6, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    manifest = json.loads((tmp_path / "i.manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    done = len(read_jsonl(tmp_path / "i.jsonl"))
    assert done % 2 == 0 and done < 120  # whole groups only
    run_winnow("sample", *common, "--resume", "true", check=True)
    records = read_jsonl(tmp_path / "i.jsonl")
    assert len(records) == 120 and set(collections.Counter(r["id"] for r in records).values()) == {2}


def test_samples_share_their_prompts_prefill_and_come_out_the_same(tiny_model):
    """The N samples of a prompt decode from one prefill (the model sees each prompt once, not N times), and
    with the same seed they are the samples a plain per-sample prefill gives."""
    import torch

    from winnow.engines import generate_sync
    from winnow.engines.transformers import TransformersEngine
    from winnow.schema import Prompt, SamplingParams

    prompts = [
        Prompt(id=str(i), messages=[{"role": "user", "content": f"Count to {i} and say why."}]) for i in range(3)
    ]
    texts, first_batches = {}, {}
    for shared in (True, False):
        engine = TransformersEngine(str(tiny_model), shared_prefill=shared)
        seen: list[tuple[int, int]] = []
        hook = engine.model.register_forward_hook(
            lambda module, args, kwargs, out, seen=seen: (
                seen.append(tuple(kwargs["input_ids"].shape)) if kwargs.get("input_ids") is not None else None
            ),
            with_kwargs=True,
        )
        torch.manual_seed(7)
        out = generate_sync(engine, prompts, SamplingParams(n=4, max_new_tokens=12, temperature=1.0))
        hook.remove()
        texts[shared] = [[c.text for c in cs] for cs in out]
        first_batches[shared] = seen[0][0]
    assert first_batches == {True: 3, False: 12}  # one prefill per prompt, against one per sample
    assert texts[True] == texts[False]
