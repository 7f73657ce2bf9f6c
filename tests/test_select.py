"""Selection and formats (select.py): n-best, pairs, thresholds, difficulty and swift's mode on hand-scored
groups, and the files in the trainers that consume them: TRL's SFT, DPO and GRPO trainers train a step on
them unchanged (tiny model, CPU), one reward file serves TRL and winnow, ms-swift's loader reads the GRPO
file, and tool-calling conversations survive a round trip.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.commands import run_winnow
from tests.support.fakeserver import FakeServer
from tests.support.files import read_jsonl, write_jsonl
from winnow.schema import FINISH_ERROR, Completion, Group, Prompt, Score
from winnow.select import SelectOptions, choose, with_reference
from winnow.select import select as select_group

trl = pytest.importorskip("trl", reason="TRL is a test dependency (pip install 'winnow[dev]')")


def group(*samples: tuple[str, float | None, float | None], response: str | None = "ref answer") -> Group:
    """samples: (text, orm, prm); reward = orm + prm of the known ones."""
    cs = []
    for text, orm, prm in samples:
        c = Completion(text=text, completion_tokens=3)
        c.scores = {"math": Score(orm), "prm": Score(prm, steps=[prm] if prm is not None else [])}
        known = [v for v in (orm, prm) if v is not None]
        c.reward = sum(known) if known else None
        cs.append(c)
    prompt = Prompt(
        id="row1",
        messages=[{"role": "user", "content": "q?"}],
        response=response,
        reference=response,
        columns={"level": 3},
    )
    return Group(prompt, cs)


def opts(**kw) -> SelectOptions:
    base = dict(scored=True, orm_key="math", prm_key="prm", n_best_to_keep=2)
    return SelectOptions(**{**base, **kw})


def select(g: Group, o: SelectOptions):
    """(records, reason) of a group."""
    out = select_group(g, o)
    return out.records, out.reason


def texts(records, key="messages"):
    return [r[key][-1]["content"] for r in records]


def swift_group(*samples, response="ref answer"):
    g = group(*samples, response=response)
    g.prompt.dataset, g.prompt.swift_id = "d.jsonl", "md5-of-the-row"
    return g


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


def test_keeps_best_passing_and_pairs_with_worst_failing():
    g = group(("a", 1, 0.5), ("b", 0, 0.9), ("c", 1, 0.7), ("d", 0, 0.1), ("e", 1, 0.2))
    records, reason = select(g, opts())
    assert reason is None
    assert texts(records) == ["c", "a"]  # top 2 by reward among ORM passes
    assert [r["rejected_response"] for r in records] == ["d", "d"]  # the worst that fails the ORM
    assert all(r["id"] == "row1" and r["level"] == 3 for r in records)
    assert records[0]["messages"][0] == {"role": "user", "content": "q?"}


def test_all_fail_orm_gives_nothing_with_reason():
    records, reason = select(group(("a", 0, 0.5), ("b", 0, 0.9)), opts())
    assert records == [] and reason == "all samples failed the ORM"


def test_a_rejected_response_scores_strictly_lower_and_an_unpaired_sample_is_kept_and_counted():
    # b fails the ORM but scores higher than a: it cannot be a's rejected response
    g = group(("a", 1, 0.1), ("b", 0, 1.5))
    out = select_group(g, opts())
    assert texts(out.records) == ["a"] and "rejected_response" not in out.records[0]
    assert out.notes == {"lines without rejected_response (no sample below the chosen)": 1}
    out = select_group(g, opts(keep_unpaired=False))
    assert out.records == [] and out.reason.startswith("no pair")
    assert out.notes == {"kept samples dropped: no rejected partner (--keep_unpaired false)": 1}


def test_when_every_sample_passes_the_chosen_are_kept_and_paired_with_the_lowest_below():
    g = group(("a", 1, 0.9), ("b", 1, 0.2), ("c", 1, 0.5))
    out = select_group(g, opts())
    assert texts(out.records) == ["a", "c"]
    assert [r["rejected_response"] for r in out.records] == ["b", "b"]
    assert out.notes == {"rejected responses that pass the ORM": 2}
    tie = select_group(group(("a", 1, 0.5), ("b", 1, 0.5)), opts())  # nothing below: written, unpaired
    assert texts(tie.records) == ["a", "b"] and not any("rejected_response" in r for r in tie.records)
    assert tie.notes == {"lines without rejected_response (no sample below the chosen)": 2}


def test_an_orm_failure_is_preferred_over_a_lower_scoring_pass():
    g = group(("a", 1, 0.9), ("b", 1, 0.0), ("c", 0, 0.8))
    out = select_group(g, opts(n_best_to_keep=1))
    assert [r["rejected_response"] for r in out.records] == ["c"] and not out.notes


def test_min_margin_and_num_rejected():
    g = group(("a", 1, 0.5), ("b", 0, 0.9), ("c", 0, 0.1), ("d", 0, 0.3))
    records, _ = select(g, opts(num_rejected=3))
    # a = 1.5; all three fail the ORM and are lower; worst first
    assert [r["rejected_response"] for r in records] == ["c", "d", "b"]
    records, _ = select(g, opts(num_rejected=3, min_margin=1.1))
    assert [r["rejected_response"] for r in records] == ["c", "d"]  # b's gap 0.6 is too small


def test_prm_threshold_excludes_at_or_below_and_needs_a_prm():
    g = group(("a", 1, 0.5), ("b", 1, 0.6), ("c", 0, 0.0))
    records, _ = select(g, opts(prm_threshold=0.5))
    assert texts(records) == ["b"]
    assert select(g, opts(prm_threshold=0.6))[1].startswith("prm threshold")
    # as in swift, the threshold (0.0 by default) applies only when there is a PRM
    records, _ = select(g, opts(prm_threshold=0.6, prm_key=None))
    assert texts(records) == ["b", "a"]


def test_ties_break_by_sample_order_and_duplicates_are_not_kept_twice():
    g = group(("same", 1, 0.5), ("x", 1, 0.5), ("same", 1, 0.5), ("y", 1, 0.5), ("bad", 0, 0.0))
    out = select_group(g, opts(n_best_to_keep=3))
    assert texts(out.records) == ["same", "x", "y"] and out.notes == {"duplicate texts not kept": 1}
    again, _ = select(g, opts(n_best_to_keep=3))
    assert again == out.records


def test_cannot_judge_is_neither_kept_nor_rejected():
    g = group(("a", None, 0.9), ("b", 1, 0.2), ("c", None, 0.0))
    choice = choose(g, opts())
    assert [c.completion.text for c, _ in choice.kept] == ["b"]
    # c cannot be judged, so it is not taken for a failure: it is a rejected partner only as a lower scorer
    assert [r.completion.text for r in choice.kept[0][1]] == ["c"]
    choice = choose(group(("a", None, 0.9), ("b", 1, 0.2), ("c", None, 0.0), ("d", 0, 0.1)), opts())
    assert [r.completion.text for r in choice.kept[0][1]] == ["d"]  # a real failure comes first
    assert select(group(("a", None, 0.9)), opts())[1].startswith("ORM could not judge")


def test_easy_and_hard_filters():
    g = group(("a", 1, 0.5), ("b", 1, 0.5), ("c", 1, 0.5), ("d", 0, 0.1))  # pass rate 0.75
    assert select(g, opts(easy_query_threshold=0.7))[1].startswith("easy")
    assert select(g, opts(easy_query_threshold=0.75))[1] is None
    assert select(g, opts(hard_query_threshold=0.8))[1].startswith("hard")
    assert select(g, opts(hard_query_threshold=0.75))[1] is None


def test_reference_is_not_a_candidate_unless_asked():
    g = with_reference(group(("a", 0, 0.1), ("b", 0, 0.2)))
    ref = g.completions[-1]
    ref.scores = {"math": Score(1), "prm": Score(0.9)}
    ref.reward = 1.9
    assert select(g, opts())[1] == "all samples failed the ORM"
    records, _ = select(g, opts(include_reference=True))
    assert texts(records) == ["ref answer"] and records[0]["rejected_response"] == "a"


def test_failed_samples_are_ignored():
    g = group(("a", 1, 0.5), ("b", 0, 0.1))
    g.completions.append(Completion(text="", finish_reason=FINISH_ERROR, error="boom"))
    records, _ = select(g, opts())
    assert len(records) == 1


def test_dpo_sft_raw_grpo_formats():
    g = group(("a", 1, 0.5), ("b", 0, 0.1), ("c", 1, 0.3))
    dpo, _ = select(g, opts(output_format="dpo"))
    assert dpo[0]["prompt"] == [{"role": "user", "content": "q?"}]
    assert dpo[0]["chosen"] == [{"role": "assistant", "content": "a"}]
    assert dpo[0]["rejected"] == [{"role": "assistant", "content": "b"}]
    assert dpo[0]["score_chosen"] == 1.5 and dpo[0]["score_rejected"] == pytest.approx(0.1)
    assert dpo[0]["level"] == 3 and len(dpo) == 2
    sft, _ = select(g, opts(output_format="sft"))
    assert texts(sft) == ["a", "c"] and all("rejected_response" not in r for r in sft)
    (raw,), _ = select(g, opts(output_format="raw"))
    assert [c["text"] for c in raw["completions"]] == ["a", "b", "c"]
    assert raw["completions"][0]["scores"]["prm"] == {"value": 0.5, "steps": [0.5]}
    assert raw["level"] == 3
    (grpo,), _ = select(g, opts(output_format="grpo"))
    rewards = [1.5, 0.1, 1.3]
    mean = sum(rewards) / 3
    std = (sum((r - mean) ** 2 for r in rewards) / 2) ** 0.5
    # a prompt a GRPO trainer loads: prompt (TRL) and messages (swift), the row's columns, statistics aside
    assert grpo["prompt"] == grpo["messages"] == [{"role": "user", "content": "q?"}] and "completions" not in grpo
    assert grpo["level"] == 3 and grpo["solution"] == "ref answer" and grpo["winnow_samples"] == 3
    assert grpo["winnow_pass_rate"] == pytest.approx(2 / 3)
    assert grpo["winnow_reward_mean"] == pytest.approx(mean) and grpo["winnow_reward_std"] == pytest.approx(std)
    pc, _ = select(g, opts(output_format="prompt_completion"))
    assert pc[0]["prompt"] == [{"role": "user", "content": "q?"}]
    assert [r["completion"] for r in pc] == [
        [{"role": "assistant", "content": "a"}],
        [{"role": "assistant", "content": "c"}],
    ]


def test_reasoning_goes_where_asked():
    g = group(("a", 1, 0.5), ("b", 0, 0.1))
    for c in g.completions:
        c.reasoning = "think " + c.text
    for fmt, check in [
        (
            "message",
            lambda r: r["messages"][-1] == {"role": "assistant", "content": "a", "reasoning_content": "think a"},
        ),
        ("think_answer", lambda r: r["messages"][-1]["content"] == "<think>think a</think>\n\n<answer>a</answer>"),
        ("think", lambda r: r["messages"][-1]["content"] == "<think>\nthink a\n</think>\n\na"),
        ("separate", lambda r: r["reasoning"] == "think a" and r["messages"][-1]["content"] == "a"),
        ("none", lambda r: r["messages"][-1] == {"role": "assistant", "content": "a"} and "reasoning" not in r),
    ]:
        records, _ = select(g, opts(reasoning_format=fmt))
        assert check(records[0]), fmt


def test_unscored_keeps_every_sample():
    g = group(("a", None, None), ("a", None, None), ("b", None, None))
    records, _ = select(g, SelectOptions(n_best_to_keep=1))
    assert texts(records) == ["a", "a", "b"]  # stage 1 writes everything, for stage 2 to count and score


def test_swift_mode_reproduces_swifts_algorithm():
    """Hand-worked with ms-swift 4.6's do_sample: the dataset's answer is a candidate (scored here 1 / 0.9),
    scores are min-max normalised, score = prm + 10 * orm, the single lowest is every line's rejected."""
    g = with_reference(swift_group(("a", 1, 0.5), ("b", 0, 0.9), ("c", 1, 0.7), ("d", 0, 0.1)))
    g.completions[-1].scores = {"math": Score(1), "prm": Score(0.9)}
    out = select_group(g, opts(selection="swift", num_return_sequences=4))
    # orm normalised: a,c,ref -> ~1, b,d -> 0; prm: (x - 0.1) / 0.8: a .5, b 1, c .75, d 0, ref 1
    # order: ref (11.0), c (10.75), a (10.5), b (1.0), d (0.0): top 2 = ref, c; rejected = d
    assert [r["messages"][-1]["content"] for r in out.records] == ["ref answer", "c"]
    assert all(r["rejected_response"] == "d" for r in out.records)
    assert out.records[0] == {
        "messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "ref answer"}],
        "dataset": "d.jsonl",
        "rejected_response": "d",
        "id": "md5-of-the-row",
    }
    assert out.notes == {"dataset answers written as chosen (swift)": 1}


def test_swift_mode_keeps_its_ties_and_correct_rejected_responses():
    g = with_reference(swift_group(("a", 1, 0.5), ("a", 1, 0.5)))
    g.completions[-1].scores = {"math": Score(1), "prm": Score(0.5)}
    out = select_group(g, opts(selection="swift", num_return_sequences=2, n_best_to_keep=2))
    # all equal: argsort keeps index order, reversed: [2, 1, 0]; negative = 0 ("a"), kept 2 (ref) and 1 ("a")
    assert [(r["messages"][-1]["content"], r["rejected_response"]) for r in out.records] == [
        ("ref answer", "a"),
        ("a", "a"),
    ]


def test_swift_mode_easy_formula():
    g = with_reference(swift_group(("a", 1, 0.5), ("b", 0, 0.5), ("c", 1, 0.4)))
    g.completions[-1].scores = {"math": Score(1), "prm": Score(0.5)}
    # count(orm > 0) = 3 (a, c, the answer) - 1 = 2 >= int(3 * 0.5) = 1: easy, although 2/3 passes is not > 0.7
    assert select(g, opts(selection="swift", num_return_sequences=3, easy_query_threshold=0.7))[1].startswith("easy")


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
