"""Datasets (data.py): specs, formats, columns, #N sampling, shards, ids, swift's split and seed, and bad
rows and files named in one line.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from tests.support.client import client_args
from tests.support.commands import run_winnow
from tests.support.files import read_jsonl, write_jsonl
from tests.support.sampling import tiny_run
from winnow import data
from winnow.errors import DataError
from winnow.schema import BadRow, Prompt


def _prompts(plan):
    return [plan.read(p) for p in range(len(plan))]


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


def test_bad_files_are_one_line_or_a_bad_row_never_a_traceback(tmp_path, fake_server):
    ragged = tmp_path / "ragged.csv"
    ragged.write_text('query,k\nWhat is 1 + 1?,1\nWhat is 2 + 2?,2,extra\n"What is 3 + 3?",3\n')
    latin = tmp_path / "latin.json"
    latin.write_bytes('[{"query": "caf\xe9"}]'.encode("latin-1"))
    proc = run_winnow(*client_args(fake_server, tmp_path / "a", ragged))
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["k"] for r in read_jsonl(tmp_path / "a" / "o.jsonl")) == ["1", "3"]
    [bad] = read_jsonl(tmp_path / "a" / "o.failed.jsonl")
    assert bad["source"].endswith("ragged.csv:3") and "3 fields" in bad["reason"]
    proc = run_winnow(*client_args(fake_server, tmp_path / "b", latin))
    assert proc.returncode == 2 and "not UTF-8" in proc.stderr and "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1
    folder = tmp_path / "folder"
    folder.mkdir()
    for f in (ragged, latin):
        (folder / f.name).write_bytes(f.read_bytes())
    proc = run_winnow(*client_args(fake_server, tmp_path / "c", folder))
    assert proc.returncode == 0, proc.stderr  # one unreadable file fails its rows, not the run
    failed = read_jsonl(tmp_path / "c" / "o.failed.jsonl")
    assert sorted(Path(f["source"]).name for f in failed) == ["latin.json", "ragged.csv:3"]
    proc = run_winnow(*client_args(fake_server, Path("/proc/winnow-cannot-be-here"), ragged))
    assert proc.returncode == 2 and "--output_dir" in proc.stderr and "Traceback" not in proc.stderr
    assert fake_server.chat_requests == 4  # the first and third runs' rows; nothing before a bad output dir


def test_columns_data_seed_split_ratio_and_system_file(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction_text": f"Say {i}", "n": i} for i in range(10)])
    system = tmp_path / "system.txt"
    system.write_text("Answer in one word.")
    _, records = tiny_run(
        tmp_path,
        tiny_model,
        data,
        columns={"instruction_text": "query"},
        split_dataset_ratio=0.3,
        system=str(system),
        data_seed=7,
    )
    assert len(records) == 7  # 30% held out
    assert all(r["messages"][0] == {"role": "system", "content": "Answer in one word."} for r in records)
    again = {
        r["n"]
        for r in tiny_run(
            tmp_path, tiny_model, data, columns={"instruction_text": "query"}, split_dataset_ratio=0.3, data_seed=8
        )[1]
    }
    assert again != {r["n"] for r in records}  # another data seed holds out other rows
