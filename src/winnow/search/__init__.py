"""Strategies: how a batch of prompts becomes groups of completions.

A strategy sits between the data and selection: it asks the engine for completions (or, for search
strategies, for next steps of partial answers), may ask the run's rewards for scores on the way, and
ends in ordinary groups, so selection, formats, resume and the store are the same for every
strategy. Strategies are registered by name (``--sampler_type NAME``; ``winnow list strategies``) and
a plugin file can add its own with :func:`winnow.registry.strategy`.

The contract is small: a class built with the run's search options as keyword arguments (the
``# --- search`` block of :class:`winnow.config.SampleConfig`, ``n`` = ``--num_return_sequences``, and
``--search_kwargs``; it keeps what it knows and ignores the rest), with a ``name``, ``describe()`` for
the manifest, and ``async run(prompts, ctx) -> list[Group]``, one group per prompt, in order. The
built-in searches are :mod:`winnow.search.beam` (beam search, DVTS) and :mod:`winnow.search.mcts`.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from winnow.engines import Engine, check_aligned
from winnow.schema import Group, Prompt, SamplingParams

# the SampleConfig fields a strategy is built with (besides n and --search_kwargs)
OPTION_FIELDS = (
    "search_width",
    "search_max_steps",
    "step_separator",
    "search_lookahead",
    "search_prm_agg",
    "search_filter_duplicates",
    "mcts_iterations",
    "mcts_exploration",
    "mcts_rollout_depth",
)


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


@runtime_checkable
class SizesBatches(Protocol):
    """Keeps a known number of sequences of each prompt alive at once (the run sizes its batches by it, so
    that one engine call holds the live steps of many prompts)."""

    def sequences_per_prompt(self) -> int: ...


class BestOfN:
    """N independent samples per prompt, in one engine call for the batch (swift's sample and distill)."""

    name = "sample"

    def __init__(self, **options: Any):
        self.options: dict[str, Any] = {}  # sampling has no search options: they are not its to record

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.options}

    async def run(self, prompts: list[Prompt], ctx: SearchContext) -> list[Group]:
        out = await ctx.engine.generate(prompts, ctx.params)
        check_aligned(ctx.engine, prompts, ctx.params.n, out)
        ctx.count("engine_calls")
        return [Group(p, cs) for p, cs in zip(prompts, out, strict=True)]


def decode_escapes(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` typed on a command line as the characters they name."""
    out, i = [], 0
    while i < len(text):
        pair = text[i : i + 2]
        if pair in ("\\n", "\\t", "\\\\"):
            out.append({"\\n": "\n", "\\t": "\t", "\\\\": "\\"}[pair])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def strategy_options(config: Any) -> dict[str, Any]:
    """The keyword arguments a run's strategy is built with: its search options, ``n`` and --search_kwargs."""
    options: dict[str, Any] = {name: getattr(config, name) for name in OPTION_FIELDS}
    if options["step_separator"] is not None:
        options["step_separator"] = decode_escapes(options["step_separator"])
    return {**options, "n": config.num_return_sequences, **dict(config.search_kwargs or {})}


def build_strategy(config: Any) -> Strategy:
    """The strategy ``--sampler_type`` names, built with the run's search options (a strategy that does not
    take ``**options`` gets only the ones it names)."""
    from winnow.registry import REGISTRY

    cls = REGISTRY.resolve(
        "strategy",
        config.sampler_type,
        "Or load one with --external_plugins FILE (docs/search.md, 'Your own strategy').",
    )
    options = strategy_options(config)
    params: Collection[inspect.Parameter]
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        params = []
    if params and not any(p.kind == p.VAR_KEYWORD for p in params):
        options = {k: v for k, v in options.items() if k in {p.name for p in params}}
    return cls(**options)
