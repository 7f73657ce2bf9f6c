"""Secrets (redact.py): no key reaches the disk or the terminal."""

from __future__ import annotations

import json

from tests.support.client import SECRET, client_args, sums
from tests.support.commands import run_winnow
from tests.support.files import files_text


def test_no_secret_reaches_the_disk_or_the_terminal(tmp_path, fake_server):
    dataset = sums(tmp_path, 4)
    out = tmp_path / "out"
    header_secret, token = "hdr-SECRET-9999", "hf_tok_SECRET_7777"
    args = client_args(fake_server, out, dataset, headers={"Authorization": f"Bearer {header_secret}"}, hub_token=token)
    proc = run_winnow(*args, env={"OPENAI_API_KEY": "sk-env-SECRET-1234"})
    assert proc.returncode == 0, proc.stderr
    text = files_text(out) + proc.stdout + proc.stderr
    for secret in (SECRET, header_secret, token, "sk-env-SECRET-1234"):
        assert secret not in text
    manifest = json.loads((out / "o.manifest.json").read_text())
    assert manifest["config"]["engine_kwargs"]["api_key"] == "***"
    assert manifest["config"]["engine_kwargs"]["base_url"] == fake_server.url  # not a secret: kept
    assert "***" in " ".join(manifest["command"])
