"""swift's template names (templates.py) render what swift renders."""

from __future__ import annotations

import json

import pytest

from tests.support import DATA
from winnow.errors import ConfigError


def test_swift_template_names_render_what_swift_renders():
    """tests/data/swift_templates_4.6.json: prompts ms-swift 4.6.0 rendered (swift.template.get_template(...)
    .encode, decoded) for a 3-turn conversation, with and without a system message."""
    from transformers import AutoTokenizer

    from winnow import templates
    from winnow.demo import ASSETS

    tok = AutoTokenizer.from_pretrained(str(ASSETS / "demo-policy"))
    expected = json.loads((DATA / "swift_templates_4.6.json").read_text())
    turns = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
    ]
    for key, want in expected.items():
        name, system = key.split("|")
        messages = ([{"role": "system", "content": system}] if system != "None" else []) + turns
        got = tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, chat_template=templates.jinja(name)
        )
        assert got == want, key
    with pytest.raises(ConfigError, match="not a template winnow knows; known names: chatml, qwen"):
        templates.jinja("qwen9")
