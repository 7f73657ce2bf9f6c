"""Constrained decoding on the local engines (engines/constrained.py): every answer matches the schema."""

from __future__ import annotations

from tests.support.structured import SCHEMA
from winnow.schema import Prompt, SamplingParams
from winnow.structured import SchemaCheck, load_response_format, schema_of


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
