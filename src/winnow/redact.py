"""Keeping secrets off the disk: API keys, tokens, passwords and URL credentials are replaced by
``***`` in everything winnow writes or prints (the manifest's command and config, engine
descriptions, the failed-row log, error lines).

Two rules work together. By *name*: a value under a key or flag whose name says it is secret
(``api_key``, ``hub_token``, ``Authorization``, ``password``, ``x-api-key``...; ``max_tokens`` is
not) is replaced whole. By *value*: every secret found that way, every ``user:password@`` part of a
URL, the ``OPENAI_API_KEY``-style environment variables and bearer tokens are replaced wherever
they appear in free text (an error message that echoes a header, say).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from typing import Any

MASK = "***"
# words that make a name secret, matched against the parts of snake/kebab/camel-case names
SECRET_WORDS = {
    "apikey",
    "token",
    "secret",
    "password",
    "passwd",
    "pwd",
    "authorization",
    "auth",
    "credential",
    "credentials",
    "cookie",
    "bearer",
}
SECRET_ENV = (
    "OPENAI_API_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "MODELSCOPE_API_TOKEN",
    "WINNOW_REWARD_API_KEY",
    "ANTHROPIC_API_KEY",
    "DEEPSEEK_API_KEY",
)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s?#]+)@")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{6,}")
_MIN_SECRET = 4  # shorter values ("", "x", "EMPTY"-like placeholders) are not searched for in text


def is_secret_name(name: Any) -> bool:
    """Whether an option, header or field name says its value is secret (``api_key`` yes, ``max_tokens`` no)."""
    text = re.sub(r"([a-z])([A-Z])", r"\1_\2", str(name)).lower()
    parts = [part for part in re.split(r"[^a-z0-9]+", text) if part]
    # "key" alone names a dict key or a score's key; api_key, x-api-key, access_key name secrets
    return any(part in SECRET_WORDS for part in parts) or (len(parts) > 1 and parts[-1] in ("key", "keys"))


def redact_url(url: str) -> str:
    """A URL with any ``user:password@`` part masked."""
    return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", url)


def url_secrets(text: str) -> list[str]:
    """The ``user:password`` parts of the URLs in ``text``."""
    return [m["userinfo"] for m in _URL_USERINFO.finditer(text)]


class Redactor:
    """Masks known secret values and URL credentials in text, and secret-named fields in data."""

    def __init__(self, secrets: Iterable[str] = ()):
        found = {s for s in secrets if isinstance(s, str) and len(s) >= _MIN_SECRET}
        found |= {v for v in (os.environ.get(k) for k in SECRET_ENV) if v and len(v) >= _MIN_SECRET}
        for s in list(found):  # a password inside "user:password" is a secret on its own too
            if ":" in s:
                found |= {p for p in s.split(":", 1) if len(p) >= _MIN_SECRET}
        self.secrets = sorted(found, key=len, reverse=True)  # longest first: no partial leftovers

    @classmethod
    def for_values(cls, *values: Any) -> Redactor:
        """A redactor for the secrets held in ``values`` (configs, dicts, argv lists), by name or in URLs."""
        return cls(collect_secrets(values))

    def text(self, text: str) -> str:
        """``text`` with every known secret, URL credential and bearer token masked."""
        if not isinstance(text, str) or not text:
            return text
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", redact_url(text))

    def value(self, obj: Any) -> Any:
        """A JSON-like value with secret-named fields masked and secrets in strings masked."""
        if isinstance(obj, dict):
            return {
                k: (MASK if is_secret_name(k) and v not in (None, "", "none") else self.value(v))
                for k, v in obj.items()
            }
        if isinstance(obj, (list, tuple)):
            return [self.value(v) for v in obj]
        if isinstance(obj, str):
            return self.text(obj)
        return obj

    def argv(self, argv: Iterable[str]) -> list[str]:
        """A command line with the values of secret flags masked (and secrets inside JSON values)."""
        out: list[str] = []
        mask_next = False
        for arg in argv:
            arg = str(arg)
            if mask_next:
                out.append(MASK)
                mask_next = False
                continue
            if arg.startswith("--"):
                name, eq, value = arg[2:].partition("=")
                if is_secret_name(name):
                    if eq:
                        out.append(f"--{name}={MASK}")
                    else:
                        out.append(arg)
                        mask_next = True
                    continue
            out.append(self._json_text(arg))
        return out

    def _json_text(self, text: str) -> str:
        """A flag value: JSON objects have their secret fields masked; any other text is searched."""
        if text.startswith("{"):
            try:
                return json.dumps(self.value(json.loads(text)), ensure_ascii=False)
            except json.JSONDecodeError:
                pass
        return self.text(text)


def collect_secrets(values: Any) -> set[str]:
    """Secret values found in ``values``: under secret names, in URLs, in JSON flag values."""
    out: set[str] = set()

    def walk(obj: Any, secret: bool = False) -> None:
        if hasattr(obj, "__dataclass_fields__"):
            obj = {k: getattr(obj, k) for k in obj.__dataclass_fields__}
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, secret or is_secret_name(k))
        elif isinstance(obj, (list, tuple, set)):
            items = list(obj)
            for i, v in enumerate(items):
                flag_secret = (
                    i > 0
                    and isinstance(items[i - 1], str)
                    and items[i - 1].startswith("--")
                    and is_secret_name(items[i - 1][2:])
                )
                walk(v, secret or flag_secret)
        elif isinstance(obj, str):
            if secret:
                out.add(obj)
            out.update(url_secrets(obj))
            if obj.startswith("--") and "=" in obj and is_secret_name(obj[2:].partition("=")[0]):
                out.add(obj.partition("=")[2])
            if obj.startswith("{"):
                try:
                    walk(json.loads(obj))
                except json.JSONDecodeError:
                    pass

    walk(values)
    return {s for s in out if isinstance(s, str)}
