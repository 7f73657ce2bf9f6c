"""The Reward contract and the adapters that turn every accepted calling style into it, once, at load time.

A reward scores a batch of (prompt, completion) samples and returns one :class:`Score` per sample,
aligned; "cannot judge" is ``None``, never 0. Accepted styles:

- winnow's own: an object with ``name`` and ``async score(samples) -> list[Score]``;
- the seed (ms-swift sample) style: ``__call__(infer_requests, ground_truths, **kwargs)`` returning
  ``list[float | list[float]]`` (a list is per-step scores), registered in a plugin's ``orms``/``prms``;
- TRL's GRPO convention, exactly: ``fn(prompts=..., completions=..., completion_ids=..., **columns)``
  sync or ``async def``, every argument a keyword: ``prompts`` and ``completions`` are message lists for
  conversational rows (``[{"role": "assistant", "content": ...}]`` per completion) and strings for
  plain-text ``prompt``/``completion`` rows, dataset columns arrive by name, ``trainer_state``,
  ``log_extra`` and ``log_metric`` are harmless stand-ins, and ``None`` means "cannot judge". winnow
  adds ``messages``, ``reference``, ``completion_tokens`` and ``finish_reasons`` for functions that
  name them (a dataset column of the same name wins).

A multi-turn trajectory (``--multi_turn_scheduler``) is scored as a whole: ``messages`` and a seed-style
request's messages hold every turn; TRL-style ``completions`` of chat rows are the trajectory's messages
(assistant turns with their tool calls, tool results, observations), as TRL passes tool-using rollouts;
swift-style completions stay the final answer's text; ``rollout_infos`` (ms-swift's name: one dict per
sample, :attr:`Sample.rollout_infos`) carries what happened on the way.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import types
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from winnow.errors import RewardError
from winnow.schema import Completion, Message, Prompt, Score

SEED_FIRST_PARAMS = ("infer_requests", "inputs", "requests", "infer_request")


@dataclass
class Sample:
    """One (prompt, completion) pair to score."""

    prompt: Prompt
    completion: Completion

    @property
    def text(self) -> str:
        return self.completion.text

    @property
    def messages(self) -> list[Message]:
        """The whole conversation, ending with this completion as the assistant turn (every turn of a
        multi-turn trajectory: tool calls, tool results, observations)."""
        if self.completion.turns:
            return [*self.prompt.messages, *self.completion.turns]
        return [*self.prompt.messages, {"role": "assistant", "content": self.completion.text}]

    @property
    def rollout_infos(self) -> dict[str, Any]:
        """What a multi-turn run recorded of the trajectory (ms-swift's ``rollout_infos``: its own, then
        ``num_turns``, ``stop_reason`` and ``turn_infos``, what the scheduler said of each turn); {} otherwise."""
        trace = self.completion.trace or {}
        if "num_turns" not in trace:
            return {}
        return {
            **(trace.get("rollout_infos") or {}),
            "num_turns": trace["num_turns"],
            "stop_reason": trace.get("stop_reason"),
            "turn_infos": trace.get("turn_infos") or [],
        }


@runtime_checkable
class Reward(Protocol):
    """winnow's own reward protocol."""

    name: str

    async def score(self, samples: list[Sample]) -> list[Score]: ...


@runtime_checkable
class SplitsSteps(Protocol):
    """A process reward that says where it splits an answer into steps (search strategies end their steps
    there, so that the steps they generate are the steps it scores)."""

    @property
    def step_separator(self) -> str | None: ...


class InferRequest:
    """The swift-style request a seed-style reward receives: ``.messages`` or ``['messages']``, the full
    conversation including the sampled assistant turn."""

    def __init__(self, messages: list[Message], **extra: Any):
        self.messages = messages
        self.__dict__.update(extra)

    def __getitem__(self, key: str) -> Any:
        try:
            return self.__dict__[key]
        except KeyError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        return self.__dict__.get(key, default)

    def keys(self):
        return self.__dict__.keys()

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return f"InferRequest(messages={self.messages!r})"


def to_score(value: Any, name: str, agg: str = "min") -> Score:
    """A reward's answer for one sample as a Score: None, a number, a bool, per-step list, or a Score."""
    from winnow.rewards.models import aggregate_steps

    if isinstance(value, Score):
        return value
    if value is None:
        return Score(value=None)
    if isinstance(value, dict) and "value" in value:
        return Score(value=_number(value["value"], name), steps=value.get("steps"))
    if isinstance(value, (list, tuple)):
        steps = [_number(v, name) for v in value]
        clean = [s for s in steps if s is not None]
        return Score(value=aggregate_steps(clean, agg) if len(clean) == len(steps) else None, steps=clean)
    return Score(value=_number(value, name))


def _number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise RewardError(
            f"reward {name} returned {value!r}; expected a number, None, or a list of step scores"
        ) from None
    return None if math.isnan(out) else out


def check_count(name: str, got: Any, want: int) -> list:
    """A reward must return one score per sample."""
    if not isinstance(got, (list, tuple)):
        raise RewardError(f"reward {name} returned {type(got).__name__}; expected a list of {want} scores")
    if len(got) != want:
        raise RewardError(f"reward {name} returned {len(got)} scores for {want} samples")
    return list(got)


def _accepts(fn: Any) -> tuple[set[str], bool, list[str]]:
    """(named parameters, takes **kwargs, positional parameter names) of a callable."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return set(), True, []
    params = sig.parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names, var_kw, positional


def calling_style(fn: Any) -> str:
    """ "winnow", "seed" or "trl", from what the object is and how its first parameter is named (a
    ``trl``-style callable registered in swift's registries is then called in swift's ``swift`` style)."""
    if not callable(fn) and hasattr(fn, "score"):
        return "winnow"
    if hasattr(fn, "score") and inspect.iscoroutinefunction(getattr(fn, "score", None)) and hasattr(fn, "name"):
        return "winnow"
    _, _, positional = _accepts(fn)
    return "seed" if positional and positional[0] in SEED_FIRST_PARAMS else "trl"


def _columns(samples: list[Sample]) -> dict[str, list[Any]]:
    keys: list[str] = []
    for s in samples:
        keys += [k for k in s.prompt.columns if k not in keys]
    return {k: [s.prompt.columns.get(k) for s in samples] for k in keys}


async def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call sync code in a thread (it may be slow) and await async code."""
    target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else getattr(fn, "__call__", fn)  # noqa: B004
    if inspect.iscoroutinefunction(target):
        return await fn(*args, **kwargs)
    result = await asyncio.to_thread(fn, *args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


def completion_texts(completions: list[Any]) -> list[str]:
    """The texts of TRL-style completions, whether strings or message lists (the last message's content)."""
    out = []
    for c in completions:
        if isinstance(c, list):
            c = c[-1].get("content") if c and isinstance(c[-1], dict) else ""
        out.append(c if isinstance(c, str) else "")
    return out


# what TRL's GRPOTrainer passes besides the columns; the trainer objects get stand-ins
TRAINER_STATE = types.SimpleNamespace(global_step=0, epoch=0.0, max_steps=0, num_train_epochs=0)
TRL_RUNTIME = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")
WINNOW_RUNTIME = ("messages", "reference", "completion_tokens", "finish_reasons", "rollout_infos")


class FunctionReward:
    """A seed-style or TRL-style callable adapted to the Reward protocol."""

    def __init__(
        self, name: str, fn: Any, *, style: str | None = None, agg: str = "min", args: dict[str, Any] | None = None
    ):
        self.name = name
        self.fn = fn
        self.style = style or calling_style(fn)
        self.agg = agg
        self.args = args or {}
        self.names, self.var_kw, _ = _accepts(fn)
        self.required = _required(fn)
        self.metrics: dict[str, list[float]] = {}  # what the function reported with log_metric

    def describe(self) -> dict[str, Any]:
        target = self.fn if inspect.isfunction(self.fn) else type(self.fn)
        out = {"style": self.style, "callable": f"{target.__module__}.{target.__qualname__}", "args": self.args}
        if self.metrics:
            out["logged_metrics"] = {k: sum(v) / len(v) for k, v in self.metrics.items()}
        return out

    def _pick(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return kwargs if self.var_kw else {k: v for k, v in kwargs.items() if k in self.names}

    async def score(self, samples: list[Sample]) -> list[Score]:
        if not samples:
            return []
        columns = _columns(samples)
        references = [s.prompt.reference for s in samples]
        if self.style == "seed":
            requests = [InferRequest([*s.messages], **{"id": s.prompt.id}) for s in samples]
            out = await _call(self.fn, requests, references, **self._pick(columns))
            return [to_score(v, self.name, self.agg) for v in check_count(self.name, out, len(samples))]
        extras: list[dict[str, Any]] = [{} for _ in samples]

        def log_extra(column: str, values: list[Any]) -> None:
            for info, value in zip(extras, values, strict=False):
                info[column] = value

        def log_metric(metric: str, value: float) -> None:
            self.metrics.setdefault(metric, []).append(float(value))

        # swift's ORMs take completions as strings; TRL's as message lists for chat rows
        conversational = [s.prompt.conversational and self.style == "trl" for s in samples]
        kwargs = {
            "messages": [s.messages for s in samples],
            "reference": references,
            "completion_tokens": [s.completion.completion_tokens for s in samples],
            "finish_reasons": [s.completion.finish_reason for s in samples],
            "rollout_infos": [s.rollout_infos for s in samples],
            **columns,
            "prompts": [
                s.prompt.messages if conv else prompt_text(s.prompt)
                for s, conv in zip(samples, conversational, strict=True)
            ],
            "completions": [
                (s.completion.turns or [{"role": "assistant", "content": s.text}]) if conv else s.text
                for s, conv in zip(samples, conversational, strict=True)
            ],
            "completion_ids": [s.completion.token_ids for s in samples],
            "trainer_state": TRAINER_STATE,
            "log_extra": log_extra,
            "log_metric": log_metric,
        }
        missing = [name for name in self.required if name not in kwargs]
        if missing:
            raise RewardError(
                f"reward {self.name} needs {', '.join(missing)}: not a column of this dataset; give "
                f'a value with --reward_kwargs \'{{"{self.name}": {{"{missing[0]}": ...}}}}\''
            )
        out = await _call(self.fn, **self._pick(kwargs))
        scores = [to_score(v, self.name, self.agg) for v in check_count(self.name, out, len(samples))]
        for score, info in zip(scores, extras, strict=True):
            if info:
                score.info = {**(score.info or {}), **info}
        return scores


def prompt_text(prompt: Prompt) -> str:
    """A plain-text row's prompt (its last user message)."""
    return next((str(m["content"]) for m in reversed(prompt.messages) if m["role"] == "user"), "")


def _required(fn: Any) -> list[str]:
    """The parameters a TRL-style function needs at call time: its required keyword parameters (dataset
    columns such as ``solution``, or the trainer's arguments)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    return [
        p.name
        for p in sig.parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


class ModelReward:
    """A loaded reward model (classifier or PRM) run in its own thread, off the event loop."""

    def __init__(self, name: str, model: Any):
        import concurrent.futures

        self.name = name
        self.model = model
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"winnow-rm-{name}")

    def describe(self) -> dict[str, Any]:
        return self.model.describe()

    @property
    def step_separator(self) -> str | None:
        """Where a PRM splits an answer into steps (search strategies generate steps that end there); None
        for a classifier."""
        return self.model.fmt.step_sep if self.model.kind == "prm" else None

    async def score(self, samples: list[Sample]) -> list[Score]:
        if not samples:
            return []
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(self._executor, self.model.score_conversations, [s.messages for s in samples])
        return check_count(self.name, out, len(samples))

    async def aclose(self) -> None:
        self._executor.shutdown(wait=True)


def adapt(
    name: str, obj: Any, *, agg: str = "min", args: dict[str, Any] | None = None, swift_registered: bool = False
) -> Reward:
    """Any accepted calling style as a :class:`Reward`. A ``completions``-style callable registered in
    swift's ``orms``/``prms`` gets swift's convention (completions as strings), any other TRL's."""
    style = calling_style(obj)
    if style == "winnow":
        if not getattr(obj, "name", None):
            obj.name = name
        return obj
    if not callable(obj):
        raise RewardError(f"reward {name}: {obj!r} is not callable and has no async score()")
    return FunctionReward(
        name, obj, agg=agg, args=args, style="swift" if style == "trl" and swift_registered else style
    )
