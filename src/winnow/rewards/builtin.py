"""Built-in rewards: math verification, format checks, length- and repetition-aware shaping, LLM judges.

Parameter names follow ms-swift's GRPO rewards (``cosine_max_len`` works as ``{"cosine": {"max_len": ...}}``
or as a flat ``--reward_kwargs '{"cosine_max_len": ...}'``).
"""

from __future__ import annotations

import math
import re
from typing import Any

from winnow.errors import RewardError
from winnow.rewards.base import Sample, completion_texts
from winnow.rewards.mathverify import MathVerifier
from winnow.schema import Prompt, SamplingParams, Score

_VERIFIERS: dict[tuple, MathVerifier] = {}


def shared_verifier(workers: int | None, timeout: float | None) -> MathVerifier:
    """One worker pool per (workers, timeout), shared by every math-based reward of a run."""
    key = (workers, timeout)
    if key not in _VERIFIERS:
        _VERIFIERS[key] = MathVerifier(workers=workers, timeout=timeout)
    return _VERIFIERS[key]


def close_verifiers() -> None:
    """Stop the verification worker pools."""
    while _VERIFIERS:
        _, v = _VERIFIERS.popitem()
        v.close()


def _length(sample_tokens: int, text: str) -> int:
    """Completion length in tokens; whitespace words when the engine gave no count (old caches)."""
    return sample_tokens if sample_tokens > 0 else len(text.split())


class MathReward:
    """Answer correctness with math-verify: 1 correct, 0 wrong, None when the reference cannot be parsed."""

    def __init__(self, workers: int | None = None, timeout: float | None = 5.0):
        self.name = "math"
        self.verifier = shared_verifier(workers, timeout)

    def describe(self) -> dict[str, Any]:
        return {"args": self.verifier.describe()}

    async def score(self, samples: list[Sample]) -> list[Score]:
        results = await self.verifier.verify([(s.text, s.prompt.reference) for s in samples])
        return [Score(value=v, info={"verdict": why}) for v, why in results]


def format_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """1 when the completion is exactly <think>...</think> then <answer>...</answer>, else 0."""
    pattern = re.compile(r"^<think>.*?</think>\s*<answer>.*?</answer>(?![\s\S])", re.DOTALL)
    return [1.0 if pattern.match(c.strip()) else 0.0 for c in completion_texts(completions)]


def react_format_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """1 when the completion is <think>...</think> then 'Action: ...' and 'Action Input: ...', else 0."""
    pattern = re.compile(r"^<think>.*?</think>\s*Action:.*?Action Input:.*?$", re.DOTALL)
    return [1.0 if pattern.match(c.strip()) else 0.0 for c in completion_texts(completions)]


class CosineReward:
    """Length-aware correctness: short correct answers score most, short wrong ones are punished most."""

    def __init__(
        self,
        min_len_value_wrong: float = -0.5,
        max_len_value_wrong: float = 0.0,
        min_len_value_correct: float = 1.0,
        max_len_value_correct: float = 0.5,
        max_len: int = 1000,
        workers: int | None = None,
        timeout: float | None = 5.0,
    ):
        self.name = "cosine"
        self.args = dict(
            min_len_value_wrong=min_len_value_wrong,
            max_len_value_wrong=max_len_value_wrong,
            min_len_value_correct=min_len_value_correct,
            max_len_value_correct=max_len_value_correct,
            max_len=max_len,
        )
        if max_len <= 0:
            raise RewardError("reward cosine: max_len must be positive")
        self.verifier = shared_verifier(workers, timeout)

    def describe(self) -> dict[str, Any]:
        return {"args": self.args}

    @staticmethod
    def cosfn(t: float, big_t: float, min_value: float, max_value: float) -> float:
        """From ``max_value`` at length 0 to ``min_value`` at length ``big_t``, along a half cosine."""
        return max_value - (max_value - min_value) * (1 - math.cos(t * math.pi / big_t)) / 2

    async def score(self, samples: list[Sample]) -> list[Score]:
        a = self.args
        results = await self.verifier.verify([(s.text, s.prompt.reference) for s in samples])
        out = []
        for s, (correct, _) in zip(samples, results, strict=True):
            if correct is None:
                out.append(Score(value=None))
                continue
            if correct > 0:
                lo, hi = a["max_len_value_correct"], a["min_len_value_correct"]
            else:
                lo, hi = a["max_len_value_wrong"], a["min_len_value_wrong"]
            n = min(_length(s.completion.completion_tokens, s.text), a["max_len"])
            out.append(Score(value=self.cosfn(n, a["max_len"], lo, hi)))
        return out


def repetition_reward(
    completions: list[Any], n_grams: int = 3, max_penalty: float = -1.0, **kwargs: Any
) -> list[float]:
    """Penalty for repeated word n-grams: 0 for none repeated, down to max_penalty (default -1)."""
    out = []
    for text in completion_texts(completions):
        words = text.lower().split()
        if len(words) < n_grams:
            out.append(0.0)
            continue
        grams = [tuple(words[i : i + n_grams]) for i in range(len(words) - n_grams + 1)]
        out.append((1 - len(set(grams)) / len(grams)) * max_penalty)
    return out


def soft_overlong_reward(
    completions: list[Any],
    soft_max_length: int,
    soft_cache_length: int,
    completion_tokens: list[int] | None = None,
    **kwargs: Any,
) -> list[float]:
    """DAPO's soft overlong penalty: 0 up to soft_max_length - soft_cache_length tokens, then down to -1."""
    if soft_cache_length <= 0 or soft_cache_length > soft_max_length:
        raise RewardError("reward soft_overlong: need 0 < soft_cache_length <= soft_max_length")
    lengths = completion_tokens or [0] * len(completions)
    expected = soft_max_length - soft_cache_length
    return [
        min(-(_length(n, c) - expected) / soft_cache_length, 0.0)
        for c, n in zip(completion_texts(completions), lengths, strict=True)
    ]


JUDGE_TEMPLATE = (
    "You are grading an answer to a question.\n\nQuestion:\n{question}\n\n"
    "{reference_block}Answer to grade:\n{response}\n\n"
    "Judge its correctness and quality. End your reply with one line 'Reward: x', where x is a number "
    "between -1 (wrong or useless) and 1 (correct and helpful)."
)
JUDGE_PATTERN = r"Reward:\s*\**\s*([-+]?\d+(?:\.\d+)?)"


class JudgeReward:
    """A generative judge: any winnow engine prompted with a template, its 'Reward: x' parsed (None if absent)."""

    def __init__(
        self,
        model: str | None = None,
        engine: str = "client",
        template: str = JUDGE_TEMPLATE,
        pattern: str = JUDGE_PATTERN,
        min_value: float = -1.0,
        max_value: float = 1.0,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        engine_kwargs: dict | None = None,
    ):
        from winnow.engines import get_engine

        if not model:
            raise RewardError(
                'reward judge needs a model: --reward_kwargs \'{"judge": {"model": "...", "engine": "client"}}\''
            )
        self.name = "judge"
        self.template = template
        self.pattern = re.compile(pattern)
        self.bounds = (min_value, max_value)
        self.params = SamplingParams(n=1, max_new_tokens=max_new_tokens, temperature=temperature)
        self.args = {
            "model": model,
            "engine": engine,
            "pattern": pattern,
            "min_value": min_value,
            "max_value": max_value,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
        }
        self.engine = get_engine(engine, model, **(engine_kwargs or {}))

    def describe(self) -> dict[str, Any]:
        return {"args": self.args, "engine": self.engine.describe()}

    def parse(self, text: str) -> float | None:
        """The last number the pattern finds, if within bounds; otherwise None (never 0)."""
        found = self.pattern.findall(text or "")
        if not found:
            return None
        try:
            value = float(found[-1] if isinstance(found[-1], str) else found[-1][0])
        except ValueError:
            return None
        lo, hi = self.bounds
        return value if lo <= value <= hi else None

    def _prompt(self, s: Sample, i: int) -> Prompt:
        question = next((m["content"] for m in reversed(s.prompt.messages) if m["role"] == "user"), "")
        ref = s.prompt.reference
        text = self.template.format(
            question=question,
            response=s.text,
            reference=ref or "",
            reference_block=f"Reference answer:\n{ref}\n\n" if ref else "",
        )
        return Prompt(id=f"judge-{s.prompt.id}-{i}", messages=[{"role": "user", "content": text}])

    async def score(self, samples: list[Sample]) -> list[Score]:
        if not samples:
            return []
        out = await self.engine.generate([self._prompt(s, i) for i, s in enumerate(samples)], self.params)
        scores = []
        for (c,) in out:
            scores.append(Score(value=None if c.failed else self.parse(c.text), info={"judge": c.text[-500:]}))
        return scores

    async def aclose(self) -> None:
        await self.engine.aclose()


class JsonSchemaReward:
    """1 when the completion is JSON matching the schema (``schema``: a file, inline JSON or file.py:Model;
    default: the run's --response_format), else 0."""

    def __init__(self, schema: str | dict | None = None):
        from winnow.errors import ConfigError
        from winnow.structured import SchemaCheck, load_response_format, schema_of

        if schema is None:
            raise ConfigError(
                "reward json_schema needs a schema: set --response_format, or "
                '--reward_kwargs \'{"json_schema": {"schema": "schema.json"}}\''
            )
        self.name = "json_schema"
        self.spec = schema
        self.check = SchemaCheck(schema_of(load_response_format(schema)) or {})

    def describe(self) -> dict[str, Any]:
        return {"args": {"schema": self.spec}}

    async def score(self, samples: list[Sample]) -> list[Score]:
        out = []
        for s in samples:
            error = self.check.error(s.text)
            out.append(Score(value=0.0 if error else 1.0, info={"error": error} if error else None))
        return out
