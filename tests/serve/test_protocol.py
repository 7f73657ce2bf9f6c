"""Request validation (serve/protocol.py): lists over their limit, bad input as a 400 naming the parameter,
edge values, and fields that would change the answer refused.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.support.serve import (
    CHAT,
    error,
    post,
)


@pytest.mark.parametrize(
    "route, body, param, code, flag",
    [
        (
            "chat/completions",
            {"messages": CHAT, "stop": [f"s{i}" for i in range(10_000)]},
            "stop",
            "array_above_max_length",
            "--max_stop",
        ),
        (
            "chat/completions",
            {"messages": CHAT, "stop": ["ok", "x" * 33]},
            "stop[1]",
            "string_above_max_length",
            "--max_stop_chars",
        ),
        ("completions", {"prompt": "a", "stop": "x" * 33}, "stop", "string_above_max_length", "--max_stop_chars"),
        ("chat/completions", {"messages": CHAT * 9}, "messages", "array_above_max_length", "--max_messages"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 9}]},
            "messages[0].content",
            "array_above_max_length",
            "--max_messages",
        ),
        ("completions", {"prompt": ["a"] * 5}, "prompt", "array_above_max_length", "--max_prompts"),
        ("completions", {"prompt": [[1, 2]] * 5}, "prompt", "array_above_max_length", "--max_prompts"),
    ],
)
def test_lists_over_their_limit_are_400_naming_the_parameter(limited_server, route, body, param, code, flag):
    start = time.monotonic()
    err = error(post(limited_server, route, body), 400)
    assert (err["param"], err["code"]) == (param, code) and flag in err["message"], err
    assert time.monotonic() - start < 10  # refused, not run (10,000 stop strings held the model for minutes)


@pytest.mark.parametrize(
    "route, body, param",
    [
        ("chat/completions", {"messages": CHAT, "seed": 2**64}, "seed"),
        ("chat/completions", {"messages": CHAT, "seed": -(2**63) - 1}, "seed"),
        ("chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]},
            "messages[0].content[0].text",
        ),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi", "name": "\ud800"}]}, "messages[0].name"),
        ("chat/completions", {"messages": CHAT, "stop": ["\ud800"]}, "stop[0]"),
        ("chat/completions", {"messages": CHAT, "model": "\ud800"}, "model"),
        ("chat/completions", {"messages": CHAT, "chat_template_kwargs": {"x": ["\ud800"]}}, "chat_template_kwargs"),
        ("completions", {"prompt": ["ok", "\ud800"]}, "prompt[1]"),
        ("chat/completions", {"messages": CHAT, "repetition_penalty": 1e-308}, "repetition_penalty"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages[0].content[0].text",
        ),
    ],
)
def test_bad_input_is_400_naming_the_parameter_not_500(limited_server, route, body, param):
    err = error(post(limited_server, route, body), 400)
    assert err["param"] == param, err
    if "\\ud" in json.dumps(body):
        assert "surrogate" in err["message"]


def test_edge_values_are_served(limited_server):
    for extra in (
        {"seed": 2**64 - 1},
        {"seed": -(2**63)},
        {"temperature": 1e-300},
        {"top_k": 10**30},
        {"stop": ["", ""]},
        {"n": 2, "stream": True},
    ):
        resp = post(limited_server, "chat/completions", {"messages": CHAT, "max_tokens": 2, **extra})
        assert resp.status_code == 200, (extra, resp.text[:300])


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"min_tokens": 5}, "min_tokens"),
        ({"ignore_eos": True}, "ignore_eos"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"guided_json": {"type": "object"}}, "guided_json"),
        ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs.add_generation_prompt"),
    ],
)
def test_fields_that_would_change_the_answer_are_refused(limited_server, extra, param):
    err = error(post(limited_server, "chat/completions", {"messages": CHAT, "max_tokens": 2, **extra}), 400)
    assert err["param"] == param, err
    harmless = {"ignore_eos": False, "min_tokens": 0, "skip_special_tokens": True, "store": True, "metadata": {}}
    assert post(limited_server, "chat/completions", {"messages": CHAT, "max_tokens": 2, **harmless}).status_code == 200
