"""Dataset specs, formats, #N sampling, shards, ids and bad rows (data.py)."""

from __future__ import annotations

import csv
import json
import random

import pytest

from tests.support.files import write_jsonl
from winnow import data
from winnow.errors import DataError
from winnow.schema import BadRow, Prompt


def test_spec_parsing(tmp_path):
    assert data.parse_dataset_spec("org/name") == data.DatasetSpec("org/name", None, None, "org/name")
    spec = data.parse_dataset_spec("org/name:sub#500")
    assert (spec.path, spec.subset, spec.n) == ("org/name", "sub", 500)
    local = tmp_path / "a:b.jsonl"
    local.write_text("{}\n")
    spec = data.parse_dataset_spec(f"{local}#3")
    assert (spec.path, spec.subset, spec.n) == (str(local), None, 3)  # a local path is never split on ':'
    with pytest.raises(DataError, match="row count"):
        data.parse_dataset_spec("x.jsonl#abc")


def _prompts(plan):
    return [plan.read(p) for p in range(len(plan))]


@pytest.mark.parametrize(
    "row, user, response, reference",
    [
        (
            {
                "messages": [
                    {"role": "system", "content": "S"},
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "A"},
                ]
            },
            "Q",
            "A",
            "A",
        ),
        ({"instruction": "Add.", "input": "1 and 2", "output": "3"}, "Add.\n1 and 2", "3", "3"),
        ({"instruction": "Say hi", "input": "", "output": "hi"}, "Say hi", "hi", "hi"),
        ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}, "Q", "A", "A"),
        ({"query": "Q", "response": "A", "history": [["q0", "a0"]]}, "Q", "A", "A"),
        ({"prompt": "Q", "completion": "A"}, "Q", "A", "A"),
        (
            {"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}]},
            "Q",
            "A",
            "A",
        ),
        ({"problem": "Q", "solution": "so \\boxed{4}", "answer": "4"}, "Q", "so \\boxed{4}", "4"),
        ({"question": "Q", "answer": "7"}, "Q", "7", "7"),
        ({"messages": [{"role": "user", "content": "Q"}]}, "Q", None, None),
    ],
)
def test_formats(tmp_path, row, user, response, reference):
    path = write_jsonl(tmp_path / "d.jsonl", [{**row, "extra": 1}])
    (prompt,) = _prompts(data.build_plan([str(path)], shuffle=False))
    assert isinstance(prompt, Prompt), prompt
    assert prompt.messages[-1] == {"role": "user", "content": user}
    assert prompt.response == response
    assert prompt.reference == reference
    assert prompt.columns["extra"] == 1
    assert prompt.source == f"{path}:1"


def test_history_and_system_become_turns(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"query": "Q", "response": "A", "system": "S", "history": [["q0", "a0"]]}]
    )
    (prompt,) = _prompts(data.build_plan([str(path)], shuffle=False))
    assert [m["role"] for m in prompt.messages] == ["system", "user", "assistant", "user"]


def test_system_flag_replaces_the_datasets_system_message_as_swift_does(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"messages": [{"role": "user", "content": "Q"}]},
            {"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "Q2"}]},
        ],
    )
    a, b = _prompts(data.build_plan([str(path)], shuffle=False, system="SYS"))
    assert a.messages[0] == {"role": "system", "content": "SYS"}
    assert b.messages[:2] == [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Q2"}]


def test_ids_are_swifts_md5_of_the_preprocessed_row(tmp_path, monkeypatch):
    """Values computed by ms-swift 4.6.0 (swift.pipelines.sampling.utils.get_messages_md5 on the rows its
    load_dataset made of these lines, the dataset given as 'msgs.jsonl' / 'query.jsonl')."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(
        tmp_path / "msgs.jsonl",
        [
            {"messages": [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"}]},
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "What is 2 + 2?"},
                    {"role": "assistant", "content": "4"},
                ],
                "level": 3,
            },
        ],
    )
    write_jsonl(tmp_path / "query.jsonl", [{"query": "hi", "response": "hello", "history": [["a", "b"]]}])
    ids = [p.id for p in _prompts(data.build_plan(["msgs.jsonl", "query.jsonl"], shuffle=False))]
    assert ids == [
        "2651e6d40c08ab58bccb53de1d8fbc29",
        "71ebf10fab7a8229fa5459c0d685e7b7",
        "537da318fbb6bb98c8bb9fd24fb6426d",
    ]


def test_csv_json_parquet_and_folders(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    with open(folder / "a.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["instruction", "input", "output"])
        w.writeheader()
        w.writerow({"instruction": "I1", "input": "", "output": "O1"})
    (folder / "b.json").write_text(json.dumps([{"query": "Q2", "response": "R2"}]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"problem": "P3", "answer": "3"}]), folder / "c.parquet")
    prompts = _prompts(data.build_plan([str(folder)], shuffle=False))
    assert [p.messages[-1]["content"] for p in prompts] == ["I1", "Q2", "P3"]
    assert prompts[0].source.endswith("a.csv:2")  # line 1 is the header


def test_bad_rows_name_file_line_and_reason(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"messages": [{"role": "user", "content": "ok"}]},
            "{not json",
            {"messages": [{"role": "robot", "content": "x"}]},
            {"messages": [{"role": "user", "content": "   "}]},
            {"messages": [{"role": "assistant", "content": "no prompt"}]},
            {"messages": "nope"},
            {"something": "else"},
        ],
    )
    items = _prompts(data.build_plan([str(path)], shuffle=False))
    assert isinstance(items[0], Prompt)
    bad = items[1:]
    assert all(isinstance(b, BadRow) for b in bad)
    assert [b.source for b in bad] == [f"{path}:{n}" for n in range(2, 8)]
    reasons = [b.reason for b in bad]
    assert "invalid JSON" in reasons[0]
    assert "robot" in reasons[1]
    assert "empty prompt" in reasons[2]
    assert "must end with a user turn" in reasons[3]
    assert "non-empty list" in reasons[4]
    assert "messages" in reasons[5]


def test_n_sampling_follows_swifts_rule(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(10)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    fewer = _prompts(data.build_plan([f"{path}#4"], shuffle=False))
    contents = [p.messages[-1]["content"] for p in fewer]
    assert len(contents) == 4 and len(set(contents)) == 4  # without replacement
    more = _prompts(data.build_plan([f"{path}#25"], shuffle=False))
    counts = {}
    for p in more:
        counts[p.messages[-1]["content"]] = counts.get(p.messages[-1]["content"], 0) + 1
    assert len(more) == 25
    assert sorted(counts.values()) == [2] * 5 + [3] * 5  # two whole copies, then 5 sampled
    assert len({p.id for p in more}) == 25  # repeated rows get distinct ids
    again = _prompts(data.build_plan([f"{path}#25"], shuffle=False))
    assert [p.id for p in again] == [p.id for p in more]  # seeded


def test_shards_cover_every_row_exactly_once(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(23)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    whole = [p.id for p in _prompts(data.build_plan([str(path)], seed=3))]
    shards = [[p.id for p in _prompts(data.build_plan([str(path)], seed=3, data_range=[i, 5]))] for i in range(5)]
    assert sum(shards, []) == whole
    assert [len(s) for s in shards] == [4, 5, 4, 5, 5]


def test_ids_are_stable_content_hashes(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(6)]
    rows.append(rows[0])  # a duplicate row still gets its own id
    rows.append({"id": "mine-7", "messages": [{"role": "user", "content": "q7"}]})
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    plain = {
        p.messages[-1]["content"] + str(i): p.id
        for i, p in enumerate(_prompts(data.build_plan([str(path)], shuffle=False)))
    }
    shuffled = _prompts(data.build_plan([str(path)], seed=7))
    assert len({p.id for p in shuffled}) == 8
    assert sorted(p.id for p in shuffled) == sorted(plain.values())
    # rewriting the file in another order keeps every id (the --dataset name is part of it, as in swift)
    order = list(range(7))
    random.Random(1).shuffle(order)
    path2 = write_jsonl(tmp_path / "d.jsonl", [rows[i] for i in order if i != 6] + [rows[6], rows[7]])
    assert sorted(p.id for p in _prompts(data.build_plan([str(path2)]))) == sorted(plain.values())


def test_missing_and_empty_datasets(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.build_plan([str(tmp_path / "nope.jsonl")])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        data.build_plan([str(empty)])


def test_plan_is_compact(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(20000):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"question number {i}"}]}) + "\n")
    plan = data.build_plan([str(path)])
    per_row = plan.src.itemsize + plan.idx.itemsize + plan.copy.itemsize
    assert per_row <= 12  # a few bytes a row: the plan never holds the rows themselves
    assert len(plan) == 20000
    assert isinstance(plan.read(19999), Prompt)


def test_hub_loading_code_on_a_local_hub_layout(tmp_path, monkeypatch):
    """The hub path goes through the real ``datasets.load_dataset``; exercised on a local repo layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "hub" / "org" / "arith"
    (repo / "data").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist([{"problem": f"P{i}", "answer": str(i)} for i in range(5)]),
        repo / "data" / "train-00000-of-00001.parquet",
    )
    (source,) = [data._open_hub(data.DatasetSpec(path=str(repo), text=str(repo)))]
    assert len(source) == 5 and source.row(3) == {"problem": "P3", "answer": "3"}
    assert source.where(3) == f"{repo} row 3"
    # an id that is neither a local path nor loadable says both, for the hub it was read from
    from winnow import hub

    with pytest.raises(DataError, match="no-such-org/no-such-dataset: not in the ModelScope cache"):
        data.build_plan(["no-such-org/no-such-dataset#3"])
    hub.configure(use_hf=True)
    try:
        with pytest.raises(DataError, match="no local file or folder by that name"):
            data.build_plan(["no-such-org/no-such-dataset#3"])
    finally:
        hub.configure(use_hf=False)
