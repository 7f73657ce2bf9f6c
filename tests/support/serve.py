"""Requests to a real ``winnow serve``: the limits the limit tests set, raw HTTP, and starting a server."""

from __future__ import annotations

import json

import httpx

from tests.support.commands import Server

MAX_BYTES = 200_000

TIMEOUT_HEADERS = 1.5

TIMEOUT_BODY = 4.0  # long enough to hold --max_connections busy connections while a test looks

MAX_CONNECTIONS = 64

CHAT = [{"role": "user", "content": "What is 2 + 3?"}]

# the tiny model's ChatML template, plus Qwen3's switch: enable_thinking=false pre-fills an empty think block
THINKING_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def post(limited_server, route: str, body: dict | bytes, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()  # ASCII: lone surrogates escaped
    return httpx.post(
        f"{limited_server.url}/v1/{route}",
        content=content,
        timeout=timeout,
        headers={"Content-Type": "application/json"},
    )


def error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text[:500]
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


QUESTION = {"role": "user", "content": "What is 2 + 3?"}


def serve_model(tmp_path_factory, model, name):
    """``winnow serve`` of a reward model, started and healthy."""
    return Server(tmp_path_factory.mktemp("serve-rm") / f"{name}.log", "--model", str(model), "--max_wait_ms", "50")
