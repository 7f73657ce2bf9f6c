"""The shipped demo world by name (demo/__init__.py): the names resolve to shipped files, and through the real
command line ``winnow sample`` with the demo policy, PRM and RM, and ``winnow serve`` of the demo models.
"""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager

import httpx
import pytest

from demo_world import report
from tests.support.commands import Server, run_winnow
from tests.support.files import read_jsonl
from winnow import demo

QUESTION = {"role": "user", "content": "Compute 12 + 30 - 5."}

GOOD = [QUESTION, {"role": "assistant", "content": "12 + 30 = 42\n42 - 5 = 37\nThe answer is \\boxed{37}."}]

BAD = [QUESTION, {"role": "assistant", "content": "12 + 30 = 52\n52 - 5 = 47\nThe answer is \\boxed{47}."}]


@contextmanager
def served(tmp_path, name: str):
    """``winnow serve --model name`` for the duration; it must exit cleanly on SIGTERM."""
    server = Server(tmp_path / f"{name}.log", "--model", name, "--max_wait_ms", "20")
    try:
        yield server
    finally:
        assert server.stop(signal.SIGTERM) == 0


def rewards_of_good_and_bad(server, kind: str) -> list[dict]:
    """``/v1/rewards`` for the right and the wrong solution of the same problem."""
    assert server.health()["kind"] == kind
    resp = httpx.post(f"{server.url}/v1/rewards", json={"messages": [GOOD, BAD]}, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["data"]


@pytest.mark.slow
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


@pytest.mark.slow
def test_serve_demo_policy_and_prm(tmp_path):
    with served(tmp_path, "demo-policy") as policy:
        resp = httpx.post(
            f"{policy.url}/v1/chat/completions",
            timeout=60,
            json={"model": policy.health()["model"], "messages": [QUESTION], "max_tokens": 48, "temperature": 0},
        )
        assert resp.status_code == 200, resp.text
        assert "\\boxed{" in resp.json()["choices"][0]["message"]["content"]
    with served(tmp_path, "demo-prm") as prm:
        data = rewards_of_good_and_bad(prm, "prm")
        assert [len(d["step_scores"]) for d in data] == [3, 3]
        assert all(0 <= v <= 1 for d in data for v in [d["score"], *d["step_scores"]])
        # the trained PRM reads the arithmetic: 12 + 30 = 52 is the wrong step
        assert data[1]["step_scores"][0] < 0.5 < data[0]["step_scores"][0]
        assert data[0]["score"] > data[1]["score"]


@pytest.mark.slow
def test_serve_demo_rm(tmp_path):
    with served(tmp_path, "demo-rm") as rm:
        good, bad = (d["score"] for d in rewards_of_good_and_bad(rm, "classifier"))
        assert good > bad
        chat = httpx.post(
            f"{rm.url}/v1/chat/completions", json={"model": rm.health()["model"], "messages": GOOD}, timeout=60
        )
        assert chat.status_code == 200, chat.text
        assert float(chat.json()["choices"][0]["message"]["content"]) == pytest.approx(good, abs=1e-4)


def test_demo_names_resolve_to_shipped_files():
    for name in ("demo-policy", "demo-prm", "demo-rm"):
        path = demo.resolve_model(name)
        assert path and (demo.ASSETS / name / "config.json").is_file()
    cfg = json.loads((demo.ASSETS / "demo-prm" / "config.json").read_text())
    assert cfg["winnow_prm"]["style"] == "math_shepherd"
    assert json.loads((demo.ASSETS / "demo-rm" / "config.json").read_text())["pad_token_id"] is not None
    with open(demo.resolve_dataset("demo-arith"), encoding="utf-8") as f:
        row = json.loads(f.readline())
    assert set(row) >= {"problem", "solution", "answer"}
    assert demo.resolve_dataset("demo-arith-train")
    assert demo.resolve_model("not-a-demo") is None and demo.resolve_dataset("not-a-demo") is None
