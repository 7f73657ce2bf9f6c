"""The fault suite: each defect the reliability audit found, reproduced with real processes, real signals
and the fault-injecting server, and what must hold instead.

Kill-and-resume at random points over many cycles is ``benchmarks/chaos.py``; these are the named cases.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.client import SECRET, client_args, sums
from tests.support.commands import run_winnow, wait_for
from tests.support.files import files_text, read_jsonl, write_jsonl

# ----------------------------------------------------------------------------- 1. retries and kills


def test_rows_waiting_for_a_retry_survive_a_resumed_run_that_is_killed(tmp_path, fake_server):
    dataset = sums(tmp_path, 60, {i: "[[503-1]]" for i in range(14)})
    out = tmp_path / "out"
    first = run_winnow(*client_args(fake_server, out, dataset, "--max_retries", "0"))
    assert first.returncode == 0, first.stderr
    assert len(read_jsonl(out / "o.jsonl")) == 46 and len(read_jsonl(out / "o.failed.jsonl")) == 14
    # resumed, then killed while the retries are in flight (the server holds them)
    fake_server.defaults["latency"] = 120.0
    before = fake_server.chat_requests
    proc = subprocess.Popen(
        [sys.executable, "-m", "winnow", *client_args(fake_server, out, dataset, "--resume", "true")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: fake_server.chat_requests >= before + 14, what="the resumed run's retries")
    finally:
        proc.kill()
        proc.wait(30)
    failed = read_jsonl(out / "o.failed.jsonl")
    assert len(failed) == 14 and all(f["retry"] for f in failed), "the rows to retry must stay in the failed log"
    assert len(read_jsonl(out / "o.jsonl")) == 46
    fake_server.defaults["latency"] = 0.0
    third = run_winnow(*client_args(fake_server, out, dataset, "--resume", "true"))
    assert third.returncode == 0, third.stderr
    records = read_jsonl(out / "o.jsonl")
    assert sorted(r["k"] for r in records) == list(range(60))
    assert not (out / "o.failed.jsonl").exists()
    assert "60 rows settled of 60: 60 written" in third.stderr
    manifest = json.loads((out / "o.manifest.json").read_text())
    assert manifest["totals"]["groups"] == 60 and manifest["totals"]["failed"] == 0


# ----------------------------------------------------------------------------- 2. cut streams


def test_a_stream_cut_off_mid_answer_is_retried_never_written(tmp_path, fake_server):
    marks = {**{i: "[[cut-1]]" for i in range(6)}, 6: "[[cutdrop-1]]", 7: "[[cut-always]]", 8: "[[cutdrop-always]]"}
    dataset = sums(tmp_path, 12, marks)
    out = tmp_path / "out"
    proc = run_winnow(*client_args(fake_server, out, dataset, "--stream", "true", "--max_retries", "2"))
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(out / "o.jsonl")
    assert sorted(r["k"] for r in records) == [k for k in range(12) if k not in (7, 8)]
    for r in records:  # every written answer is whole, none a fragment
        assert r["messages"][-1]["content"] == f"The answer is \\boxed{{{2 * r['k']}}}."
    failed = read_jsonl(out / "o.failed.jsonl")
    assert sorted(f["source"].rsplit(":", 1)[1] for f in failed) == ["8", "9"]
    assert all(f["retry"] for f in failed)
    assert any("cut stream" in f["reason"] for f in failed)


# ----------------------------------------------------------------------------- 3. secrets


def test_no_secret_reaches_the_disk_or_the_terminal(tmp_path, fake_server):
    dataset = sums(tmp_path, 4)
    out = tmp_path / "out"
    header_secret, token = "hdr-SECRET-9999", "hf_tok_SECRET_7777"
    args = client_args(fake_server, out, dataset, headers={"Authorization": f"Bearer {header_secret}"}, hub_token=token)
    proc = run_winnow(*args, env={"OPENAI_API_KEY": "sk-env-SECRET-1234"})
    assert proc.returncode == 0, proc.stderr
    text = files_text(out) + proc.stdout + proc.stderr
    for secret in (SECRET, header_secret, token, "sk-env-SECRET-1234"):
        assert secret not in text
    manifest = json.loads((out / "o.manifest.json").read_text())
    assert manifest["config"]["engine_kwargs"]["api_key"] == "***"
    assert manifest["config"]["engine_kwargs"]["base_url"] == fake_server.url  # not a secret: kept
    assert "***" in " ".join(manifest["command"])


def test_credentials_in_the_base_url_are_refused_in_one_line(tmp_path, fake_server):
    dataset = sums(tmp_path, 2)
    url = fake_server.url.replace("http://", "http://user:pw-SECRET-5555@")
    proc = run_winnow(*client_args(fake_server, tmp_path / "out", dataset, base_url=url))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "holds credentials" in lines[0] and "pw-SECRET-5555" not in proc.stderr
    assert fake_server.chat_requests == 0


# ----------------------------------------------------------------------------- 7. fatal errors


def test_a_401_fails_the_run_and_the_manifest_says_so(tmp_path, fake_server):
    dataset = sums(tmp_path, 3, {0: "[[401-always]]", 1: "[[401-always]]", 2: "[[401-always]]"})
    out = tmp_path / "out"
    proc = run_winnow(*client_args(fake_server, out, dataset))
    assert proc.returncode == 1, proc.stderr
    assert "rejected the API key" in proc.stderr and SECRET not in proc.stderr
    manifest = json.loads((out / "o.manifest.json").read_text())
    assert manifest["status"] == "failed" and "rejected the API key" in manifest["error"]
    assert SECRET not in files_text(out)
    assert not (out / "o.jsonl").exists(), "an empty output must not look like a finished one"


def test_a_reward_that_raises_fails_the_run(tmp_path, fake_server):
    plugin = tmp_path / "broken.py"
    plugin.write_text(
        "def explode(completions, **kw):\n    raise RuntimeError('the reward broke')\n\n"
        "rewards = {'explode': explode}\n"
    )
    dataset = sums(tmp_path, 3)
    out = tmp_path / "out"
    proc = run_winnow(
        *client_args(fake_server, out, dataset, "--external_plugins", str(plugin), "--reward_funcs", "explode")
    )
    assert proc.returncode == 1 and "the reward broke" in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, proc.stderr
    manifest = json.loads((out / "o.manifest.json").read_text())
    assert manifest["status"] == "failed" and "the reward broke" in manifest["error"]


# ----------------------------------------------------------------------------- 6. bad files, full disks


def test_bad_files_are_one_line_or_a_bad_row_never_a_traceback(tmp_path, fake_server):
    ragged = tmp_path / "ragged.csv"
    ragged.write_text('query,k\nWhat is 1 + 1?,1\nWhat is 2 + 2?,2,extra\n"What is 3 + 3?",3\n')
    latin = tmp_path / "latin.json"
    latin.write_bytes('[{"query": "caf\xe9"}]'.encode("latin-1"))
    proc = run_winnow(*client_args(fake_server, tmp_path / "a", ragged))
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["k"] for r in read_jsonl(tmp_path / "a" / "o.jsonl")) == ["1", "3"]
    [bad] = read_jsonl(tmp_path / "a" / "o.failed.jsonl")
    assert bad["source"].endswith("ragged.csv:3") and "3 fields" in bad["reason"]
    proc = run_winnow(*client_args(fake_server, tmp_path / "b", latin))
    assert proc.returncode == 2 and "not UTF-8" in proc.stderr and "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1
    folder = tmp_path / "folder"
    folder.mkdir()
    for f in (ragged, latin):
        (folder / f.name).write_bytes(f.read_bytes())
    proc = run_winnow(*client_args(fake_server, tmp_path / "c", folder))
    assert proc.returncode == 0, proc.stderr  # one unreadable file fails its rows, not the run
    failed = read_jsonl(tmp_path / "c" / "o.failed.jsonl")
    assert sorted(Path(f["source"]).name for f in failed) == ["latin.json", "ragged.csv:3"]
    proc = run_winnow(*client_args(fake_server, Path("/proc/winnow-cannot-be-here"), ragged))
    assert proc.returncode == 2 and "--output_dir" in proc.stderr and "Traceback" not in proc.stderr
    assert fake_server.chat_requests == 4  # the first and third runs' rows; nothing before a bad output dir


def test_a_full_disk_is_one_line_and_resumes_without_loss(tmp_path, fake_server):
    dataset = sums(tmp_path, 300)
    out = tmp_path / "out"
    args = client_args(fake_server, out, dataset)

    def small_files():  # files may not grow past 16 KB: writes fail as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16000, 16000))

    proc = subprocess.run(
        [sys.executable, "-m", "winnow", *args],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_files,
        env=os.environ,
    )
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "cannot write" in errors[0] and "--resume true" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    manifest = json.loads((out / "o.manifest.json").read_text())
    assert manifest["status"] == "failed" and "cannot write" in manifest["error"]
    again = run_winnow(*args, "--resume", "true")
    assert again.returncode == 0, again.stderr
    records = read_jsonl(out / "o.jsonl")  # no torn line (it would not parse), none twice, none lost
    assert sorted(r["k"] for r in records) == list(range(300))
    assert not list(out.glob("*.tmp"))


# ----------------------------------------------------------------------------- 8. the second Ctrl-C


@pytest.mark.slow
def test_a_second_ctrl_c_stops_a_local_engine_at_once_and_the_output_resumes(tmp_path, tiny_model):
    rows = [{"query": f"Tell me a long story about the number {i}."} for i in range(12)]
    dataset = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    # batches of 4 prompts x 8 samples x 1,500 tokens: each engine call takes many seconds
    args = [
        "sample",
        "--model",
        str(tiny_model),
        "--dataset",
        str(dataset),
        "--num_return_sequences",
        "8",
        "--temperature",
        "1.0",
        "--output_dir",
        str(out),
        "--output_file",
        "o.jsonl",
        "--progress",
        "false",
        "--num_sampling_batch_size",
        "4",
        "--engine_kwargs",
        json.dumps({"max_batch_sequences": 32}),
    ]
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "winnow", *args, "--max_new_tokens", "1500"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_for(lambda: (out / "o.jsonl").exists() and (out / "o.jsonl").stat().st_size > 0, 300, "the first batch")
        first_batch = time.monotonic() - started
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        second = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        stopped_in = time.monotonic() - second
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 130, stderr
    # it did not wait for the batch in flight, which had just started and takes about as long as the
    # first one did (seen: 9.7 s before the fix, 0.13 s after)
    assert stopped_in < min(3.0, first_batch / 4), (stopped_in, first_batch)
    assert json.loads((out / "o.manifest.json").read_text())["status"] == "interrupted"
    done = len(read_jsonl(out / "o.jsonl"))
    again = run_winnow(*args, "--resume", "true", "--max_new_tokens", "8", timeout=600)
    assert again.returncode == 0, again.stderr
    records = read_jsonl(out / "o.jsonl")
    ids = [r["id"] for r in records]
    assert len(set(ids)) == 12 and len(records) == 96 and 0 < done < 96
    assert re.search(r"\d+ rows already done", again.stderr)
