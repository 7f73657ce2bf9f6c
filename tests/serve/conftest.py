"""The server tests' fixtures: one ``winnow serve`` with small limits for the module."""

from __future__ import annotations

import signal

import pytest

from tests.support.commands import Server
from tests.support.serve import (
    MAX_BYTES,
    MAX_CONNECTIONS,
    THINKING_TEMPLATE,
    TIMEOUT_BODY,
    TIMEOUT_HEADERS,
)


@pytest.fixture(scope="module")
def limited_server(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-limits")
    template = folder / "thinking.jinja"
    template.write_text(THINKING_TEMPLATE)
    srv = Server(
        folder / "server.log",
        "--model",
        str(tiny_model),
        "--served_model_name",
        "tiny",
        "--max_new_tokens",
        "4",
        "--max_wait_ms",
        "50",
        "--template",
        str(template),
        "--max_request_bytes",
        str(MAX_BYTES),
        "--max_stop",
        "4",
        "--max_stop_chars",
        "32",
        "--max_messages",
        "8",
        "--max_prompts",
        "4",
        "--max_connections",
        str(MAX_CONNECTIONS),
        "--timeout_headers",
        str(TIMEOUT_HEADERS),
        "--timeout_body",
        str(TIMEOUT_BODY),
    )
    yield srv
    assert srv.stop(signal.SIGTERM) == 0, srv.output()[-2000:]
