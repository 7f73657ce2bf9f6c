"""The shipped demo world through the real command line: ``winnow sample`` with the demo policy, PRM
and RM by name, the report computed from its raw output, and ``winnow serve`` of the demo models."""

from __future__ import annotations

import signal

import httpx
import pytest

from conftest import read_jsonl, run_winnow
from test_serve import Server
from winnow.demo import report

pytestmark = pytest.mark.slow


def test_sample_with_demo_names_and_report(tmp_path):
    cmd = report.sample_command(4, 4, str(tmp_path), seed=1)
    proc = run_winnow(*cmd, "--progress", "false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_jsonl(tmp_path / "raw.jsonl")
    assert len(records) == 4
    for r in records:
        assert r["reference"] == r["answer"] and len(r["completions"]) == 4
        for c in r["completions"]:
            assert set(c["scores"]) == {"math", "demo-prm", "demo-rm"}
            steps = c["scores"]["demo-prm"].get("steps") or []
            assert len(steps) == len([s for s in c["text"].split("\n") if s.strip()])
    m = report.metrics(records)
    assert m["problems"] == 4 and 0 <= m["pass@1"] <= m["pass@n"] <= 1
    assert "pass@4 (oracle)" in report.table(m, 4)


def test_serve_demo_policy_and_prm(tmp_path):
    policy = Server(tmp_path / "policy.log", "--model", "demo-policy", "--max_wait_ms", "20")
    try:
        resp = httpx.post(f"{policy.url}/v1/chat/completions", timeout=60, json={
            "model": policy.health()["model"], "messages": [{"role": "user", "content": "Compute 12 + 30 - 5."}],
            "max_tokens": 48, "temperature": 0})
        assert resp.status_code == 200, resp.text
        assert "\\boxed{" in resp.json()["choices"][0]["message"]["content"]
    finally:
        assert policy.stop(signal.SIGTERM) == 0
    prm = Server(tmp_path / "prm.log", "--model", "demo-prm", "--max_wait_ms", "20")
    try:
        health = prm.health()
        assert health["kind"] == "prm"
        question = {"role": "user", "content": "Compute 12 + 30 - 5."}
        good = [question, {"role": "assistant", "content": "12 + 30 = 42\n42 - 5 = 37\nThe answer is \\boxed{37}."}]
        bad = [question, {"role": "assistant", "content": "12 + 30 = 52\n52 - 5 = 47\nThe answer is \\boxed{47}."}]
        resp = httpx.post(f"{prm.url}/v1/rewards", json={"messages": [good, bad]}, timeout=60)
        assert resp.status_code == 200, resp.text
        data = resp.json()["data"]
        assert [len(d["step_scores"]) for d in data] == [3, 3]
        assert all(0 <= v <= 1 for d in data for v in [d["score"], *d["step_scores"]])
    finally:
        assert prm.stop(signal.SIGTERM) == 0
