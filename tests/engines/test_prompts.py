"""Prompt rendering and the context (engines/prompts.py): chat templates, thinking switches, response
prefixes, and prompts too long for the context failing alone.
"""

from __future__ import annotations

import json
import shutil

from tests.support.engines import (
    numbered_prompt,
)
from tests.support.files import read_jsonl, write_jsonl
from tests.support.sampling import tiny_run
from winnow.engines import _local
from winnow.schema import Prompt, SamplingParams


def test_prompt_encoder_renders_the_chat_template_and_fails_long_prompts(tiny_model):
    encoder = _local.PromptEncoder(str(tiny_model), max_length=80)
    short, long_ = numbered_prompt(0), numbered_prompt(1, words=60)
    work, results = encoder.encode([short, long_], SamplingParams(n=2, max_new_tokens=64))
    assert [w.slot for w in work] == [0]
    text = encoder.render(short)
    assert work[0].text == text and "<|im_start|>assistant" in text
    assert work[0].ids == encoder.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert work[0].max_new_tokens == 80 - len(work[0].ids)  # clamped to --max_length
    assert results[0] == [] and [c.finish_reason for c in results[1]] == ["error", "error"]
    assert "the limit is 80" in results[1][0].error and results[1][0].prompt_tokens >= 80


def test_prompt_encoder_fails_a_prompt_its_template_cannot_render(tiny_model):
    encoder = _local.PromptEncoder(str(tiny_model), template="{{ raise_exception('no system turns') }}")
    work, results = encoder.encode([numbered_prompt(0)], SamplingParams(n=3))
    assert work == [] and len(results[0]) == 3 and "cannot render" in results[0][0].error


def test_enable_thinking_and_response_prefix_reach_the_prompt(tiny_model):
    from winnow.engines.prompts import PromptEncoder

    prompt = Prompt(id="x", messages=[{"role": "user", "content": "hi"}])
    plain = PromptEncoder(str(tiny_model), template="qwen3").render(prompt)
    thinking = PromptEncoder(str(tiny_model), template="qwen3", template_kwargs={"enable_thinking": True}).render(
        prompt
    )
    prefixed = PromptEncoder(str(tiny_model), template="qwen", response_prefix="Sure: ").render(prompt)
    assert plain.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert thinking.endswith("<|im_start|>assistant\n")
    assert prefixed.endswith("<|im_start|>assistant\nSure: ")


def test_response_prefix_starts_every_answer(tmp_path, tiny_model, sums_jsonl):
    _, records = tiny_run(tmp_path, tiny_model, sums_jsonl, response_prefix="Step 1:")
    assert all(c["text"].startswith("Step 1:") for r in records for c in r["completions"])


def test_unset_max_new_tokens_runs_to_the_context_and_long_prompts_fail_alone(tmp_path, tiny_model):
    small = tmp_path / "small-context"
    shutil.copytree(tiny_model, small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    data = write_jsonl(tmp_path / "d.jsonl", [{"query": "hi"}, {"query": "word " * 5000}])
    summary, records = tiny_run(tmp_path, small, data, max_new_tokens=None)
    [record] = records
    assert all(c["prompt_tokens"] + c["completion_tokens"] <= 64 for c in record["completions"])
    [failed] = read_jsonl(tmp_path / "out" / "o.failed.jsonl")
    assert "characters, more than the 64-token limit" in failed["reason"]  # refused before tokenizing
    _, records = tiny_run(tmp_path, small, data, max_new_tokens=8, truncation_strategy="left")
    assert len(records) == 2  # the long prompt's oldest tokens were cut instead
