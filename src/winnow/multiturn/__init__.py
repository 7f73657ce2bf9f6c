"""Multi-turn sampling: each of the N samples of a prompt is a trajectory, driven turn by turn by a scheduler.

Between two model turns the scheduler reads the trajectory (the conversation so far, the model's last
reply) and says whether it is finished, or what comes next: tool results, an environment's
observation. The driver (:class:`winnow.multiturn.driver.MultiTurn`) puts the next turn of every live
trajectory of the run into shared engine calls and ends in ordinary groups, so rewards, selection,
formats, resume and the store work unchanged.

winnow's own contract is small and async: a scheduler has ``async step(trajectory) -> TurnResult``,
and may have ``async start(trajectory)`` (before the first turn: an environment's reset, the tools to
offer) and ``async end(trajectory)`` (after the last: closing an environment). A plain ``async def
step(trajectory)`` registered with :func:`winnow.registry.scheduler` is a scheduler too. Built-ins:
``tools`` (:mod:`winnow.multiturn.tools`), ``gym`` (:mod:`winnow.multiturn.env`); ms-swift's
``MultiTurnScheduler`` subclasses are adapted by :mod:`winnow.multiturn.swift`.

This module holds the contract only and imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from winnow.schema import Completion, Message, Prompt

__all__ = [
    "Closeable",
    "Describes",
    "EndsTrajectories",
    "HasStopWords",
    "Scheduler",
    "StartsTrajectories",
    "Trajectory",
    "TurnResult",
]

# why a trajectory ended (its trace says)
STOP_DONE = "done"  # the scheduler said it is finished
STOP_MAX_TURNS = "max_turns"  # --max_turns reached before the scheduler said so
STOP_FAILED = "failed"  # a model turn failed (the engine's error, or a prompt grown past the context)


@dataclass
class Trajectory:
    """One sample of a prompt, turn by turn: what a scheduler reads and extends.

    ``messages`` is the whole conversation so far (the prompt, then every turn); the driver appends the
    model's reply before it calls :meth:`Scheduler.step`, and sends ``messages`` as the next request.
    When it ends with an assistant message, the model continues that message (a tool result written
    into the answer, as code interpreters do) instead of starting a new one.
    """

    prompt: Prompt
    sample: int  # which of the prompt's N samples (0-based)
    messages: list[Message]
    tools: list[dict[str, Any]] | None
    max_turns: int
    turn: int = 0  # model turns so far
    replies: list[Completion] = field(default_factory=list)  # every model reply, in order
    infos: list[dict[str, Any]] = field(default_factory=list)  # what the scheduler said of each turn
    rollout_infos: dict[str, Any] = field(default_factory=dict)  # merged, as ms-swift keeps them
    state: dict[str, Any] = field(default_factory=dict)  # the scheduler's own, per trajectory
    stop_reason: str | None = None

    @property
    def id(self) -> str:
        """The prompt's id and the sample's number: ``row-7#2``."""
        return f"{self.prompt.id}#{self.sample}"

    @property
    def reply(self) -> Completion:
        """The model's last reply."""
        return self.replies[-1]

    @property
    def last_turn(self) -> bool:
        """Whether the turn just taken is the last one allowed (--max_turns): what a step appends is not sent."""
        return self.turn >= self.max_turns

    def request(self) -> Prompt:
        """The next request: the conversation so far, continuing a trailing assistant message."""
        messages, prefix = self.messages, None
        if messages and messages[-1].get("role") == "assistant":
            messages, prefix = messages[:-1], messages[-1].get("content") or ""
        # a plain copy of the list: the trajectory waits for the reply, so nothing changes the messages meanwhile
        return dataclasses.replace(self.prompt, messages=list(messages), prefix=prefix or None, tools=self.tools)


@dataclass
class TurnResult:
    """What a scheduler says after a turn: finished, or the messages that come next, and what to record."""

    done: bool = False
    messages: list[Message] = field(default_factory=list)  # appended before the next turn (ignored when done)
    info: dict[str, Any] = field(default_factory=dict)  # kept in the trajectory's trace, per turn


@runtime_checkable
class Scheduler(Protocol):
    """Decides, after each model turn, whether a trajectory is finished and what comes next."""

    async def step(self, trajectory: Trajectory) -> TurnResult: ...


@runtime_checkable
class StartsTrajectories(Protocol):
    """Prepares a trajectory before its first turn (may change its messages and tools)."""

    async def start(self, trajectory: Trajectory) -> None: ...


@runtime_checkable
class EndsTrajectories(Protocol):
    """Releases what a trajectory held, however it ended."""

    async def end(self, trajectory: Trajectory) -> None: ...


@runtime_checkable
class HasStopWords(Protocol):
    """Asks the engine to stop at more strings (a code interpreter stops where the program's output goes)."""

    stop_words: list[str]


@runtime_checkable
class Describes(Protocol):
    """Says how it was built, for the run manifest."""

    def describe(self) -> dict[str, Any]: ...


@runtime_checkable
class Closeable(Protocol):
    """Holds something to release when the run ends (a sandbox pool, worker processes)."""

    async def aclose(self) -> None: ...
