"""Strategies: how a batch of prompts becomes groups of completions.

A strategy sits between the data and selection: it asks the engine for completions (or, for search
strategies, for next steps of partial answers), may ask the run's rewards for scores on the way, and
ends in ordinary groups, so selection, formats, resume and the store are the same for every
strategy. Strategies are registered by name (``--sampler_type NAME``; ``winnow list strategies``) and
a plugin file can add its own with :func:`winnow.registry.strategy`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from winnow.engines import Engine, check_aligned
from winnow.schema import Group, Prompt, SamplingParams


@dataclass
class SearchContext:
    """What a strategy works with: the run's engine and sampling settings, its scorer (None without
    rewards), its options, and counters of the compute it spent (written per group and in the manifest)."""

    engine: Engine
    params: SamplingParams
    scorer: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)

    def count(self, name: str, value: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + value


@runtime_checkable
class Strategy(Protocol):
    """Turns prompts into one group each (their completions aligned with ``ctx.params.n`` or the strategy's
    own budget)."""

    name: str

    async def run(self, prompts: list[Prompt], ctx: SearchContext) -> list[Group]: ...

    def describe(self) -> dict[str, Any]: ...


class BestOfN:
    """N independent samples per prompt, in one engine call for the batch (swift's sample and distill)."""

    name = "sample"

    def __init__(self, **options: Any):
        self.options = options

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.options}

    async def run(self, prompts: list[Prompt], ctx: SearchContext) -> list[Group]:
        out = await ctx.engine.generate(prompts, ctx.params)
        check_aligned(ctx.engine, prompts, ctx.params.n, out)
        ctx.count("engine_calls")
        return [Group(p, cs) for p, cs in zip(prompts, out, strict=True)]
