"""Structured output: ``--response_format`` read once, sent to engines, and every answer checked against it.

``--response_format`` takes a JSON schema (a file, or inline JSON), OpenAI's whole ``response_format``
object (``{"type": "json_schema", "json_schema": {...}}`` or ``{"type": "json_object"}``), or a pydantic
model in a Python file (``models.py:Answer``). Whatever the form, it becomes OpenAI's shape, which is
what the client and batch engines send, what ``winnow serve`` accepts, and what the local engines turn
into constrained decoding::

    {"type": "json_schema", "json_schema": {"name": "Answer", "schema": {...}, "strict": true}}

An answer that is not valid JSON, or does not match the schema, is a failed sample whose error says why
(:func:`check`). Nothing heavy is imported here; jsonschema only when a schema is checked.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from winnow.errors import ConfigError, require

_NAME = re.compile(r"[^a-zA-Z0-9_-]")


def load_response_format(spec: str | dict) -> dict[str, Any]:
    """OpenAI's ``response_format`` object for a ``--response_format`` value (see the module doc)."""
    if isinstance(spec, dict):
        return _normalise(spec, "--response_format")
    text = str(spec).strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"--response_format: not valid JSON ({e.msg} at character {e.pos}); give a JSON "
                "schema, a file holding one, or file.py:Model"
            ) from None
        return _normalise(value, "--response_format")
    path, sep, attr = text.rpartition(":")
    if sep and path.endswith(".py"):
        return _from_pydantic(Path(path).expanduser(), attr)
    file = Path(text).expanduser()
    if not file.is_file():
        raise ConfigError(
            f"--response_format {text}: no such file; give a JSON schema file, inline JSON, or file.py:Model"
        )
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--response_format {text}: not a JSON file ({e})") from None
    return _normalise(value, f"--response_format {text}", default_name=file.stem)


def _normalise(value: Any, where: str, default_name: str = "response") -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(
            f"{where}: expected a JSON object (a JSON schema or a response_format), got {type(value).__name__}"
        )
    kind = value.get("type")
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema" and isinstance(value.get("json_schema"), dict):
        inner = dict(value["json_schema"])
        if not isinstance(inner.get("schema"), dict):
            raise ConfigError(f"{where}: json_schema.schema must be a JSON schema object")
        inner.setdefault("name", default_name)
        inner.setdefault("strict", True)
        _check_schema(inner["schema"], where)
        return {"type": "json_schema", "json_schema": inner}
    _check_schema(value, where)
    name = _NAME.sub("_", str(value.get("title") or default_name))[:64]
    return {"type": "json_schema", "json_schema": {"name": name, "schema": value, "strict": True}}


def _check_schema(schema: dict, where: str) -> None:
    jsonschema = require("jsonschema", "structured", "--response_format")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ConfigError(f"{where}: not a valid JSON schema: {e.message}") from None


def _from_pydantic(file: Path, attr: str) -> dict[str, Any]:
    where = f"--response_format {file}:{attr}"
    if not file.is_file():
        raise ConfigError(f"{where}: no such file")
    spec = importlib.util.spec_from_file_location(f"winnow_format_{abs(hash(str(file.resolve())))}", file)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{where}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"{where}: importing it failed: {type(e).__name__}: {e}") from None
    model = getattr(module, attr, None)
    if model is None or not hasattr(model, "model_json_schema"):
        raise ConfigError(f"{where}: {file.name} has no pydantic model named {attr!r}")
    return _normalise(_strict(model.model_json_schema()), where, default_name=attr)


def _strict(schema: Any) -> Any:
    """A pydantic model's schema in OpenAI's strict form, as the openai SDK's ``parse`` sends it: every
    object closed (``additionalProperties: false``) with all its properties required. (An open object
    also lets a model under constrained decoding invent keys until the token limit.)"""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if out.get("type") == "object" and isinstance(out.get("properties"), dict):
        out.setdefault("additionalProperties", False)
        out["required"] = list(out["properties"])
    return out


def schema_of(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema answers must match (``{"type": "object"}`` for json_object; None: no constraint)."""
    if not response_format:
        return None
    if response_format.get("type") == "json_object":
        return {"type": "object"}
    if response_format.get("type") == "json_schema":
        return (response_format.get("json_schema") or {}).get("schema")
    return None


class SchemaCheck:
    """Checks answer texts against one schema (the validator is built once)."""

    def __init__(self, schema: dict[str, Any]):
        jsonschema = require("jsonschema", "structured", "checking answers against --response_format")
        self.schema = schema
        self.validator = jsonschema.validators.validator_for(schema)(schema)

    def error(self, text: str) -> str | None:
        """Why ``text`` is not a valid answer (not JSON, or not matching the schema); None if it is."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            return f"invalid JSON: {e.msg} at character {e.pos}"
        except ValueError as e:  # not a JSONDecodeError: e.g. an integer past Python's digit limit
            return f"invalid JSON: {e}"[:500]
        problem = next(iter(sorted(self.validator.iter_errors(value), key=lambda e: list(e.path))), None)
        if problem is None:
            return None
        at = "/".join(str(p) for p in problem.absolute_path)
        return f"does not match the schema{f' at {at}' if at else ''}: {problem.message}"[:500]


def check(groups: list, schema_check: SchemaCheck) -> int:
    """Fail every usable completion in ``groups`` whose text does not match the schema; returns how many failed."""
    failed = 0
    for group in groups:
        for c in group.completions:
            if c.failed:
                continue
            reason = schema_check.error(c.text)
            if reason is not None:
                c.error = f"response_format: {reason}"
                failed += 1
    return failed
