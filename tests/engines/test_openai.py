"""The client engine (engines/openai.py) over real HTTP on loopback: the official openai SDK against
tests/support/fakeserver.py, and against a real ``winnow serve``.

Engine-level tests drive ``OpenAIEngine`` directly; end-to-end tests run the real ``winnow`` CLI in a
subprocess: retries, cut-off streams, reasoning fields, credentials, Ctrl-C, and ``--response_format``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support.client import SECRET, client_args, distill_args, sums
from tests.support.commands import Server, run_winnow
from tests.support.files import files_text, read_jsonl, write_jsonl
from winnow.errors import ConfigError, EngineError
from winnow.schema import Prompt, SamplingParams


def engine(fake_server, **kw):
    from winnow.engines.openai import OpenAIEngine

    kw.setdefault("retry_base_s", 0.01)
    return OpenAIEngine(kw.pop("model", "fake"), base_url=fake_server.url, api_key=kw.pop("api_key", SECRET), **kw)


def prompt(text: str, i: int = 0) -> Prompt:
    return Prompt(id=f"p{i}", messages=[{"role": "user", "content": text}], position=i)


def generate(eng, prompts, **params):
    async def go():
        try:
            return await eng.generate(prompts, SamplingParams(**{"max_new_tokens": 64, **params}))
        finally:
            await eng.aclose()

    return asyncio.run(go())


FAULTS = {  # marker -> what the row must end as: None = written, else a fragment of its failed reason
    "": None,
    "[[429-once]]": None,
    "[[malformed-once]]": None,
    "[[timeout-once]]": None,
    "[[drop-once]]": None,
    "[[empty-once]]": None,
    "[[500-always]]": "HTTP 500",
    "[[empty-always]]": "empty content",
    "[[length-always]]": "truncated",
    "[[filter-always]]": "content filter",
}

KEY = "sk-client-serve-test"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_read_from_either_field_streaming_or_not(fake_server, stream, field):
    eng = engine(fake_server, model=f"deepseek-r1?reasoning={field}", stream=stream)
    [[c]] = generate(eng, [prompt("What is 2 + 3?")])
    assert c.text == "The answer is \\boxed{5}." and c.finish_reason == "stop" and c.error is None
    assert c.reasoning == "Let me think step by step about: What is 2 + 3?"
    assert c.prompt_tokens == 5 and c.completion_tokens == 4 + 12


@pytest.mark.parametrize("stream", [False, True])
def test_native_n_is_one_request_and_usage_is_split_without_loss(fake_server, stream):
    eng = engine(fake_server, stream=stream)
    [cs] = generate(eng, [prompt("What is 1 + 1?")], n=3)
    assert len(cs) == 3 and all(c.text == "The answer is \\boxed{2}." for c in cs)
    assert fake_server.chat_requests == 1 and eng.native_n is True
    assert [c.prompt_tokens for c in cs] == [5, 0, 0]  # the prompt is billed once
    assert sum(c.completion_tokens for c in cs) == 3 * 4


def test_server_that_ignores_n_gets_parallel_requests_and_is_remembered(fake_server):
    eng = engine(fake_server, model="fake?n=ignore")
    out = generate(eng, [prompt("What is 1 + 1?", 0), prompt("What is 2 + 2?", 1)], n=4)
    assert [len(cs) for cs in out] == [4, 4]
    assert all(c.error is None for cs in out for c in cs)
    assert eng.native_n is False
    # one n=4 request answered with 1 choice, 3 more for the first prompt; the second prompt goes
    # straight to 4 single requests (4 + 4), or also tried n if it started first (at most 4 + 4)
    assert 8 <= fake_server.chat_requests <= 8 + 1


def test_429_with_retry_after_is_honoured(fake_server):
    eng = engine(fake_server, model="fake?retry_after=0.4")
    start = time.monotonic()
    [[c]] = generate(eng, [prompt("[[429-once]] What is 1 + 2?")])
    assert c.text == "The answer is \\boxed{3}." and c.error is None
    assert time.monotonic() - start >= 0.4
    assert eng.counts["retries"] == 1 and eng.counts["failed:HTTP 429"] == 1


@pytest.mark.parametrize(
    "fault", ["500-twice", "503-once", "malformed-once", "drop-once", "empty-twice", "null-once", "timeout-once"]
)
def test_transient_faults_are_retried_until_an_answer(fake_server, fault):
    eng = engine(fake_server, request_timeout=0.5, stream=fault.startswith("malformed"))
    [[c]] = generate(eng, [prompt(f"[[{fault}]] What is 3 + 4?")])
    assert c.text == "The answer is \\boxed{7}." and c.error is None
    assert eng.counts["retries"] == (2 if fault.endswith("twice") else 1)


@pytest.mark.parametrize("stream", [False, True])
def test_persistent_failure_is_a_value_after_max_retries(fake_server, stream):
    eng = engine(fake_server, max_retries=2, stream=stream)
    [[c], [ok]] = generate(eng, [prompt("[[500-always]] a", 0), prompt("What is 1 + 1?", 1)])
    assert c.finish_reason == "error" and c.failed
    assert "HTTP 500" in c.error and "gave up after 3 attempts" in c.error
    assert ok.error is None  # the other prompt is not affected
    assert fake_server.chat_requests == 3 + 1


def test_empty_answers_every_time_become_an_error_with_their_tokens(fake_server):
    eng = engine(fake_server, max_retries=1)
    [[c]] = generate(eng, [prompt("[[empty-always]] hi")])
    assert c.failed and c.error.startswith("empty content")
    assert c.prompt_tokens == 2 * 2  # both attempts were billed


@pytest.mark.parametrize("keep", [False, True])
def test_length_is_kept_with_its_reason_and_not_retried(fake_server, keep):
    eng = engine(fake_server, keep_truncated=keep)
    [[c]] = generate(eng, [prompt("What is 10 + 20?")], max_new_tokens=2)
    assert c.finish_reason == "length" and c.text == "The answer"
    assert c.failed is (not keep)
    if not keep:
        assert "max_new_tokens 2" in c.error
    assert fake_server.chat_requests == 1


def test_content_filter_is_recorded_not_retried(fake_server):
    eng = engine(fake_server)
    [[c]] = generate(eng, [prompt("[[filter-always]] bad")])
    assert c.finish_reason == "content_filter" and c.failed and "content filter" in c.error
    assert fake_server.chat_requests == 1


def test_bad_key_stops_the_run_without_showing_the_key(fake_server):
    eng = engine(fake_server)
    with pytest.raises(EngineError) as info:
        generate(eng, [prompt("[[401-always]] hi")])
    assert "rejected the API key" in str(info.value) and SECRET not in str(info.value)


def test_concurrency_is_bounded_and_used(fake_server):
    eng = engine(fake_server, model="fake?latency=0.05", max_concurrency=8)
    prompts = [prompt(f"What is {i} + 1?", i) for i in range(48)]
    start = time.monotonic()
    out = generate(eng, prompts)
    wall = time.monotonic() - start
    assert [cs[0].text for cs in out] == [f"The answer is \\boxed{{{i + 1}}}." for i in range(48)]
    assert fake_server.max_in_flight == 8
    assert wall < 48 / 8 * 0.05 * 3  # ideal 0.3 s; serial would be 2.4 s


def test_rpm_spaces_requests(fake_server):
    eng = engine(fake_server, rpm=600)  # one request per 0.1 s
    start = time.monotonic()
    generate(eng, [prompt(f"q{i}", i) for i in range(5)])
    assert time.monotonic() - start >= 0.39


def test_interrupt_cancels_requests_in_flight_after_the_grace_period(fake_server):
    eng = engine(fake_server, shutdown_grace_s=0.3)

    async def go():
        params = SamplingParams(max_new_tokens=8)
        hanging = [prompt("[[timeout-always]] a", 0), prompt("[[timeout-always]] b", 1)]
        task = asyncio.ensure_future(eng.generate(hanging, params))
        while fake_server.in_flight < 2:
            await asyncio.sleep(0.01)
        start = time.monotonic()
        eng.interrupt()
        out = await task
        late = await eng.generate([prompt("c", 2)], params)  # after the stop: not sent
        await eng.aclose()
        return out, late, time.monotonic() - start

    out, late, waited = asyncio.run(go())
    assert all(cs[0].error.startswith("interrupted") for cs in out + late)
    assert 0.3 <= waited < 2.0
    assert fake_server.chat_requests == 2


def test_describe_has_no_secret(fake_server):
    from winnow.engines.openai import OpenAIEngine

    eng = OpenAIEngine("m", base_url="http://127.0.0.1:9/v1", api_key=SECRET)
    text = json.dumps(eng.describe())
    assert SECRET not in text and eng.describe()["api_key"] == "engine_kwargs"
    asyncio.run(eng.aclose())


def test_credentials_in_the_base_url_are_refused_without_echoing_them():
    from winnow.engines.openai import OpenAIEngine

    with pytest.raises(ConfigError, match="holds credentials") as info:
        OpenAIEngine("m", base_url="http://user:pw-secret@127.0.0.1:9/v1", api_key=SECRET)
    assert "pw-secret" not in str(info.value)


def test_no_key_and_no_base_url_is_a_clear_error(monkeypatch):
    from winnow.engines.openai import OpenAIEngine

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        OpenAIEngine("m")


def test_seed_distill_command(tmp_path, fake_server):
    data = write_jsonl(
        tmp_path / "math.jsonl", [{"problem": f"What is {i} + {i + 1}?", "solution": str(2 * i + 1)} for i in range(8)]
    )
    proc = run_winnow(
        *distill_args(fake_server, f"{data}#5"),
        "--price_per_mtok_in",
        "1",
        "--price_per_mtok_out",
        "2",
        "--output_file",
        "o.jsonl",
        cwd=tmp_path,
        env={"OPENAI_API_KEY": SECRET},
        timeout=120,
        check=True,
    )
    out = read_jsonl(tmp_path / "sample_output" / "o.jsonl")
    assert len(out) == 5
    for rec in out:
        q = rec["messages"][0]["content"]
        a, b = (int(x) for x in q.removeprefix("What is ").removesuffix("?").split(" + "))
        assert rec["messages"][-1] == {
            "role": "assistant",
            "content": f"<think>Let me think step by step about: {q}</think>\n\n"
            f"<answer>The answer is \\boxed{{{a + b}}}.</answer>",
        }
    manifest = json.loads((tmp_path / "sample_output" / "o.manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["prompt_tokens"] == 5 * 5 and counts["completion_tokens"] == 5 * 16
    assert counts["cost_usd"] == pytest.approx((25 * 1 + 80 * 2) / 1e6)
    assert manifest["engine"]["name"] == "client" and manifest["engine_stats"]["requests"] == 5
    assert "cost $0.0002" in proc.stderr and "req/s" in proc.stderr
    assert SECRET not in files_text(tmp_path) + proc.stderr + proc.stdout


@pytest.mark.parametrize("fmt", ["separate", "none"])
def test_reasoning_formats(tmp_path, fake_server, fmt):
    data = write_jsonl(tmp_path / "d.jsonl", [{"query": "What is 1 + 1?"}])
    run_winnow(
        "sample",
        "--sampler_type",
        "distill",
        "--sampler_engine",
        "client",
        "--model",
        "r1",
        "--dataset",
        str(data),
        "--num_return_sequences",
        "1",
        "--reasoning_format",
        fmt,
        "--engine_kwargs",
        json.dumps({"base_url": fake_server.url}),
        "--output_file",
        "o.jsonl",
        cwd=tmp_path,
        timeout=120,
        check=True,
    )
    [rec] = read_jsonl(tmp_path / "sample_output" / "o.jsonl")
    assert rec["messages"][-1]["content"] == "The answer is \\boxed{2}."
    assert ("reasoning" in rec) is (fmt == "separate")


def test_every_row_is_written_or_failed_with_its_reason_once_and_resume_adds_nothing(tmp_path, fake_server):
    rows = [{"query": f"{marker} What is {i} + {j}?"} for i, marker in enumerate(FAULTS) for j in range(3)]
    data = write_jsonl(tmp_path / "faults.jsonl", rows)
    common = [
        "sample",
        "--sampler_type",
        "sample",
        "--sampler_engine",
        "client",
        "--model",
        "fake",
        "--dataset",
        str(data),
        "--num_return_sequences",
        "2",
        "--max_retries",
        "2",
        "--request_timeout",
        "0.5",
        "--max_concurrency",
        "8",
        "--output_file",
        "o.jsonl",
        "--keep_truncated",
        "false",
        "--engine_kwargs",
        json.dumps({"base_url": fake_server.url, "retry_base_s": 0.01, "api_key": SECRET}),
    ]
    proc = run_winnow(*common, cwd=tmp_path, timeout=120, check=True)
    out = read_jsonl(tmp_path / "sample_output" / "o.jsonl")
    failed = read_jsonl(tmp_path / "sample_output" / "o.failed.jsonl")
    written = [r["messages"][0]["content"] for r in out]
    failed_lines = [int(f["source"].rsplit(":", 1)[1]) for f in failed]
    for line, row in enumerate(rows, start=1):
        marker = row["query"].split(" What")[0]
        reason = FAULTS[marker]
        if reason is None:
            assert written.count(row["query"]) == 2, marker  # two samples, one line each
            assert line not in failed_lines
        else:
            assert failed_lines.count(line) == 1 and row["query"] not in written, marker
            [entry] = [f for f in failed if f["source"].endswith(f":{line}")]
            assert reason in entry["reason"] and entry["stage"] == "generate"
    assert f"{4 * 3} rows failed" in proc.stderr
    requests = fake_server.chat_requests
    again = run_winnow(*common, "--resume", "true", cwd=tmp_path, timeout=120, check=True)
    # resuming asks again only for the rows that failed with errors (they may be transient), not for
    # answers cut for length or filtered; they fail again and are logged once each, as before
    assert fake_server.chat_requests > requests
    assert f"{2 * 3} rows failed" in again.stderr
    assert read_jsonl(tmp_path / "sample_output" / "o.jsonl") == out
    refailed = read_jsonl(tmp_path / "sample_output" / "o.failed.jsonl")
    assert sorted(f["source"] for f in refailed) == sorted(f["source"] for f in failed)
    assert "rows already done" in again.stderr
    third = run_winnow(*common, "--resume", "true", "--max_retries", "0", cwd=tmp_path, timeout=120, check=True)
    assert read_jsonl(tmp_path / "sample_output" / "o.jsonl") == out and "6 rows failed" in third.stderr
    assert SECRET not in files_text(tmp_path) + proc.stderr + again.stderr


def test_answers_cut_at_the_token_limit_are_kept_and_counted_by_default(tmp_path, fake_server):
    data = write_jsonl(tmp_path / "d.jsonl", [{"query": f"[[length-always]] What is {i} + 1?"} for i in range(3)])
    proc = run_winnow(
        "sample",
        "--sampler_engine",
        "client",
        "--model",
        "fake",
        "--dataset",
        str(data),
        "--num_return_sequences",
        "2",
        "--output_file",
        "o.jsonl",
        "--output_format",
        "raw",
        "--engine_kwargs",
        json.dumps({"base_url": fake_server.url}),
        cwd=tmp_path,
        timeout=120,
        check=True,
    )
    records = read_jsonl(tmp_path / "sample_output" / "o.jsonl")
    assert len(records) == 3 and all(c["finish_reason"] == "length" for r in records for c in r["completions"])
    assert "6 samples cut at the token limit" in proc.stderr


def test_unset_sampling_options_are_not_sent(tmp_path, fake_server):
    """No --temperature/--top_p/--max_new_tokens: the server's (the model's) defaults apply, as in swift."""
    from winnow.config import SampleConfig
    from winnow.engines.openai import OpenAIEngine
    from winnow.pipeline import sampling_params

    params = sampling_params(SampleConfig(model="m", dataset=["d"], sampler_engine="client", num_return_sequences=1))
    body = OpenAIEngine("m", base_url=fake_server.url)._body(
        Prompt(id="x", messages=[{"role": "user", "content": "q"}]), params, 1
    )
    assert body == {"model": "m", "messages": [{"role": "user", "content": "q"}]}


def test_sample_with_n_against_a_server_that_ignores_n(tmp_path, fake_server):
    data = write_jsonl(tmp_path / "d.jsonl", [{"query": f"What is {i} + 2?"} for i in range(4)])
    run_winnow(
        "sample",
        "--sampler_engine",
        "client",
        "--model",
        "fake?n=ignore",
        "--dataset",
        str(data),
        "--num_return_sequences",
        "3",
        "--engine_kwargs",
        json.dumps({"base_url": fake_server.url}),
        "--output_file",
        "o.jsonl",
        cwd=tmp_path,
        timeout=120,
        check=True,
    )
    out = read_jsonl(tmp_path / "sample_output" / "o.jsonl")
    assert len(out) == 4 * 3
    manifest = json.loads((tmp_path / "sample_output" / "o.manifest.json").read_text())
    assert manifest["engine"]["native_n"] is False


def test_bad_key_is_one_line_error_without_the_key(tmp_path, fake_server):
    data = write_jsonl(tmp_path / "d.jsonl", [{"query": "[[401-always]] hi"}])
    proc = run_winnow(
        "sample",
        "--sampler_engine",
        "client",
        "--model",
        "fake",
        "--dataset",
        str(data),
        "--engine_kwargs",
        json.dumps({"base_url": fake_server.url}),
        "--num_return_sequences",
        "1",
        cwd=tmp_path,
        env={"OPENAI_API_KEY": SECRET},
        timeout=120,
    )
    assert proc.returncode == 1
    assert "rejected the API key" in proc.stderr and "Traceback" not in proc.stderr
    assert SECRET not in files_text(tmp_path) + proc.stderr + proc.stdout


def test_sigint_stops_within_seconds_and_resume_completes(tmp_path, fake_server):
    # row 2 hangs (a request the grace deadline must cancel); the others take 0.2 s each, 2 at a time
    rows = [{"id": f"r{i}", "query": ("[[timeout-once]] " if i == 2 else "") + f"What is {i} + 0?"} for i in range(40)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    common = [
        "sample",
        "--sampler_engine",
        "client",
        "--model",
        "fake?latency=0.2",
        "--dataset",
        str(data),
        "--dataset_shuffle",
        "false",
        "--num_return_sequences",
        "1",
        "--max_concurrency",
        "2",
        "--output_file",
        "o.jsonl",
        "--engine_kwargs",
        json.dumps({"base_url": fake_server.url, "shutdown_grace_s": 1.0}),
    ]
    out_path = tmp_path / "sample_output" / "o.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "winnow", *common], cwd=tmp_path, stderr=subprocess.PIPE, text=True, env={**os.environ}
    )
    deadline = time.monotonic() + 60
    while not (out_path.exists() and len(out_path.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert time.monotonic() - sent < 1.0 + 3.0  # the grace period plus writing up
    assert "interrupted" in err
    first = read_jsonl(out_path)
    assert 3 <= len(first) < 40
    assert not (tmp_path / "sample_output" / "o.failed.jsonl").exists()  # the cancelled row is not "failed"
    run_winnow(*common, "--resume", "true", cwd=tmp_path, timeout=120, check=True)
    final = read_jsonl(out_path)
    assert final[: len(first)] == first
    answers = sorted(r["messages"][-1]["content"] for r in final)
    assert answers == sorted(f"The answer is \\boxed{{{i}}}." for i in range(40))  # each row once


def test_client_path_does_not_import_torch(tmp_path, fake_server):
    data = write_jsonl(tmp_path / "d.jsonl", [{"query": "What is 1 + 1?"}])
    code = (
        "import sys\n"
        "from winnow.cli import main\n"
        f"rc = main(['sample', '--sampler_engine', 'client', '--model', 'fake', '--dataset', {str(data)!r},"
        f" '--num_return_sequences', '1', '--engine_kwargs', {json.dumps(json.dumps({'base_url': fake_server.url}))},"
        " '--progress', 'false'])\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print('RC', rc, 'HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "RC 0 HEAVY []" in proc.stdout, proc.stderr[-2000:]


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


def test_credentials_in_the_base_url_are_refused_in_one_line(tmp_path, fake_server):
    dataset = sums(tmp_path, 2)
    url = fake_server.url.replace("http://", "http://user:pw-SECRET-5555@")
    proc = run_winnow(*client_args(fake_server, tmp_path / "out", dataset, base_url=url))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "holds credentials" in lines[0] and "pw-SECRET-5555" not in proc.stderr
    assert fake_server.chat_requests == 0


def test_client_engine_sends_response_format_and_fails_answers_off_the_schema(tmp_path, fake_server):
    schema_file = tmp_path / "answer.json"
    schema_file.write_text(
        json.dumps({"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]})
    )
    rows = [{"query": f"What is {i} + 1?"} for i in range(3)] + [{"query": "[[badjson-always]] What is 9 + 1?"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    proc = run_winnow(
        "sample",
        "--sampler_engine",
        "client",
        "--model",
        "fake",
        "--dataset",
        str(data),
        "--num_return_sequences",
        "2",
        "--response_format",
        str(schema_file),
        "--output_format",
        "raw",
        "--reward_funcs",
        "json_schema",
        "--engine_kwargs",
        json.dumps({"base_url": fake_server.url}),
        "--output_file",
        "o.jsonl",
        cwd=tmp_path,
        timeout=120,
        check=True,
    )
    assert fake_server.last_body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "strict": True, "schema": json.loads(schema_file.read_text())},
    }
    records = read_jsonl(tmp_path / "sample_output" / "o.jsonl")
    assert len(records) == 3
    for rec in records:
        for c in rec["completions"]:
            assert json.loads(c["text"])["answer"] == int(rec["messages"][0]["content"].split()[2]) + 1
            assert c["scores"]["json_schema"]["value"] == 1.0
    [failed] = read_jsonl(tmp_path / "sample_output" / "o.failed.jsonl")
    assert "response_format: invalid JSON" in failed["reason"] and not failed.get("retry")
    assert "1 rows failed" in proc.stderr
