"""Stage-1 cache files (cache.py): winnow's and swift's, matched by swift's id or by content, scored with
--sampler_engine no, read raw, and short groups completed by the engine.
"""

from __future__ import annotations

import json

from tests.support.commands import run_winnow
from tests.support.files import read_jsonl, write_jsonl
from winnow import data

ROWS = [
    {"problem": "What is 2 + 3?", "answer": "5", "level": 1},
    {"problem": "What is 4 + 4?", "answer": "8", "level": 2},
    {"problem": "What is 3 * 3?", "answer": "9", "level": 3},
]

SAMPLES = {
    "5": ["\\boxed{6}", "so \\boxed{5}", "so \\boxed{5}", "I think 7"],  # a duplicate correct one
    "8": ["\\boxed{7}", "\\boxed{9}", "no idea", "\\boxed{1}"],  # all wrong
    "9": ["\\boxed{1}", "3 * 3 = \\boxed{9}"],  # short: 2 of 4
}


def ids_by_answer(path):
    plan = data.build_plan([str(path)], seed=42)
    out = {}
    for pos in range(len(plan)):
        prompt = plan.read(pos)
        out[prompt.columns["answer"]] = (prompt.id, prompt.messages)
    return out


def write_cache(tmp_path, dataset, raw: bool = False):
    ids = ids_by_answer(dataset)
    lines = []
    for answer, texts in SAMPLES.items():
        row_id, messages = ids[answer]
        if raw:
            lines.append(
                {
                    "id": row_id,
                    "messages": messages,
                    "completions": [{"text": t, "finish_reason": "stop", "completion_tokens": 3} for t in texts],
                }
            )
        else:
            lines += [{"messages": [*messages, {"role": "assistant", "content": t}], "id": row_id} for t in texts]
    return write_jsonl(tmp_path / ("stage1-raw.jsonl" if raw else "stage1.jsonl"), lines), ids


def test_swift_cache_files_match_by_swifts_id_or_by_content_and_a_missing_one_is_sampled(
    tmp_path, tiny_model, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    write_jsonl(
        tmp_path / "d.jsonl",
        [{"messages": [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"}]}],
    )
    # a line as swift writes it: the row (messages + dataset) and swift's md5 id (from ms-swift 4.6.0)
    swift_line = {
        "messages": [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "\\boxed{2}"}],
        "dataset": "d.jsonl",
        "id": "5a316c01dd42f2d7294e29e057e83c71",
    }
    write_jsonl(tmp_path / "swift_stage1.jsonl", [swift_line])
    proc = run_winnow(
        "sample",
        "--sampler_engine",
        "no",
        "--cache_files",
        "swift_stage1.jsonl",
        "--dataset",
        "./d.jsonl",
        "--num_return_sequences",
        "1",
        "--orm_model",
        "math",
        "--output_file",
        "s2.jsonl",
        "--progress",
        "false",
        check=True,
    )  # another spelling of the dataset: matched by content
    assert len(read_jsonl(tmp_path / "sample_output" / "s2.jsonl")) == 1, proc.stderr
    # winnow's own stage-1 lines carry swift's id, so swift's cache reader finds them
    run_winnow(
        "sample",
        "--model",
        str(tiny_model),
        "--dataset",
        "d.jsonl",
        "--num_return_sequences",
        "2",
        "--max_new_tokens",
        "3",
        "--cache_files",
        "missing.jsonl",
        "--output_file",
        "s1.jsonl",
        "--progress",
        "false",
        check=True,
    )
    stage1 = read_jsonl(tmp_path / "sample_output" / "s1.jsonl")
    assert [r["id"] for r in stage1] == ["5a316c01dd42f2d7294e29e057e83c71"] * 2


def test_stage2_scores_cache_without_a_policy(tmp_path):
    dataset = write_jsonl(tmp_path / "math.jsonl", ROWS)
    cache, ids = write_cache(tmp_path, dataset)
    proc = run_winnow(
        "sample",
        "--sampler_engine",
        "no",
        "--cache_files",
        str(cache),
        "--dataset",
        str(dataset),
        "--orm_model",
        "math",
        "--reward_kwargs",
        '{"math": {"workers": 1}}',
        "--num_return_sequences",
        "4",
        "--n_best_to_keep",
        "2",
        "--output_dir",
        str(tmp_path / "out"),
        "--output_file",
        "s2.jsonl",
        "--progress",
        "false",
    )
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(tmp_path / "out" / "s2.jsonl")
    by_id = {}
    for r in records:
        by_id.setdefault(r["id"], []).append(r)
    # row "5": the duplicate correct sample is kept once; the worst failing one (first in order on a tie) rejected
    five = by_id[ids["5"][0]]
    assert [r["messages"][-1]["content"] for r in five] == ["so \\boxed{5}"]
    assert five[0]["rejected_response"] == "\\boxed{6}" and five[0]["level"] == 1 and five[0]["answer"] == "5"
    assert ids["8"][0] not in by_id  # every sample failed the ORM
    nine = by_id[ids["9"][0]]
    assert [(r["messages"][-1]["content"], r["rejected_response"]) for r in nine] == [
        ("3 * 3 = \\boxed{9}", "\\boxed{1}")
    ]
    assert "1 rows filtered (all samples failed the ORM: 1)" in proc.stderr
    assert "1 cached rows short of samples (2 missing)" in proc.stderr
    manifest = (
        json.loads((tmp_path / "out" / "s2.manifest.json").read_text())
        if (tmp_path / "out" / "s2.manifest.json").exists()
        else None
    )
    if manifest is not None:
        assert manifest["rewards"][0]["key"] == "math"


def test_stage2_reads_raw_cache_and_writes_dpo(tmp_path):
    dataset = write_jsonl(tmp_path / "math.jsonl", ROWS)
    cache, ids = write_cache(tmp_path, dataset, raw=True)
    proc = run_winnow(
        "sample",
        "--sampler_engine",
        "no",
        "--cache_files",
        str(cache),
        "--dataset",
        str(dataset),
        "--orm_model",
        "accuracy",
        "--reward_kwargs",
        '{"accuracy": {"workers": 0}}',
        "--num_return_sequences",
        "4",
        "--output_format",
        "dpo",
        "--num_rejected",
        "2",
        "--output_dir",
        str(tmp_path / "out"),
        "--output_file",
        "dpo.jsonl",
        "--progress",
        "false",
    )
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(tmp_path / "out" / "dpo.jsonl")
    five = [r for r in records if r["id"] == ids["5"][0]]
    assert [r["rejected"][0]["content"] for r in five] == ["\\boxed{6}", "I think 7"]
    assert all(r["chosen"] == [{"role": "assistant", "content": "so \\boxed{5}"}] for r in five)
    assert five[0]["prompt"] == ids["5"][1] and five[0]["score_chosen"] == 1.0 and five[0]["score_rejected"] == 0.0


def test_short_groups_are_completed_by_the_engine(tmp_path, tiny_model):
    dataset = write_jsonl(tmp_path / "math.jsonl", ROWS)
    cache, ids = write_cache(tmp_path, dataset)
    proc = run_winnow(
        "sample",
        "--model",
        str(tiny_model),
        "--cache_files",
        str(cache),
        "--dataset",
        str(dataset),
        "--num_return_sequences",
        "4",
        "--max_new_tokens",
        "4",
        "--output_format",
        "raw",
        "--output_dir",
        str(tmp_path / "out"),
        "--output_file",
        "raw.jsonl",
        "--progress",
        "false",
    )
    assert proc.returncode == 0, proc.stderr
    records = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "raw.jsonl")}
    nine = records[ids["9"][0]]["completions"]
    assert len(nine) == 4 and [c["text"] for c in nine[:2]] == SAMPLES["9"]
    assert all(c["completion_tokens"] > 0 for c in nine[2:])  # generated now, not cached
    assert [c["text"] for c in records[ids["5"][0]]["completions"]] == SAMPLES["5"]  # full groups untouched
    assert "short of samples" not in proc.stderr
