"""Environments (multiturn/env.py): the gym scheduler retries with the environment's feedback."""

from __future__ import annotations

from tests.support.commands import raw_output, run_winnow
from tests.support.files import read_jsonl
from tests.support.multiturn import RETRY_ENV, client_run, roles, row, sums


def test_the_gym_scheduler_retries_with_the_environments_feedback(fake_server, tmp_path):
    fake_server.defaults.update(wrong_turns=1)
    records, manifest, _ = client_run(
        fake_server,
        tmp_path,
        sums(tmp_path / "d.jsonl", 2),
        num_return_sequences=2,
        multi_turn_scheduler="gym",
        gym_env="math_retry",
        max_turns=3,
        orm_model="math",
        reward_funcs=["env_reward"],
        output_format="raw",
    )
    c = row(records, 0)["completions"][0]
    assert roles(c["turns"]) == ["assistant", "user", "assistant"]
    assert c["turns"][1]["content"] == "That is not right. Try again: What is 0 + 1?"
    assert c["text"] == "The answer is \\boxed{1}." and c["scores"]["math"]["value"] == 1.0
    assert c["scores"]["env_reward"]["value"] == 1.0
    assert [i["reward"] for i in c["trace"]["turn_infos"]] == [0.0, 1.0]
    assert c["trace"]["rollout_infos"] == {"total_reward": 1.0, "step_rewards": [0.0, 1.0], "gym_done": True}


def test_the_demo_policy_plays_the_retry_environment(tmp_path):
    out = tmp_path / "out"
    proc = run_winnow(
        "sample",
        "--model",
        "demo-policy",
        "--dataset",
        "demo-arith#6",
        "--num_return_sequences",
        "4",
        *RETRY_ENV,
        *raw_output(out),
    )
    assert proc.returncode == 0, proc.stderr
    completions = [c for r in read_jsonl(out / "o.jsonl") for c in r["completions"]]
    for c in completions:
        infos = c["trace"]["turn_infos"]
        assert infos[0]["reward"] == (1.0 if infos[0]["info"].get("correct") else 0.0)
        if infos[0]["info"].get("correct"):
            assert roles(c["turns"]) == ["assistant"] and c["scores"]["math"]["value"] == 1.0
        else:
            assert roles(c["turns"]) == ["assistant", "user", "assistant"]
            assert c["turns"][1]["content"].startswith("That is not right. Try again: Compute ")
