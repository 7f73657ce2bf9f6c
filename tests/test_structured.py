"""Structured output (structured.py): every form of ``--response_format`` becomes a JSON schema, the
answer check, the ``json_schema`` reward, and the sample command with a pydantic model.
"""

from __future__ import annotations

import json

import pytest

from tests.support.commands import run_winnow
from tests.support.files import read_jsonl, write_jsonl
from tests.support.structured import PYDANTIC_PLUGIN, SCHEMA
from winnow.errors import ConfigError
from winnow.structured import SchemaCheck, load_response_format


def test_every_form_becomes_openai_json_schema(tmp_path):
    file = tmp_path / "answer.json"
    file.write_text(json.dumps(SCHEMA))
    plugin = tmp_path / "models.py"
    plugin.write_text(PYDANTIC_PLUGIN)
    inline = load_response_format(json.dumps(SCHEMA))
    assert inline == {"type": "json_schema", "json_schema": {"name": "Answer", "schema": SCHEMA, "strict": True}}
    assert load_response_format(str(file)) == inline
    whole = load_response_format(
        json.dumps({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": False}})
    )
    assert whole["json_schema"] == {"name": "x", "schema": SCHEMA, "strict": False}
    assert load_response_format('{"type": "json_object"}') == {"type": "json_object"}
    model = load_response_format(f"{plugin}:Answer")
    assert model["json_schema"]["name"] == "Answer"
    assert model["json_schema"]["schema"]["properties"]["note"]["maxLength"] == 12


@pytest.mark.parametrize(
    "spec, message",
    [
        ("{not json", "not valid JSON"),
        ("missing.json", "no such file"),
        ('{"type": "object", "properties": 3}', "not a valid JSON schema"),
        ("models.py:Nope", "no pydantic model named 'Nope'"),
    ],
)
def test_bad_response_format_is_one_clear_error(tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models.py").write_text(PYDANTIC_PLUGIN)
    with pytest.raises(ConfigError, match=message):
        load_response_format(spec)


def test_schema_check_says_why():
    check = SchemaCheck(SCHEMA)
    assert check.error('{"answer": 3, "confidence": "low", "note": "ok"}') is None
    assert check.error('{"answer": 3, "confidence": "low"').startswith("invalid JSON")
    assert "at answer" in check.error('{"answer": 5000, "confidence": "low", "note": ""}')
    assert "'note' is a required property" in check.error('{"answer": 1, "confidence": "low"}')
    # json raises a plain ValueError (no position) for an integer past Python's digit limit
    assert check.error('{"answer": ' + "9" * 5000 + "}").startswith("invalid JSON: Exceeds the limit")


def test_json_schema_reward_scores_without_constraining(tmp_path, fake_server):
    data = write_jsonl(tmp_path / "d.jsonl", [{"query": "What is 1 + 1?"}])
    run_winnow(
        "sample",
        "--sampler_engine",
        "client",
        "--model",
        "fake",
        "--dataset",
        str(data),
        "--num_return_sequences",
        "1",
        "--reward_funcs",
        "json_schema",
        "--output_format",
        "raw",
        "--reward_kwargs",
        json.dumps({"json_schema": {"schema": {"type": "object"}}}),
        "--engine_kwargs",
        json.dumps({"base_url": fake_server.url}),
        "--output_file",
        "o.jsonl",
        cwd=tmp_path,
        timeout=120,
        check=True,
    )
    [rec] = read_jsonl(tmp_path / "sample_output" / "o.jsonl")
    [c] = rec["completions"]
    assert "response_format" not in fake_server.last_body
    assert c["scores"]["json_schema"]["value"] == 0.0 and "invalid JSON" in c["scores"]["json_schema"]["info"]["error"]


def test_sample_command_on_the_transformers_engine_with_a_pydantic_model(tmp_path, tiny_model):
    plugin = tmp_path / "models.py"
    plugin.write_text(PYDANTIC_PLUGIN)
    data = write_jsonl(tmp_path / "d.jsonl", [{"query": f"What is {i} + 1?"} for i in range(3)])
    run_winnow(
        "sample",
        "--model",
        str(tiny_model),
        "--dataset",
        str(data),
        "--num_return_sequences",
        "2",
        "--max_new_tokens",
        "128",
        "--response_format",
        f"{plugin}:Answer",
        "--reward_funcs",
        "json_schema",
        "--output_format",
        "raw",
        "--output_file",
        "o.jsonl",
        cwd=tmp_path,
        timeout=300,
        check=True,
    )
    records = read_jsonl(tmp_path / "sample_output" / "o.jsonl")
    assert len(records) == 3
    assert all(
        c["scores"]["json_schema"]["value"] == 1.0 and c["finish_reason"] == "stop"
        for r in records
        for c in r["completions"]
    )
