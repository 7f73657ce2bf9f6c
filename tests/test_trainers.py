"""winnow's outputs in the trainers that consume them: TRL's SFT, DPO and GRPO trainers train a step on them
unchanged (tiny model, CPU), one reward file serves TRL and winnow, ms-swift's loader reads the GRPO file, and
tool-calling conversations survive a round trip."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.commands import run_winnow
from tests.support.fakeserver import FakeServer
from tests.support.files import read_jsonl, write_jsonl

trl = pytest.importorskip("trl", reason="TRL is a test dependency (pip install 'winnow[dev]')")

SWIFT_PYTHON = Path.home() / ".cache/winnow-peers/ms-swift/venv/bin/python"
REWARDS = '''
"""One reward file for TRL's GRPOTrainer and winnow sample: TRL's calling convention."""
from trl.rewards import accuracy_reward, think_format_reward  # TRL's own, found by name


def ends_with_digit(prompts, completions, completion_ids, answer, **kwargs):
    """1.0 when the answer's last character is a digit; prompts and completions are message lists."""
    assert isinstance(prompts[0], list) and completions[0][0]["role"] == "assistant"
    assert len(completion_ids) == len(completions) and len(answer) == len(completions)
    return [1.0 if c[0]["content"].strip()[-1:].isdigit() else 0.0 for c in completions]
'''


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_model):
    """Sampled and scored once: sft, prompt_completion, dpo and grpo files from the tiny model."""
    work = tmp_path_factory.mktemp("trainers")
    (work / "rewards.py").write_text(REWARDS)
    data = write_jsonl(
        work / "d.jsonl",
        [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"}], "answer": str(2 * i)} for i in range(6)],
    )
    out = {}
    for fmt in ("sft", "prompt_completion", "dpo", "grpo"):
        run_winnow(
            "sample",
            "--model",
            str(tiny_model),
            "--dataset",
            str(data),
            "--num_return_sequences",
            "4",
            "--max_new_tokens",
            "8",
            "--external_plugins",
            str(work / "rewards.py"),
            "--reward_funcs",
            "ends_with_digit",
            "repetition",
            "--output_format",
            fmt,
            "--output_dir",
            str(work),
            "--output_file",
            f"{fmt}.jsonl",
            "--progress",
            "false",
            "--keep_unpaired",
            "false",
            check=True,
        )
        out[fmt] = work / f"{fmt}.jsonl"
    return work, out


def _args(cls, tmp_path, **kw):
    return cls(
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        per_device_train_batch_size=2,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        **kw,
    )


def test_trl_trains_sft_on_messages_and_prompt_completion_without_the_prompt_in_the_loss(tmp_path, tiny_model, outputs):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, files = outputs
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    for fmt in ("sft", "prompt_completion"):
        ds = load_dataset("json", data_files=str(files[fmt]), split="train")
        trainer = trl.SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(str(tiny_model)),
            processing_class=tok,
            train_dataset=ds,
            args=_args(trl.SFTConfig, tmp_path, max_length=128),
        )
        assert trainer.train().training_loss > 0, fmt
    # prompt/completion: TRL's collator keeps only the completion's tokens in the loss
    example = trainer.train_dataset[0]
    batch = trainer.data_collator([example])
    learned = int((batch["labels"] != -100).sum())
    assert 0 < learned < len(example["input_ids"])


def test_trl_trains_dpo_on_the_dpo_file(tmp_path, tiny_model, outputs):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, files = outputs
    ds = load_dataset("json", data_files=str(files["dpo"]), split="train")
    assert len(ds) > 0
    trainer = trl.DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(str(tiny_model)),
        processing_class=AutoTokenizer.from_pretrained(str(tiny_model)),
        train_dataset=ds,
        args=_args(trl.DPOConfig, tmp_path, max_length=128),
    )
    assert trainer.train().training_loss > 0


def test_trl_grpo_trains_on_the_grpo_file_with_the_reward_file_winnow_used(tmp_path, tiny_model, outputs):
    import importlib.util

    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work, files = outputs
    records = read_jsonl(files["grpo"])
    assert all("prompt" in r and "completions" not in r and "winnow_reward_mean" in r for r in records)
    spec = importlib.util.spec_from_file_location("shared_rewards", work / "rewards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ds = load_dataset("json", data_files=str(files["grpo"]), split="train")
    trainer = trl.GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(str(tiny_model)),
        processing_class=AutoTokenizer.from_pretrained(str(tiny_model)),
        reward_funcs=[module.ends_with_digit],
        train_dataset=ds,
        args=_args(trl.GRPOConfig, tmp_path, num_generations=2, max_completion_length=8),
    )
    trainer.train()


def test_trls_own_reward_functions_score_in_winnow(tmp_path, outputs):
    work, _ = outputs
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": [{"role": "user", "content": "What is 1/3 + 0?"}], "solution": "\\frac{1}{3}"}],
    )
    cache = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": "What is 1/3 + 0?"}],
                "messages": [{"role": "user", "content": "What is 1/3 + 0?"}, {"role": "assistant", "content": c}],
            }
            for c in ("<think>\nhm\n</think>\nMy answer is \\boxed{\\frac{1}{3}}", "My answer is \\boxed{\\frac{1}{2}}")
        ],
    )
    run_winnow(
        "sample",
        "--sampler_engine",
        "no",
        "--cache_files",
        str(cache),
        "--dataset",
        str(data),
        "--num_return_sequences",
        "2",
        "--external_plugins",
        str(work / "rewards.py"),
        "--reward_funcs",
        "accuracy_reward",
        "think_format_reward",
        "--output_format",
        "raw",
        "--output_dir",
        str(tmp_path),
        "--output_file",
        "o.jsonl",
        "--progress",
        "false",
        check=True,
    )
    [record] = read_jsonl(tmp_path / "o.jsonl")
    scores = [
        (c["scores"]["accuracy_reward"]["value"], c["scores"]["think_format_reward"]["value"])
        for c in record["completions"]
    ]
    assert scores == [(1.0, 1.0), (0.0, 0.0)]


@pytest.mark.skipif(
    not SWIFT_PYTHON.exists(),
    reason="ms-swift is not installed beside (bash ../shared/peers/ms-swift/run_peer_bench.sh installs it)",
)
def test_ms_swift_loads_the_grpo_file(outputs):
    _, files = outputs
    code = (
        "import json, sys\nfrom swift.dataset import load_dataset\n"
        "ds, _ = load_dataset([sys.argv[1]], remove_unused_columns=False)\n"
        "print(json.dumps({'n': len(ds), 'row': ds[0]}, default=str))"
    )
    proc = subprocess.run(
        [str(SWIFT_PYTHON), "-c", code, str(files["grpo"])],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["n"] == len(read_jsonl(files["grpo"]))
    assert loaded["row"]["messages"][-1]["role"] == "user" and loaded["row"]["answer"]


def test_tool_calling_conversations_round_trip(tmp_path):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "add",
                "description": "Add two numbers.",
                "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
            },
        }
    ]
    history = [
        {"role": "user", "content": "What is 1 + 2? [[toolcall]]"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "name": "add", "content": "3"},
        {"role": "user", "content": "Now add 2 to it. [[toolcall]]"},
    ]
    data = write_jsonl(tmp_path / "tools.jsonl", [{"messages": history, "tools": tools, "topic": "math"}])
    with FakeServer().running() as server:
        for stream in ("false", "true"):
            run_winnow(
                "sample",
                "--sampler_engine",
                "client",
                "--model",
                "fake",
                "--dataset",
                str(data),
                "--num_return_sequences",
                "2",
                "--stream",
                stream,
                "--engine_kwargs",
                json.dumps({"base_url": server.url}),
                "--output_dir",
                str(tmp_path),
                "--output_file",
                f"out-{stream}.jsonl",
                "--progress",
                "false",
                check=True,
            )
            assert server.last_body["tools"] == tools and server.last_body["messages"] == history
            records = read_jsonl(tmp_path / f"out-{stream}.jsonl")
            assert len(records) == 2
            for record in records:
                assert record["messages"][:4] == history  # every field of every earlier turn, unchanged
                assert record["tools"] == tools and record["topic"] == "math"
                answer = record["messages"][4]
                assert answer["role"] == "assistant" and answer["content"] is None
                [call] = answer["tool_calls"]
                assert call["function"]["name"] == "add" and json.loads(call["function"]["arguments"])["b"] == 2
