"""Structured output (``--response_format``): sent to APIs, constrained decoding on the transformers engine
and in ``winnow serve``, every answer checked against the schema, and the ``json_schema`` reward."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import openai
import pytest

from tests.support.commands import Server, run_winnow
from tests.support.files import read_jsonl, write_jsonl
from winnow.errors import ConfigError
from winnow.schema import Prompt, SamplingParams
from winnow.structured import SchemaCheck, load_response_format, schema_of

# bounded fields: a tiny random model under constraint must still end its answer within the token limit
SCHEMA = {
    "title": "Answer",
    "type": "object",
    "properties": {
        "answer": {"type": "integer", "minimum": 0, "maximum": 999},
        "confidence": {"enum": ["low", "high"]},
        "note": {"type": "string", "maxLength": 12},
    },
    "required": ["answer", "confidence", "note"],
    "additionalProperties": False,
}
PYDANTIC_PLUGIN = """
from typing import Literal
from pydantic import BaseModel, Field

class Answer(BaseModel):
    answer: int = Field(ge=0, le=999)
    confidence: Literal["low", "high"]
    note: str = Field(max_length=12)
"""


# ----------------------------------------------------------------------------- reading --response_format


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


# ----------------------------------------------------------------------------- client engine


def test_client_engine_sends_response_format_and_fails_answers_off_the_schema(tmp_path, fake_server):
    schema_file = tmp_path / "answer.json"
    schema_file.write_text(
        json.dumps({"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]})
    )
    rows = [{"query": f"What is {i} + 1?"} for i in range(3)] + [{"query": "[[badjson-always]] What is 9 + 1?"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    proc = run_winnow(
        "sample",
        "--sampler_engine",
        "client",
        "--model",
        "fake",
        "--dataset",
        str(data),
        "--num_return_sequences",
        "2",
        "--response_format",
        str(schema_file),
        "--output_format",
        "raw",
        "--reward_funcs",
        "json_schema",
        "--engine_kwargs",
        json.dumps({"base_url": fake_server.url}),
        "--output_file",
        "o.jsonl",
        cwd=tmp_path,
        timeout=120,
        check=True,
    )
    assert fake_server.last_body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "strict": True, "schema": json.loads(schema_file.read_text())},
    }
    records = read_jsonl(tmp_path / "sample_output" / "o.jsonl")
    assert len(records) == 3
    for rec in records:
        for c in rec["completions"]:
            assert json.loads(c["text"])["answer"] == int(rec["messages"][0]["content"].split()[2]) + 1
            assert c["scores"]["json_schema"]["value"] == 1.0
    [failed] = read_jsonl(tmp_path / "sample_output" / "o.failed.jsonl")
    assert "response_format: invalid JSON" in failed["reason"] and not failed.get("retry")
    assert "1 rows failed" in proc.stderr


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


# ----------------------------------------------------------------------------- transformers engine


def test_transformers_engine_answers_always_match_the_schema(tiny_model):
    from winnow.engines import generate_sync, get_engine

    engine = get_engine("transformers", str(tiny_model), device="cpu", seed=0)
    rf = load_response_format(SCHEMA)
    prompts = [
        Prompt(id=str(i), messages=[{"role": "user", "content": f"What is {i} + 2?"}], position=i) for i in range(4)
    ]
    out = generate_sync(engine, prompts, SamplingParams(n=3, max_new_tokens=64, temperature=1.0, response_format=rf))
    check = SchemaCheck(schema_of(rf))
    texts = [c.text for cs in out for c in cs]
    assert len(texts) == 12 and len(set(texts)) > 1
    for cs in out:
        for c in cs:
            assert c.finish_reason == "stop" and check.error(c.text) is None, c.text
    # unconstrained, the same random model writes no JSON at all
    free = generate_sync(engine, prompts[:1], SamplingParams(n=3, max_new_tokens=32, temperature=1.0))
    assert all(check.error(c.text) is not None for c in free[0])


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


# ----------------------------------------------------------------------------- winnow serve


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    srv = Server(
        tmp_path_factory.mktemp("serve") / "structured.log",
        "--model",
        str(tiny_model),
        "--served_model_name",
        "tiny",
        "--max_new_tokens",
        "64",
    )
    yield srv
    assert srv.stop(signal.SIGINT) == 0, srv.output()[-2000:]


def test_serve_decodes_response_format_for_the_openai_sdk(served, tmp_path):
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    resp = client.chat.completions.create(
        model="tiny",
        messages=messages,
        n=3,
        temperature=1.0,
        response_format={"type": "json_schema", "json_schema": {"name": "Answer", "schema": SCHEMA, "strict": True}},
    )
    check = SchemaCheck(SCHEMA)
    assert [check.error(c.message.content) for c in resp.choices] == [None] * 3
    obj = client.chat.completions.create(
        model="tiny", messages=messages, response_format={"type": "json_object"}, max_tokens=48
    )
    assert obj.choices[0].finish_reason == "length" or isinstance(json.loads(obj.choices[0].message.content), dict)
    # the SDK's parse helper: a pydantic model in, parsed objects out
    plugin = Path(tmp_path / "models.py")
    plugin.write_text(PYDANTIC_PLUGIN)
    namespace: dict = {}
    exec(compile(PYDANTIC_PLUGIN, str(plugin), "exec", dont_inherit=True), namespace)
    parsed = client.chat.completions.parse(
        model="tiny", messages=messages, response_format=namespace["Answer"], temperature=1.0
    )
    answer = parsed.choices[0].message.parsed
    assert isinstance(answer, namespace["Answer"]) and 0 <= answer.answer <= 999
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="tiny", messages=messages, response_format={"type": "json_schema", "json_schema": {"name": "x"}}
        )
    assert info.value.body["param"] == "response_format"


def test_vllm_gets_the_schema_through_its_own_guided_decoding():
    """vLLM is not installed here: the mapping onto its two API generations, checked with stand-ins."""
    from types import SimpleNamespace

    from winnow.engines.vllm import structured_kwargs

    rf = load_response_format(SCHEMA)
    new = SimpleNamespace(StructuredOutputsParams=lambda json: ("structured", json))
    old = SimpleNamespace(GuidedDecodingParams=lambda json: ("guided", json))
    assert structured_kwargs(new, rf) == {"structured_outputs": ("structured", SCHEMA)}
    assert structured_kwargs(old, {"type": "json_object"}) == {"guided_decoding": ("guided", {"type": "object"})}
    assert structured_kwargs(old, None) == {}
