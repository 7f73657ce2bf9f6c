"""The Engine protocol and the factory that builds one engine by name.

An engine turns prompts into exactly ``params.n`` completions each, in order. Failures are
values (``finish_reason="error"``), never exceptions that sink a batch. Backends import their
heavy libraries only when built.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from winnow.schema import Completion, Prompt, SamplingParams


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


# ----------------------------------------------------------------------------- optional abilities
# Small declared protocols, checked with isinstance by the pipeline and the server.


@runtime_checkable
class Interruptible(Protocol):
    """Can stop starting new work at once when the run is interrupted (the client engine)."""

    def interrupt(self) -> None: ...


@runtime_checkable
class ReportsStats(Protocol):
    """Has counters for the manifest (requests, retries, failures by kind...)."""

    def stats(self) -> dict[str, Any]: ...


@runtime_checkable
class ReportsProgress(Protocol):
    """Adds fields to the progress bar (requests/s, replicas alive...)."""

    def progress_fields(self) -> dict[str, str]: ...


@runtime_checkable
class HasGenerationDefaults(Protocol):
    """Knows the model's own sampling settings (its generation_config.json), for options a run leaves unset."""

    def generation_defaults(self) -> dict[str, Any]: ...


@runtime_checkable
class AcceptsTokenIds(Protocol):
    """Runs prompts given as token ids, no chat template applied (the server's /v1/completions)."""

    def generate_ids_blocking(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]: ...


@runtime_checkable
class Reseedable(Protocol):
    """Can make its next call reproducible from a seed (a server request's ``seed``)."""

    def reseed(self, seed: int) -> None: ...


@runtime_checkable
class StreamsTokens(Protocol):
    """Streams one answer as it is generated: ``on_text`` gets each new piece of text (stop strings held
    back until they are ruled out); returns the finished completion."""

    def stream_ids_blocking(
        self, prompt: list[int], params: SamplingParams, on_text: Callable[[str], None]
    ) -> Completion: ...


@runtime_checkable
class KeepsState(Protocol):
    """An engine with durable state of its own, kept beside the run's output (the batch engine's log of
    the batches it submitted, which a resumed run re-attaches to)."""

    def keep_state(self, output_path: Path, resume: bool) -> None:
        """Keep the state beside ``output_path``; unless ``resume``, start it afresh."""
        ...


@runtime_checkable
class SummaryNote(Protocol):
    """Adds one line to the run summary (a Ray engine: its replicas and what happened to them)."""

    def summary_note(self) -> str: ...


def get_engine(name: str, model: str, **kwargs: Any) -> Engine:
    """Build the engine called ``name`` (``pt`` is ``transformers``) for ``model``."""
    from winnow.registry import REGISTRY

    cls = REGISTRY.resolve("engine", name)
    return cls(model, **kwargs)


def engine_name(name: str) -> str:
    """The registered name behind an engine alias (``pt`` -> ``transformers``)."""
    from winnow.registry import REGISTRY

    return REGISTRY.canonical("engine", name)


def generate_sync(engine: Engine, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
    """Blocking :meth:`Engine.generate`, for notebooks and scripts."""
    return asyncio.run(engine.generate(prompts, params))


def check_aligned(engine: Engine, prompts: list[Prompt], n: int, out: list[list[Completion]]) -> None:
    """An engine that breaks the n-per-prompt contract is a bug; say which engine."""
    from winnow.errors import EngineError

    if len(out) != len(prompts) or any(len(c) != n for c in out):
        shape = [len(c) for c in out]
        raise EngineError(f"engine {engine.name} returned {shape} completions for {len(prompts)} prompts x {n}")
