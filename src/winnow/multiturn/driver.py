"""The multi-turn driver: every sample a trajectory, every turn of every live trajectory in shared engine calls.

:class:`MultiTurn` wraps the run's strategy (best-of-N sampling) when ``--multi_turn_scheduler`` is set.
Each trajectory is a small task: ask for a reply, append it, let the scheduler step, repeat. The requests
of all trajectories of the run, whichever batch of prompts they belong to, meet in one
:class:`TurnBatcher`, which sends them to the engine together: identical requests (the N samples of a
prompt on their first turn) as one prompt with ``n``, the rest as one prompt each, in calls as large as
the engine takes. A local engine gets one call per round of turns; the client engine gets every request
at once and keeps ``--max_concurrency`` of them in flight.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from winnow.engines import Engine, check_aligned
from winnow.errors import ConfigError, SchedulerError, WinnowError
from winnow.multiturn import (
    STOP_DONE,
    STOP_FAILED,
    STOP_MAX_TURNS,
    Closeable,
    Describes,
    EndsTrajectories,
    HasStopWords,
    Scheduler,
    StartsTrajectories,
    Trajectory,
    TurnResult,
)
from winnow.schema import Completion, Group, Message, Prompt, SamplingParams

# how long a local engine's next call waits for trajectories still in a scheduler step (running a tool)
# once others are ready: a call more costs more than the wait
DEFAULT_BATCH_WAIT_S = 0.5


@dataclass
class _Waiting:
    """One trajectory's request waiting for its reply."""

    prompt: Prompt
    key: str
    reply: asyncio.Future


class TurnBatcher:
    """Gathers the next turn of every live trajectory into shared engine calls.

    A call goes out when the engine has room for one (its ``batch_plan``: calls in flight) and either
    enough requests are waiting to fill it, or no other live trajectory is about to ask (all are waiting
    or in the engine), or the oldest request has waited ``wait_s``. Requests made in the same moment
    are always sent together.
    """

    def __init__(
        self, engine: Engine, params: SamplingParams, count: Callable[..., None], wait_s: float = DEFAULT_BATCH_WAIT_S
    ):
        self.engine = engine
        self.params = params
        self.count = count
        self.wait_s = wait_s
        self.waiting: list[_Waiting] = []
        self.live = 0  # trajectories that may still ask for a turn
        self.in_engine = 0  # trajectories whose request is in an engine call
        self.calls = 0  # engine calls in flight
        per_call, max_calls = engine.batch_plan(1)  # read once: the Ray engine asks a replica for it
        self.per_call = max(1, per_call)  # prompts per engine call
        self.max_calls = max(1, max_calls)
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._oldest = 0.0
        self._tasks: set[asyncio.Task] = set()

    def join(self, trajectories: int) -> None:
        """``trajectories`` more may ask for turns."""
        self.live += trajectories

    def leave(self) -> None:
        """A trajectory ended: the others need not wait for it."""
        self.live -= 1
        self._schedule()

    async def generate(self, prompt: Prompt) -> Completion:
        """The model's reply to one trajectory's request."""
        key = repr((prompt.messages, prompt.prefix, prompt.tools))  # equal requests are equal here
        waiting = _Waiting(prompt, key, asyncio.get_running_loop().create_future())
        if not self.waiting:
            self._oldest = time.monotonic()
        self.waiting.append(waiting)
        self._schedule()
        return await waiting.reply

    def _schedule(self) -> None:
        # after the current moment: requests made together are sent together
        if not self._scheduled and self.waiting:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._scheduled = False
        units = self._units([w for w in self.waiting if not w.reply.done()])  # (a cancelled trajectory's is)
        ready = (
            len(units) >= self.per_call
            or self.live <= sum(map(len, units)) + self.in_engine
            or time.monotonic() - self._oldest >= self.wait_s
        )
        if units and not ready:
            if self._timer is None:
                delay = max(0.0, self.wait_s - (time.monotonic() - self._oldest))
                self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)
            return
        while units and self.calls < self.max_calls:
            take, units = units[: self.per_call], units[self.per_call :]
            by_n: dict[int, list[list[_Waiting]]] = {}
            for unit in take:
                by_n.setdefault(len(unit), []).append(unit)
            for n, group in by_n.items():
                self._launch(n, group)
        self.waiting = [w for unit in units for w in unit]
        self._oldest = time.monotonic()

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    @staticmethod
    def _units(waiting: list[_Waiting]) -> list[list[_Waiting]]:
        """Identical requests together (one prompt with n), in the order they came."""
        units: dict[str, list[_Waiting]] = {}
        for w in waiting:
            units.setdefault(w.key, []).append(w)
        return list(units.values())

    def _launch(self, n: int, units: list[list[_Waiting]]) -> None:
        self.calls += 1
        self.in_engine += sum(len(u) for u in units)
        task = asyncio.ensure_future(self._call(n, units))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, n: int, units: list[list[_Waiting]]) -> None:
        prompts = [unit[0].prompt for unit in units]
        params = dataclasses.replace(self.params, n=n)
        waiting = [w for unit in units for w in unit]
        try:
            out = await self.engine.generate(prompts, params)
            check_aligned(self.engine, prompts, n, out)
        except asyncio.CancelledError:
            for w in waiting:
                w.reply.cancel()
            raise
        except Exception as e:  # the engine as a whole failed (a bad key, a broken contract): every trajectory hears it
            for w in waiting:
                if not w.reply.done():
                    w.reply.set_exception(e)
            return
        finally:
            self.calls -= 1
            self.in_engine -= sum(len(u) for u in units)
            self.count("engine_calls")
            self.count("engine_prompts", len(prompts))
            self._schedule()
        for unit, completions in zip(units, out, strict=True):
            for w, completion in zip(unit, completions, strict=True):
                if not w.reply.done():
                    w.reply.set_result(completion)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()


def append_reply(trajectory: Trajectory, reply: Completion) -> None:
    """The reply as the conversation's next assistant message, or the rest of a trailing one (a continuation)."""
    messages = trajectory.messages
    if messages and messages[-1].get("role") == "assistant":
        last = messages[-1]
        last["content"] = (last.get("content") or "") + reply.text
        if reply.tool_calls:
            last["tool_calls"] = [*(last.get("tool_calls") or []), *reply.tool_calls]
        return
    message: Message = {"role": "assistant", "content": reply.text if reply.text or not reply.tool_calls else None}
    if reply.tool_calls:
        message["tool_calls"] = [dict(call) for call in reply.tool_calls]
    if reply.reasoning:
        message["reasoning_content"] = reply.reasoning
    messages.append(message)


def common_prefix(conversations: list[list[Message]]) -> list[Message]:
    """The messages every conversation starts with."""
    if not conversations:
        return []
    out = []
    for messages in zip(*conversations, strict=False):
        if any(m != messages[0] for m in messages[1:]):
            break
        out.append(messages[0])
    return out


class _FunctionScheduler:
    """A plain ``async def step(trajectory)`` as a scheduler."""

    def __init__(self, fn: Callable[[Trajectory], Any]):
        self.fn = fn

    async def step(self, trajectory: Trajectory) -> TurnResult:
        out = self.fn(trajectory)
        return await out if inspect.isawaitable(out) else out


def build_scheduler(name: str, target: Any, options: dict[str, Any], context: dict[str, Any]) -> Scheduler:
    """The scheduler object of a registered target: a class built with its options (and, where it names
    them, the run's ``max_turns``, ``tools``, ``gym_env``, ``tokenizer``), a function adapted, an object kept."""
    from winnow.multiturn import swift
    from winnow.rewards.base import _accepts  # (named parameters, takes **kwargs), as rewards are built

    if swift.is_swift_scheduler(target):
        return swift.SwiftScheduler(name, target, options, context)
    if inspect.isclass(target):
        names, any_kw = _accepts(target.__init__)[:2] if target.__init__ is not object.__init__ else (set(), False)
        bad = [k for k in options if k not in names and not any_kw]
        if bad:
            raise ConfigError(
                f"scheduler {name}: unknown option(s) {', '.join(bad)} in --multi_turn_kwargs; "
                f"it takes {', '.join(sorted(names - {'self'})) or 'none'}"
            )
        extra = {k: v for k, v in context.items() if (k in names or any_kw) and k not in options}
        try:
            target = target(**extra, **options)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"scheduler {name}: {e}") from None
    elif inspect.isfunction(target) or inspect.ismethod(target):
        if options:
            raise ConfigError(f"scheduler {name} is a function and takes no --multi_turn_kwargs")
        target = _FunctionScheduler(target)
    if not isinstance(target, Scheduler):
        raise ConfigError(
            f"scheduler {name}: {target!r} has no async step(trajectory) (winnow's contract) and is not "
            "a subclass of ms-swift's MultiTurnScheduler"
        )
    return target


class MultiTurn:
    """Each of the N samples of a prompt is a trajectory driven by a scheduler; a drop-in strategy."""

    name = "multi_turn"

    def __init__(
        self,
        scheduler: Scheduler,
        *,
        scheduler_name: str,
        max_turns: int,
        inner: Any = None,
        args: dict[str, Any] | None = None,
        batch_wait_s: float = DEFAULT_BATCH_WAIT_S,
    ):
        self.scheduler = scheduler
        self.scheduler_name = scheduler_name
        self.max_turns = max_turns
        self.inner = inner
        self.args = args or {}
        self.batch_wait_s = batch_wait_s
        self._batcher: TurnBatcher | None = None

    @classmethod
    def from_config(cls, config, engine: Engine | None = None) -> MultiTurn:
        """The multi-turn strategy a run's options ask for (its plugin files loaded first)."""
        from winnow import registry

        if not config.multi_turn_scheduler:
            flag = "--tools" if config.tools else "--gym_env"
            raise ConfigError(
                f"{flag} is an option of a multi-turn run: add --multi_turn_scheduler "
                f"{'tools' if config.tools else 'gym'}"
            )
        if config.cache_files:
            raise ConfigError("--cache_files holds single answers: it cannot be combined with --multi_turn_scheduler")
        if config.sampler_type not in ("sample", "distill"):
            raise ConfigError(
                "--multi_turn_scheduler works with --sampler_type sample or distill (every turn "
                f"sampled), not {config.sampler_type}"
            )
        if config.response_prefix:
            raise ConfigError("--response_prefix does not apply to multi-turn runs: every turn would start with it")
        for path in config.external_plugins:
            registry.load_plugin(path)
        target = registry.REGISTRY.resolve(
            "scheduler", config.multi_turn_scheduler, "Or load one with --external_plugins FILE."
        )
        options = dict(config.multi_turn_kwargs)
        wait = float(options.pop("batch_wait_s", DEFAULT_BATCH_WAIT_S))
        context = {
            "max_turns": config.max_turns,
            "tools": list(config.tools),
            "gym_env": config.gym_env,
            "tokenizer": _tokenizer(engine),
        }
        scheduler = build_scheduler(config.multi_turn_scheduler, target, options, context)
        args = {
            "max_turns": config.max_turns,
            **({"tools": list(config.tools)} if config.tools else {}),
            **({"gym_env": config.gym_env} if config.gym_env else {}),
            **options,
        }
        return cls(
            scheduler,
            scheduler_name=config.multi_turn_scheduler,
            max_turns=config.max_turns,
            args=args,
            batch_wait_s=wait,
        )

    def around(self, inner: Any) -> MultiTurn:
        """This strategy in place of ``inner`` (the run's sampling strategy, whose settings every turn uses)."""
        self.inner = inner
        return self

    def describe(self) -> dict[str, Any]:
        inner = self.inner.describe() if self.inner is not None else {"name": "sample"}
        described = self.scheduler.describe() if isinstance(self.scheduler, Describes) else {}
        return {**inner, "multi_turn": {"scheduler": self.scheduler_name, **self.args, **described}}

    async def run(self, prompts: list[Prompt], ctx) -> list[Group]:
        """Every prompt's N trajectories, driven to their ends; one group per prompt."""
        if self._batcher is None:
            stop = list(self.scheduler.stop_words) if isinstance(self.scheduler, HasStopWords) else []
            params = dataclasses.replace(
                ctx.params, stop=[*ctx.params.stop, *[s for s in stop if s not in ctx.params.stop]]
            )
            self._batcher = TurnBatcher(ctx.engine, params, ctx.count, self.batch_wait_s)
        batcher = self._batcher
        n = ctx.params.n
        trajectories = [
            [
                Trajectory(p, i, copy.deepcopy(p.messages), list(p.tools) if p.tools else None, self.max_turns)
                for i in range(n)
            ]
            for p in prompts
        ]
        flat = [t for ts in trajectories for t in ts]
        batcher.join(len(flat))
        ctx.count("trajectories", len(flat))
        initial: dict[int, list[Message]] = {}  # each trajectory's conversation once started
        drives = [asyncio.ensure_future(self._drive(t, batcher, ctx, initial)) for t in flat]
        try:
            await asyncio.gather(*drives)
        except BaseException:
            for task in drives:
                task.cancel()
            await asyncio.gather(*drives, return_exceptions=True)
            raise
        return [
            self._group(p, ts, [initial[id(t)] for t in ts], ctx) for p, ts in zip(prompts, trajectories, strict=True)
        ]

    async def _drive(self, t: Trajectory, batcher: TurnBatcher, ctx, initial: dict[int, list[Message]]) -> None:
        try:
            if isinstance(self.scheduler, StartsTrajectories):
                await self._call("start", self.scheduler.start, t)
            initial[id(t)] = [dict(m) for m in t.messages]
            while True:
                reply = await batcher.generate(t.request())
                t.turn += 1
                t.replies.append(reply)
                ctx.count("turns")
                if reply.failed:
                    t.stop_reason = STOP_FAILED
                    break
                append_reply(t, reply)
                result = await self._call("step", self.scheduler.step, t)
                if not isinstance(result, TurnResult):
                    raise SchedulerError(
                        f"scheduler {self.scheduler_name}: step returned {type(result).__name__}, not a TurnResult"
                    )
                t.infos.append(result.info)
                if result.done:
                    t.stop_reason = STOP_DONE
                    break
                if t.last_turn:
                    t.stop_reason = STOP_MAX_TURNS
                    break
                t.messages.extend(result.messages)
        finally:
            batcher.leave()
            if isinstance(self.scheduler, EndsTrajectories):
                await self._call("end", self.scheduler.end, t)

    async def _call(self, hook: str, fn: Callable, t: Trajectory) -> Any:
        try:
            return await fn(t)
        except (WinnowError, asyncio.CancelledError):
            raise
        except Exception as e:  # a scheduler that raises is a bug to fix, like a reward that raises
            raise SchedulerError(
                f"scheduler {self.scheduler_name} failed in {hook} at turn {t.turn} of {t.id}: {type(e).__name__}: {e}"
            ) from e

    def _group(self, prompt: Prompt, trajectories: list[Trajectory], initial: list[list[Message]], ctx) -> Group:
        """The prompt's group: its conversation as every trajectory began it (after the scheduler's start),
        one completion per trajectory with its turns."""
        base = common_prefix(initial)
        tools = trajectories[0].tools
        if base != prompt.messages or tools != prompt.tools:
            prompt = dataclasses.replace(prompt, messages=base, tools=tools)
        return Group(prompt, [self._completion(t, len(base), ctx) for t in trajectories])

    @staticmethod
    def _completion(t: Trajectory, start: int, ctx) -> Completion:
        turns = t.messages[start:]
        last = next((i for i in range(len(turns) - 1, -1, -1) if turns[i].get("role") == "assistant"), None)
        turns = turns[: last + 1] if last is not None else turns
        reply = t.reply
        trace = {
            "num_turns": t.turn,
            "stop_reason": t.stop_reason,
            "turn_infos": t.infos,
            **({"rollout_infos": t.rollout_infos} if t.rollout_infos else {}),
        }
        tool_calls = sum(len(info.get("tool_calls") or ()) for info in t.infos)
        if tool_calls:
            ctx.count("tool_calls", tool_calls)
        ctx.count(f"stop_{t.stop_reason}")
        common: dict[str, Any] = dict(
            prompt_tokens=sum(r.prompt_tokens for r in t.replies),
            completion_tokens=sum(r.completion_tokens for r in t.replies),
            turns=turns,
            trace=trace,
        )
        if t.stop_reason == STOP_FAILED or last is None:
            error = reply.error or "the trajectory has no assistant turn"
            return Completion(
                text="",
                finish_reason=reply.finish_reason if reply.failed else "error",
                error=f"turn {t.turn}: {error}",
                **common,
            )
        final = turns[-1]
        return Completion(
            text=final.get("content") or "",
            finish_reason=reply.finish_reason,
            error=reply.error,
            reasoning=reply.reasoning,
            tool_calls=final.get("tool_calls"),
            **common,
        )

    async def aclose(self) -> None:
        """Stop the batcher and release what the scheduler holds (sandboxes, verifier workers)."""
        if self._batcher is not None:
            await self._batcher.aclose()
        if isinstance(self.scheduler, Closeable):
            await self.scheduler.aclose()


@runtime_checkable
class _EncodesPrompts(Protocol):
    """A local engine: it renders prompts with its own tokenizer (:class:`winnow.engines.prompts.PromptEncoder`)."""

    encoder: Any


def _tokenizer(engine: Engine | None) -> Any:
    """The local engine's tokenizer (ms-swift schedulers use one to count a tool result's tokens), else None."""
    return engine.encoder.tokenizer if isinstance(engine, _EncodesPrompts) else None
