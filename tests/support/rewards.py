"""A reward's input built from text."""

from __future__ import annotations

from winnow.rewards.base import Sample
from winnow.schema import Completion, Prompt


def sample(text: str, reference: str | None = "5", tokens: int = 0, **columns) -> Sample:
    prompt = Prompt(id="r", messages=[{"role": "user", "content": "q"}], reference=reference, columns=columns)
    return Sample(prompt, Completion(text=text, completion_tokens=tokens))
