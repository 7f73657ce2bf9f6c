"""The provider Batch API path (``--batch_api true``) against the fake server's faithful batch API.

The real ``winnow`` CLI runs in a subprocess; the fake server counts, per custom_id, how often a
request was put in a batch and how often it was answered (billed), so every test can tell that
nothing was submitted or paid for twice, including after a kill -9 at each stage of the protocol.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.client import SECRET, distill_args
from tests.support.commands import run_winnow, wait_healthy
from tests.support.fakeserver import FakeServer
from tests.support.files import files_text, read_jsonl, write_jsonl


@pytest.fixture
def server():
    fake = FakeServer(batch_step=0.05)
    with fake.running():
        wait_healthy(fake.url)
        yield fake


def math_rows(n: int, marker=lambda i: "") -> list[dict]:
    return [{"problem": f"{marker(i)}What is {i} + {i + 1}?", "solution": str(2 * i + 1)} for i in range(n)]


def batch_distill_args(server, data: Path) -> list[str]:
    """The seed's distill command on the fake server, rows in file order, fast retries."""
    return distill_args(server, data, "--output_file", "o.jsonl", "--dataset_shuffle", "false", retry_base_s=0.01)


BATCH = ("--batch_api", "true", "--batch_poll_s", "0.02")


def by_question(records: list[dict]) -> dict[str, dict]:
    return {r["messages"][0]["content"]: r for r in records}


def assert_each_sent_and_paid_once(server: FakeServer) -> None:
    assert server.batch_submitted and set(server.batch_submitted.values()) == {1}, server.batch_submitted
    assert set(server.batch_answered.values()) == {1}, server.batch_answered


def read_jsonl_from_direct_run(tmp_path: Path, server: FakeServer, data: Path) -> list[dict]:
    folder = tmp_path / "direct"
    folder.mkdir()
    run_winnow(*batch_distill_args(server, data), cwd=folder, timeout=120, check=True)
    return read_jsonl(folder / "sample_output" / "o.jsonl")


def test_seed_distill_command_gives_the_same_records_with_and_without_the_batch_api(tmp_path, server):
    data = write_jsonl(tmp_path / "math.jsonl", math_rows(8))
    direct, batched = tmp_path / "direct", tmp_path / "batched"
    direct.mkdir()
    batched.mkdir()
    prices = ("--price_per_mtok_in", "1", "--price_per_mtok_out", "2")
    run_winnow(
        *batch_distill_args(server, data), *prices, cwd=direct, env={"OPENAI_API_KEY": SECRET}, timeout=120, check=True
    )
    assert server.batches == {}
    proc = run_winnow(
        *batch_distill_args(server, data),
        *prices,
        *BATCH,
        cwd=batched,
        env={"OPENAI_API_KEY": SECRET},
        timeout=120,
        check=True,
    )
    want = read_jsonl(direct / "sample_output" / "o.jsonl")
    got = read_jsonl(batched / "sample_output" / "o.jsonl")
    assert len(got) == 8 and by_question(got) == by_question(want)  # the direct run writes in finishing order
    assert len(server.batches) == 1 and server.chat_requests == 8  # the batch run sent no chat request
    assert_each_sent_and_paid_once(server)
    [batch] = server.batches.values()
    assert batch["status"] == "completed" and batch["metadata"]["winnow_key"]
    manifest = json.loads((batched / "sample_output" / "o.manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["prompt_tokens"] == 8 * 5 and counts["completion_tokens"] == 8 * 16
    assert counts["cost_usd"] == pytest.approx((40 * 1 + 128 * 2) / 1e6 * 0.5) and counts["batch_discount"] == 0.5
    assert manifest["engine"]["name"] == "batch" and manifest["engine"]["batch_api"] is True
    assert manifest["engine_stats"]["batches"] == {"completed": 1}
    assert "at batch prices (50% off)" in proc.stderr and "1 sent/0 running/1 done" in proc.stderr
    assert SECRET not in files_text(tmp_path) + proc.stderr


def test_requests_are_cut_into_provider_sized_batches(tmp_path, server):
    data = write_jsonl(tmp_path / "math.jsonl", math_rows(7))
    run_winnow(
        *batch_distill_args(server, data), *BATCH, "--batch_max_requests", "3", cwd=tmp_path, timeout=120, check=True
    )
    sizes = sorted(b["request_counts"]["total"] for b in server.batches.values())
    assert sizes == [1, 3, 3]
    run_winnow(
        *batch_distill_args(server, data),
        *BATCH,
        "--batch_max_bytes",
        "500",
        "--output_file",
        "b.jsonl",
        cwd=tmp_path,
        timeout=120,
        check=True,
    )
    uploads = [f for f in server.files.values() if f["purpose"] == "batch"][3:]
    assert len(uploads) == 4 and all(len(f["bytes"]) <= 500 for f in uploads)
    assert len(read_jsonl(tmp_path / "sample_output" / "b.jsonl")) == 7


@pytest.mark.parametrize("stage", ["upload", "create", "poll", "done", "download", "download#2"])
def test_kill_9_at_every_stage_then_resume_never_submits_or_pays_twice(tmp_path, server, stage):
    data = write_jsonl(tmp_path / "math.jsonl", math_rows(9))
    args = [*batch_distill_args(server, data), *BATCH, "--batch_max_requests", "3"]
    want = by_question(read_jsonl_from_direct_run(tmp_path, server, data))
    server.reset()
    proc = subprocess.Popen(
        [sys.executable, "-m", "winnow", *args],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OPENAI_API_KEY": SECRET},
    )
    server.kill_at[stage] = proc.pid
    server.hold_batches = stage == "poll"  # in progress until the kill, however slow the machine
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    server.hold_batches = False
    state = tmp_path / "sample_output" / ".o.batches.jsonl"
    assert state.exists()
    again = run_winnow(*args, "--resume", "true", cwd=tmp_path, env={"OPENAI_API_KEY": SECRET}, timeout=120, check=True)
    got = read_jsonl(tmp_path / "sample_output" / "o.jsonl")
    assert by_question(got) == want and len(got) == 9  # each row once
    assert_each_sent_and_paid_once(server)
    if stage == "upload":  # files reached the provider, their batches never did: uploaded again, no extra batch
        assert len([f for f in server.files.values() if f["purpose"] == "batch"]) > len(server.batches) == 3
    if stage == "create":  # created, its id never recorded: found again by its winnow_key, not made twice
        assert len(server.batches) == 3
        assert any(json.loads(line).get("e") == "created" for line in state.read_text().splitlines()[-4:])
    assert SECRET not in files_text(tmp_path) + again.stderr


def test_a_create_whose_answer_is_lost_is_found_again_not_made_twice(tmp_path, server):
    server.lose_creates = 2
    data = write_jsonl(tmp_path / "math.jsonl", math_rows(4))
    run_winnow(*batch_distill_args(server, data), *BATCH, cwd=tmp_path, timeout=120, check=True)
    assert len(read_jsonl(tmp_path / "sample_output" / "o.jsonl")) == 4
    assert len(server.batches) == 1 and server.lose_creates == 1  # the first retry found the batch by its key
    assert_each_sent_and_paid_once(server)


def test_expired_batch_answers_what_it_did_and_resume_resubmits_the_rest(tmp_path, server):
    data = write_jsonl(tmp_path / "math.jsonl", math_rows(6, lambda i: "[[expire-once]] " if i == 3 else ""))
    args = [*batch_distill_args(server, data), *BATCH]
    proc = run_winnow(*args, cwd=tmp_path, timeout=120, check=True)
    [batch] = server.batches.values()
    assert batch["status"] == "expired" and batch["request_counts"] == {"total": 6, "completed": 3, "failed": 3}
    assert len(read_jsonl(tmp_path / "sample_output" / "o.jsonl")) == 3
    failed = read_jsonl(tmp_path / "sample_output" / "o.failed.jsonl")
    assert len(failed) == 3 and all(f["retry"] and "batch_expired" in f["reason"] for f in failed)
    assert "3 rows failed" in proc.stderr
    again = run_winnow(*args, "--resume", "true", cwd=tmp_path, timeout=120, check=True)
    assert "0 rows failed" in again.stderr
    assert len(read_jsonl(tmp_path / "sample_output" / "o.jsonl")) == 6
    assert not (tmp_path / "sample_output" / "o.failed.jsonl").exists()
    assert len(server.batches) == 2 and sorted(server.batch_submitted.values()) == [1, 1, 1, 2, 2, 2]
    assert set(server.batch_answered.values()) == {1}  # nothing answered was asked for again


def test_partial_failures_and_a_failed_batch(tmp_path, server):
    markers = {1: "[[500-always]] ", 2: "[[429-always]] ", 4: "[[empty-always]] "}
    data = write_jsonl(tmp_path / "math.jsonl", math_rows(6, lambda i: markers.get(i, "")))
    args = [*batch_distill_args(server, data), *BATCH]
    run_winnow(*args, cwd=tmp_path, timeout=120, check=True)
    written = read_jsonl(tmp_path / "sample_output" / "o.jsonl")
    assert len(written) == 3
    failed = {
        f["source"].rsplit(":", 1)[1]: f["reason"] for f in read_jsonl(tmp_path / "sample_output" / "o.failed.jsonl")
    }
    assert "HTTP 500: injected 500" in failed["2"] and "HTTP 429" in failed["3"] and "empty content" in failed["5"]
    # a batch the provider fails as a whole: every row logged with its reason, and submitted again on resume
    other = write_jsonl(tmp_path / "other.jsonl", math_rows(3, lambda i: "[[batchfail-once]] " if i == 0 else ""))
    args = [*distill_args(server, other), *BATCH, "--output_file", "f.jsonl"]
    proc = run_winnow(*args, cwd=tmp_path, timeout=120)
    assert "3 rows failed" in proc.stderr
    failed = read_jsonl(tmp_path / "sample_output" / "f.failed.jsonl")
    assert len(failed) == 3 and all("token_limit_exceeded" in f["reason"] and f["retry"] for f in failed)
    run_winnow(*args, "--resume", "true", cwd=tmp_path, timeout=120, check=True)
    assert len(read_jsonl(tmp_path / "sample_output" / "f.jsonl")) == 3


def test_ctrl_c_stops_polling_and_resume_reattaches(tmp_path, server):
    server.hold_batches = True
    data = write_jsonl(tmp_path / "math.jsonl", math_rows(4))
    args = [*batch_distill_args(server, data), *BATCH]
    proc = subprocess.Popen([sys.executable, "-m", "winnow", *args], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(b["status"] == "in_progress" for b in server.batches.values()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err[-2000:]
    assert read_jsonl(tmp_path / "sample_output" / "o.jsonl") == []
    assert not (tmp_path / "sample_output" / "o.failed.jsonl").exists()
    server.hold_batches = False
    run_winnow(*args, "--resume", "true", cwd=tmp_path, timeout=120, check=True)
    assert len(read_jsonl(tmp_path / "sample_output" / "o.jsonl")) == 4
    assert len(server.batches) == 1
    assert_each_sent_and_paid_once(server)


def test_batch_api_needs_the_client_engine(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"query": "hi"}])
    proc = run_winnow(
        "sample",
        "--model",
        "m",
        "--sampler_engine",
        "vllm",
        "--dataset",
        str(data),
        "--batch_api",
        "true",
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 2 and "--batch_api" in proc.stderr and "client" in proc.stderr
