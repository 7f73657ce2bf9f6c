"""Remote reward models (rewards/remote.py): a run scored through a real ``winnow serve``'s /v1/rewards."""

from __future__ import annotations

import pytest

from tests.support.commands import run_winnow
from tests.support.files import read_jsonl, write_jsonl
from tests.support.serve import (
    QUESTION,
)


def test_remote_reward_model_in_a_sampling_run(classifier_server, tiny_classifier_rm, tiny_model, tmp_path):
    """``--reward_model http://.../v1`` scores a run's samples through the server's /v1/rewards route."""

    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [QUESTION]}, {"query": "What is 4 + 4?"}])
    proc = run_winnow(
        "sample",
        "--model",
        str(tiny_model),
        "--dataset",
        str(data),
        "--num_return_sequences",
        "3",
        "--max_new_tokens",
        "8",
        "--reward_model",
        f"{classifier_server.url}/v1",
        "--output_format",
        "raw",
        "--output_dir",
        str(tmp_path),
        "--output_file",
        "r.jsonl",
        "--progress",
        "false",
    )
    assert proc.returncode == 0, proc.stderr
    from winnow.rewards.models import load_reward_model

    local = load_reward_model(str(tiny_classifier_rm), device="cpu")
    for rec in read_jsonl(tmp_path / "r.jsonl"):
        convs = [[*rec["messages"], {"role": "assistant", "content": c["text"]}] for c in rec["completions"]]
        expected = [s.value for s in local.score_conversations(convs)]
        served = [c["scores"]["remote-rm"]["value"] for c in rec["completions"]]
        assert served == pytest.approx(expected, abs=1e-4)
