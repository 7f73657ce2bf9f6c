"""The Engine protocol and the factory that builds one engine by name.

An engine turns prompts into exactly ``params.n`` completions each, in order. Failures are
values (``finish_reason="error"``), never exceptions that sink a batch. Backends import their
heavy libraries only when built.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol, runtime_checkable

from winnow.schema import Completion, Prompt, SamplingParams

# name -> "module:Class"; modules are imported only when that engine is asked for
ENGINE_CLASSES = {
    "transformers": "winnow.engines.transformers:TransformersEngine",
    "client": "winnow.engines.openai:OpenAIEngine",
    "vllm": "winnow.engines.vllm:VLLMEngine",
    "sglang": "winnow.engines.sglang:SGLangEngine",
    "lmdeploy": "winnow.engines.lmdeploy:LMDeployEngine",
}
ALIASES = {"pt": "transformers", "hf": "transformers", "openai": "client"}


@runtime_checkable
class Engine(Protocol):
    """What the pipeline needs of an inference backend."""

    name: str

    async def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """Exactly ``params.n`` completions for each prompt, aligned with ``prompts``."""
        ...

    def batch_plan(self, n: int) -> tuple[int, int]:
        """(prompts per ``generate`` call, calls in flight at once) that keep this engine busy."""
        ...

    def describe(self) -> dict[str, Any]:
        """The engine's name and arguments, for the run manifest (no secrets)."""
        ...

    async def aclose(self) -> None:
        """Release the backend."""
        ...


@runtime_checkable
class SummaryNote(Protocol):
    """An engine that adds one line to the run summary (a Ray engine: its replicas and their faults)."""

    def summary_note(self) -> str:
        """The line, without a newline."""
        ...


def get_engine(name: str, model: str, **kwargs: Any) -> Engine:
    """Build the engine called ``name`` (``pt`` is ``transformers``) for ``model``."""
    import importlib

    from winnow.errors import ConfigError

    key = ALIASES.get(name, name)
    if key not in ENGINE_CLASSES:
        raise ConfigError(f"unknown engine {name!r}; known: {', '.join(['pt', *ENGINE_CLASSES])}")
    module_name, _, cls_name = ENGINE_CLASSES[key].partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(model, **kwargs)


def generate_sync(engine: Engine, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
    """Blocking :meth:`Engine.generate`, for notebooks and scripts."""
    return asyncio.run(engine.generate(prompts, params))


def check_aligned(engine: Engine, prompts: list[Prompt], n: int, out: list[list[Completion]]) -> None:
    """An engine that breaks the n-per-prompt contract is a bug; say which engine."""
    from winnow.errors import EngineError

    if len(out) != len(prompts) or any(len(c) != n for c in out):
        shape = [len(c) for c in out]
        raise EngineError(f"engine {engine.name} returned {shape} completions for {len(prompts)} prompts x {n}")
