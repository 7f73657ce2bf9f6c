"""ms-swift multi-turn schedulers and gym environments, loaded unchanged and run through winnow's contract.

A swift plugin file imports ``MultiTurnScheduler`` and the ``multi_turns`` table (``from swift.rollout import
...`` in swift 4, ``from swift.plugin.multi_turn import ...`` in swift 3), subclasses it, overriding
``check_finished`` and ``step`` (and, since swift 3.8, the async hooks ``on_trajectory_start`` and
``on_turn_end``), and registers it with ``multi_turns['name'] = MyScheduler``; environments subclass
``Env`` (async ``reset``/``step``/``close``) and register in ``envs``. When ms-swift is not installed, the
stand-ins below take the place of those modules while the file runs (:func:`shim_names`, installed by
:mod:`winnow.rewards.swift_compat`); when it is, its own classes are used. Either way
:class:`SwiftScheduler` drives the scheduler with ms-swift's calling sequence, one turn at a time:

    reply appended to ``infer_request.messages`` (continuing a trailing assistant message)
    -> ``on_turn_end(infer_request, response_choice, turn)`` -> its ``done``, else ``check_finished(...)``
    -> unless finished or at ``max_turns``: ``step(...)`` -> ``{'infer_request': ..., 'rollout_infos': ...}``

``response_choice`` has swift's fields (``message.content``, ``message.tool_calls``, ``finish_reason``,
``token_ids`` (empty: engines return text), ``logprobs`` None); ``infer_request`` has ``messages``,
``data_dict`` (the row's columns, ``messages``, and ``solution``: its reference answer), ``uuid`` and
``tools``. ``rollout_infos`` reach the trajectory's trace and rewards (``kwargs['rollout_infos']``). A
scheduler that replaces ``run()`` (swift's full-control mode) is refused: winnow drives the turns itself,
batched across trajectories.
"""

from __future__ import annotations

import copy
import inspect
import logging
import uuid as uuid_module
from dataclasses import dataclass, field
from typing import Any

from winnow.errors import ConfigError, SchedulerError
from winnow.multiturn import Trajectory, TurnResult
from winnow.schema import FINISH_LENGTH, Completion, Prompt

SWIFT_BASES = ("MultiTurnScheduler", "RolloutScheduler")


# ----------------------------------------------------------------------------- swift's data shapes


@dataclass
class RolloutInferRequest:
    """swift's request of one trajectory: its conversation, its dataset row and its id."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    data_dict: dict[str, Any] = field(default_factory=dict)
    uuid: str | None = field(default_factory=lambda: str(uuid_module.uuid4()))
    images: list[Any] = field(default_factory=list)
    audios: list[Any] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)
    objects: dict[str, Any] = field(default_factory=dict)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    prompt: Prompt | None = None  # winnow's row, for environments written for winnow


InferRequest = RolloutInferRequest


@dataclass
class Function:
    """A tool call's function: its name and JSON arguments."""

    name: str
    arguments: Any


@dataclass
class ChatCompletionMessageToolCall:
    """One tool call of a reply."""

    function: Function
    type: str = "function"
    id: str = ""


@dataclass
class ChatMessage:
    """The reply's message."""

    role: str
    content: Any
    tool_calls: list[ChatCompletionMessageToolCall] | None = None
    reasoning_content: str | None = None


@dataclass
class ChatCompletionResponseChoice:
    """One reply as swift's schedulers receive it."""

    index: int
    message: ChatMessage
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None
    token_ids: list[int] | None = None


@dataclass
class RequestConfig:
    """swift's sampling settings (plugin files import it; winnow's options decide)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    stop: list[str] | None = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    n: int = 1


def response_choice(reply: Completion) -> ChatCompletionResponseChoice:
    """A winnow reply in swift's shape."""
    calls = [
        ChatCompletionMessageToolCall(
            Function(c["function"]["name"], c["function"].get("arguments")),
            c.get("type", "function"),
            c.get("id") or "",
        )
        for c in reply.tool_calls or []
    ]
    return ChatCompletionResponseChoice(
        0,
        ChatMessage("assistant", reply.text, calls or None, reply.reasoning),
        reply.finish_reason,
        None,
        list(reply.token_ids or []),
    )


def infer_request(trajectory: Trajectory) -> RolloutInferRequest:
    """A trajectory in swift's shape (sharing its message list, which swift's hooks edit in place)."""
    p = trajectory.prompt
    data = {**copy.deepcopy(p.columns), "messages": copy.deepcopy(p.messages)}
    if p.reference is not None:
        data.setdefault("solution", p.reference)
    if p.tools:
        data.setdefault("tools", copy.deepcopy(p.tools))
    return RolloutInferRequest(
        messages=trajectory.messages, tools=trajectory.tools, data_dict=data, uuid=trajectory.id, prompt=p
    )


# ----------------------------------------------------------------------------- swift's base classes


class RolloutScheduler:
    """swift's scheduler base: ``max_turns``, and the tokenizer swift's trainer passes (the local engine's here)."""

    def __init__(self, infer_engine: Any = None, max_turns: int | None = None, *args: Any, **kwargs: Any):
        self.infer_engine = infer_engine
        self.max_turns = max_turns
        self._tokenizer = kwargs.get("tokenizer")
        self._template = kwargs.get("template")

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    async def on_trajectory_start(self, requests: list[RolloutInferRequest]) -> None:
        """Before the first turn (swift >= 3.8); nothing by default."""

    async def on_turn_end(
        self, infer_request: RolloutInferRequest, response_choice: ChatCompletionResponseChoice, current_turn: int
    ) -> dict[str, Any]:
        """After each reply is appended (swift >= 3.8): may say ``done`` and add ``rollout_infos``."""
        return {}

    async def run(self, infer_request: RolloutInferRequest, request_config: Any, **kwargs: Any) -> Any:
        """swift's own turn loop; winnow drives the turns itself (batched) and never calls it."""
        raise SchedulerError("winnow drives the turns itself; run() is not called")


class MultiTurnScheduler(RolloutScheduler):
    """swift's multi-turn scheduler base: ``check_finished`` and ``step`` between turns."""

    def step(
        self, infer_request: RolloutInferRequest, response_choice: ChatCompletionResponseChoice, current_turn: int
    ) -> dict[str, Any]:
        """The next turn's request: ``{'infer_request': ..., 'rollout_infos': {...}}`` (subclasses define it)."""
        raise NotImplementedError("Please implement the `step` method in your MultiTurnScheduler subclass")

    def check_finished(
        self, infer_request: RolloutInferRequest, response_choice: ChatCompletionResponseChoice, current_turn: int
    ) -> bool:
        """swift's default: stop on a reply cut at the token limit, or at ``max_turns``."""
        if response_choice.finish_reason == FINISH_LENGTH:
            return True
        return bool(self.max_turns and current_turn >= self.max_turns)


class Env:
    """swift's gym environment base: ``reset(request) -> (observation, info, system)``, ``step(messages) ->
    (observation, reward, done, info)``, ``close()``, all async."""

    def __init__(self, env_config: dict[str, Any] | None = None):
        self.env_config = env_config or {}

    async def reset(self, config: RolloutInferRequest) -> tuple[str | None, dict[str, Any], str | None]:
        raise NotImplementedError("Please implement reset in your Env subclass")

    async def step(self, action: list[dict[str, Any]]) -> tuple[str | None, float, bool, dict[str, Any]]:
        raise NotImplementedError("Please implement step in your Env subclass")

    async def close(self) -> None:
        """Release the environment; nothing by default."""


def get_logger(name: str = "swift") -> logging.Logger:
    """swift.utils.get_logger, as plugin files call it."""
    return logging.getLogger(name)


def shim_names(multi_turns: dict[str, Any], envs: dict[str, Any]) -> dict[str, Any]:
    """What swift's multi-turn modules export, for the stand-in modules a plugin file imports from."""
    return {
        "MultiTurnScheduler": MultiTurnScheduler,
        "RolloutScheduler": RolloutScheduler,
        "multi_turns": multi_turns,
        "Env": Env,
        "envs": envs,
        "RolloutInferRequest": RolloutInferRequest,
        "RequestConfig": RequestConfig,
        "ChatCompletionResponseChoice": ChatCompletionResponseChoice,
        "ChatMessage": ChatMessage,
        "ChatCompletionMessageToolCall": ChatCompletionMessageToolCall,
        "Function": Function,
        "get_logger": get_logger,
    }


# ----------------------------------------------------------------------------- the adapter


def is_swift_scheduler(target: Any) -> bool:
    """A subclass of ms-swift's scheduler base (the real one or the stand-in)."""
    return inspect.isclass(target) and any(
        c.__name__ in SWIFT_BASES and (c.__module__.startswith("swift") or c.__module__ == __name__)
        for c in target.__mro__
    )


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class SwiftScheduler:
    """An ms-swift ``MultiTurnScheduler`` subclass behind winnow's contract (swift's calling sequence per turn)."""

    def __init__(self, name: str, cls: type, options: dict[str, Any], context: dict[str, Any]):
        if _replaces_run(cls):
            raise ConfigError(
                f"scheduler {name} ({cls.__name__}) replaces run(): winnow drives the turns itself, "
                "batched across trajectories, and calls check_finished, step, on_trajectory_start and "
                "on_turn_end; move the logic of run() into those"
            )
        self.name = name
        kwargs = {
            "max_turns": context.get("max_turns"),
            "tokenizer": context.get("tokenizer"),
            **({"gym_env": context["gym_env"]} if context.get("gym_env") else {}),
            **options,
        }
        try:
            self.swift = cls(**kwargs)  # as swift's trainer builds them: keywords only
        except Exception as e:
            raise ConfigError(f"scheduler {name}: building {cls.__name__} failed: {type(e).__name__}: {e}") from None

    def describe(self) -> dict[str, Any]:
        return {"swift_class": f"{type(self.swift).__module__}.{type(self.swift).__qualname__}"}

    async def start(self, trajectory: Trajectory) -> None:
        request = infer_request(trajectory)
        trajectory.state["swift_request"] = request
        await _maybe_await(self.swift.on_trajectory_start([request]))
        trajectory.messages, trajectory.tools = request.messages, request.tools

    async def step(self, trajectory: Trajectory) -> TurnResult:
        request: RolloutInferRequest = trajectory.state["swift_request"]
        request.messages = trajectory.messages  # the reply is appended there already
        choice = response_choice(trajectory.reply)
        turn_end = await _maybe_await(self.swift.on_turn_end(request, choice, trajectory.turn)) or {}
        info: dict[str, Any] = {}
        _record(trajectory, info, turn_end.get("rollout_infos"))
        done = (
            bool(turn_end["done"])
            if "done" in turn_end
            else bool(self.swift.check_finished(request, choice, trajectory.turn))
        )
        if done or trajectory.last_turn:
            trajectory.messages = request.messages
            return TurnResult(done=done, info=info)
        out = await _maybe_await(self.swift.step(request, choice, trajectory.turn))
        if isinstance(out, tuple):  # swift 3.6: (request, infos)
            out = {"infer_request": out[0], **({"rollout_infos": out[1]} if len(out) > 1 and out[1] else {})}
        elif not isinstance(out, dict):  # a bare request
            out = {"infer_request": out}
        following = out.get("infer_request")
        if following is None or not isinstance(getattr(following, "messages", None), list):
            raise SchedulerError(
                f"scheduler {self.name}: step returned {out!r}; swift's contract is a dict with 'infer_request'"
            )
        _record(trajectory, info, out.get("rollout_infos"))
        trajectory.state["swift_request"] = following
        trajectory.messages, trajectory.tools = following.messages, following.tools or trajectory.tools
        return TurnResult(info=info)


def _record(trajectory: Trajectory, info: dict[str, Any], rollout_infos: dict[str, Any] | None) -> None:
    """A hook's ``rollout_infos``: merged into the trajectory's, and into this turn's ``info``."""
    if rollout_infos:
        trajectory.rollout_infos.update(rollout_infos)
        info["rollout_infos"] = {**info.get("rollout_infos", {}), **rollout_infos}


def _replaces_run(cls: type) -> bool:
    """Whether a class (or a base below swift's) replaces the swift base's ``run()``."""
    base = next((c.__dict__["run"] for c in cls.__mro__ if c.__name__ in SWIFT_BASES and "run" in c.__dict__), None)
    own = next((c.__dict__["run"] for c in cls.__mro__ if "run" in c.__dict__), None)
    return own is not None and own is not base
