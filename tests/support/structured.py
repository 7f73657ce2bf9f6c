"""The schema and pydantic model the structured-output tests use."""

from __future__ import annotations

# bounded fields: a tiny random model under constraint must still end its answer within the token limit
SCHEMA = {
    "title": "Answer",
    "type": "object",
    "properties": {
        "answer": {"type": "integer", "minimum": 0, "maximum": 999},
        "confidence": {"enum": ["low", "high"]},
        "note": {"type": "string", "maxLength": 12},
    },
    "required": ["answer", "confidence", "note"],
    "additionalProperties": False,
}

PYDANTIC_PLUGIN = """
from typing import Literal
from pydantic import BaseModel, Field

class Answer(BaseModel):
    answer: int = Field(ge=0, le=999)
    confidence: Literal["low", "high"]
    note: str = Field(max_length=12)
"""
