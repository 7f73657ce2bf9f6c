"""swift's chat template names (``--template qwen``, ``llama3``, ``deepseek_r1``...) as chat templates.

Each name is ms-swift 4.6's text template of that name, written down here as its parts (the text
before the first turn, the system part, a user turn with its assistant header, the separator after
an answer, the default system message and, for thinking models, how the answer starts): the same
prompt text swift renders. :func:`jinja` turns the parts into a chat template the tokenizer renders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from winnow.errors import ConfigError

BOS, EOS = "\x00bos\x00", "\x00eos\x00"  # the tokenizer's own bos/eos tokens, filled in by the template
NO_THINKING = "<think>\n\n</think>\n\n"  # what swift puts before a non-thinking answer of a thinking model


@dataclass(frozen=True)
class TemplateParts:
    """One swift template: ``{query}`` and ``{system}`` mark where the text goes."""

    prompt: str
    chat_sep: str = ""
    prefix: str = ""
    system_prefix: str | None = None
    default_system: str | None = None
    thinking: bool = False  # a thinking model: a non-thinking answer starts with NO_THINKING
    thinking_prefix: str = ""  # how a thinking answer starts; thinking is the default when there is one
    bos: bool = False  # the tokenizer's bos token comes first (swift's auto_add_bos)


# dict[str, Any]: each is spread into TemplateParts beside other keyword arguments
_CHATML: dict[str, Any] = dict(
    prompt="<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n",
    chat_sep="<|im_end|>\n",
    system_prefix="<|im_start|>system\n{system}<|im_end|>\n",
)
_LLAMA3: dict[str, Any] = dict(
    prompt="<|start_header_id|>user<|end_header_id|>\n\n{query}<|eot_id|><|start_header_id|>assistant"
    "<|end_header_id|>\n\n",
    chat_sep="<|eot_id|>",
    prefix="<|begin_of_text|>",
    system_prefix="<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
)
_DEEPSEEK3: dict[str, Any] = dict(
    prompt="<｜User｜>{query}<｜Assistant｜>",
    chat_sep="<｜end▁of▁sentence｜>",
    prefix="<｜begin▁of▁sentence｜>",
    system_prefix="<｜begin▁of▁sentence｜>{system}",
)
_LLAMA2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question does not make "
    "any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't "
    "know the answer to a question, please don't share false information."
)
_INTERNLM2_SYSTEM = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n- InternLM (书生·浦语) is a conversational language "
    "model that is developed by Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and "
    "harmless.\n- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user such "
    "as English and 中文."
)

TEMPLATES: dict[str, TemplateParts] = {
    "chatml": TemplateParts(**_CHATML, bos=True),
    "qwen": TemplateParts(**_CHATML, default_system="You are a helpful assistant."),
    "qwen2_5": TemplateParts(
        **_CHATML, default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    ),
    "qwen2_5_math": TemplateParts(
        **_CHATML, default_system="Please reason step by step, and put your final answer within \\boxed{}."
    ),
    "qwen3": TemplateParts(**_CHATML, thinking=True),
    "qwen3_thinking": TemplateParts(**_CHATML, thinking=True, thinking_prefix="<think>\n"),
    "qwen3_nothinking": TemplateParts(**_CHATML),
    "qwq": TemplateParts(**_CHATML, thinking=True, thinking_prefix="<think>\n"),
    "internlm2": TemplateParts(**_CHATML, default_system=_INTERNLM2_SYSTEM, bos=True),
    "llama": TemplateParts(
        prompt="{query} [/INST]",
        chat_sep="</s><s>[INST] ",
        prefix="<s>[INST] ",
        system_prefix="<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n",
        default_system=_LLAMA2_SYSTEM,
    ),
    "llama3": TemplateParts(**_LLAMA3),
    "deepseek": TemplateParts(
        prompt="User: {query}\n\nAssistant:", chat_sep=EOS, prefix=BOS, system_prefix=BOS + "{system}\n\n"
    ),
    "deepseek_v2_5": TemplateParts(**_DEEPSEEK3),
    "deepseek_r1": TemplateParts(**_DEEPSEEK3, thinking=True, thinking_prefix="<think>\n"),
    "default": TemplateParts(
        prompt="### Human:\n{query}\n\n### Assistant:\n",
        chat_sep="\n\n",
        system_prefix="{system}\n\n",
        default_system="You are a helpful assistant.",
        bos=True,
    ),
    "mistral_nemo": TemplateParts(prompt="{query}[/INST]", chat_sep="</s>[INST] ", prefix="<s>[INST] "),
    "glm4": TemplateParts(
        prompt="<|user|>\n{query}<|assistant|>\n",
        prefix="[gMASK]<sop>",
        system_prefix="[gMASK]<sop><|system|>\n{system}",
        bos=True,
    ),
    "gemma": TemplateParts(
        prompt="<start_of_turn>user\n{query}<end_of_turn>\n<start_of_turn>model\n",
        chat_sep="<end_of_turn>\n",
        prefix="<bos>",
        system_prefix="<bos><start_of_turn>system\n{system}<end_of_turn>\n",
    ),
    "phi3": TemplateParts(
        prompt="<|user|>\n{query}<|end|>\n<|assistant|>\n",
        chat_sep="<|end|>\n",
        system_prefix="<|system|>\n{system}<|end|>\n",
        bos=True,
    ),
    "dummy": TemplateParts(prompt="{query}", bos=True),
}


def _text(part: str, **holes: str) -> str:
    """A template part as Jinja: literal text, with the holes as expressions."""
    out = part.replace("{%", "{{ '{%' }}").replace("{{", "{{ '{{' }}").replace("{#", "{{ '{#' }}")
    out = out.replace(BOS, "{{ bos_token or '' }}").replace(EOS, "{{ eos_token or '' }}")
    for name, expr in holes.items():
        out = out.replace("{" + name + "}", "{{ " + expr + " }}")
    return out


def jinja(name: str) -> str:
    """The chat template of swift's template ``name``; an unknown name is an error naming the known ones."""
    parts = TEMPLATES.get(name)
    if parts is None:
        raise ConfigError(
            f"--template {name!r}: not a template winnow knows; known names: {', '.join(TEMPLATES)}; "
            "or give a Jinja chat template (a file or the text itself)"
        )
    default_system = "none" if parts.default_system is None else repr(parts.default_system)
    system_part = _text(parts.system_prefix, system="system") if parts.system_prefix is not None else None
    no_system = _text(parts.prefix)
    lines = [
        "{% set system = " + default_system + " %}",
        "{% set turns = messages %}",
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}{% endif %}",
        ("{{ bos_token or '' }}" if parts.bos else ""),
        ("{% if system is not none %}" + system_part + "{% else %}" + no_system + "{% endif %}")
        if system_part is not None
        else no_system,
        "{% for m in turns %}{% if m['role'] == 'assistant' %}{{ m['content'] }}"
        + _text(parts.chat_sep)
        + "{% else %}"
        + _text(parts.prompt, query="m['content']")
        + "{% endif %}{% endfor %}",
    ]
    if parts.thinking:
        default = "true" if parts.thinking_prefix else "false"
        lines.append(
            "{% if add_generation_prompt %}{% if (enable_thinking if enable_thinking is defined else "
            + default
            + ") %}"
            + _text(parts.thinking_prefix)
            + "{% else %}"
            + _text(NO_THINKING)
            + "{% endif %}{% endif %}"
        )
    # no whitespace control ({%- -%}): it would eat the newlines that end the literal parts
    return "".join(lines)


def resolve(template: str | None) -> str | None:
    """``--template``: a swift name, a file holding a Jinja template, or the Jinja text; None keeps the
    tokenizer's own template."""
    from pathlib import Path

    if not template:
        return None
    if "{" in template:
        return template
    path = Path(template).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    return jinja(template)
