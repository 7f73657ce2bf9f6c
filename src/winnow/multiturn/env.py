"""The ``gym`` scheduler: each trajectory plays an environment, ms-swift's gym contract unchanged.

An environment is a class built with the row's ``env_config`` (a dict column, as in ms-swift; its ``name``
picks the environment, else ``--gym_env``) with three methods, async or not:

- ``reset(request) -> (observation, info, system)``: ``request`` has ``messages``, ``data_dict`` (the row),
  ``uuid`` and ``prompt`` (winnow's row); an observation becomes the conversation (``system`` first when
  given), as in ms-swift, and ``None`` keeps the row's own;
- ``step(messages) -> (observation, reward, done, info)``: ``messages`` is the conversation, ending with
  the model's reply; a next observation is the next user turn;
- ``close()``.

Per trajectory, the rewards and whether it finished are kept as ms-swift keeps them (``rollout_infos``:
``total_reward``, ``step_rewards``, ``gym_done``), where rewards read them (the ``env_reward`` reward, or
``kwargs['rollout_infos']``). Environments register by name (``winnow list environments``): in a plugin
file with ``@winnow.registry.environment`` or ms-swift's ``envs['name'] = MyEnv``; the built-in one is
``math_retry``, which runs offline on any row with a reference answer.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from winnow.errors import ConfigError, SchedulerError
from winnow.multiturn import Trajectory, TurnResult
from winnow.multiturn.swift import RolloutInferRequest, _maybe_await, infer_request


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return json.loads(json.dumps(value, default=str))


class EnvironmentScheduler:
    """Each trajectory plays an environment: reset before the first turn, step after each, observations as the
    next user turns, until the environment says done."""

    def __init__(self, gym_env: str | None = None, env_config: dict[str, Any] | None = None):
        self.gym_env = gym_env
        self.env_config = dict(env_config or {})
        if gym_env is not None:
            self._environment(gym_env)  # an unknown name is an error before any sampling

    def describe(self) -> dict[str, Any]:
        return {"gym_env": self.gym_env, **({"env_config": self.env_config} if self.env_config else {})}

    @staticmethod
    def _environment(name: str) -> Any:
        from winnow import registry

        return registry.REGISTRY.resolve(
            "environment",
            name,
            "Or load one with --external_plugins FILE (@winnow.registry.environment, or swift's envs[...]).",
        )

    def _config(self, trajectory: Trajectory) -> dict[str, Any]:
        own = trajectory.prompt.columns.get("env_config") or {}
        if isinstance(own, str):
            try:
                own = json.loads(own)
            except json.JSONDecodeError:
                raise SchedulerError(f"{trajectory.prompt.source}: env_config is not valid JSON") from None
        if not isinstance(own, dict):
            raise SchedulerError(f"{trajectory.prompt.source}: env_config must be a JSON object")
        return {**self.env_config, **own}

    async def start(self, trajectory: Trajectory) -> None:
        config = self._config(trajectory)
        name = config.get("name") or self.gym_env
        if not name:
            raise ConfigError("the gym scheduler needs --gym_env NAME, or rows whose env_config names one")
        env = self._environment(str(name))(config)
        trajectory.state.update(env=env, total_reward=0.0, step_rewards=[])
        request: RolloutInferRequest = infer_request(trajectory)
        out = await _maybe_await(env.reset(request))
        observation, info, system = (out, {}, None) if not isinstance(out, tuple) else (tuple(out) + (None,) * 3)[:3]
        if observation is not None:  # the environment sets the scene, as in ms-swift
            trajectory.messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": str(observation)}
            ]
        elif system:
            rest = [m for m in trajectory.messages if m.get("role") != "system"]
            trajectory.messages = [{"role": "system", "content": system}, *rest]
        if info:
            trajectory.rollout_infos["reset_info"] = _jsonable(info)

    async def step(self, trajectory: Trajectory) -> TurnResult:
        env = trajectory.state["env"]
        out = await _maybe_await(env.step(copy.deepcopy(trajectory.messages)))
        try:
            observation, reward, done, info = out
        except (TypeError, ValueError):
            raise SchedulerError(
                f"environment {type(env).__name__}: step returned {out!r}; expected (observation, reward, done, info)"
            ) from None
        reward = float(reward or 0.0)
        trajectory.state["total_reward"] += reward
        trajectory.state["step_rewards"].append(reward)
        done = bool(done) or observation is None
        trajectory.rollout_infos.update(
            total_reward=trajectory.state["total_reward"],
            step_rewards=list(trajectory.state["step_rewards"]),
            gym_done=done,
        )
        turn = {"reward": reward, "done": done, **({"info": _jsonable(info)} if info else {})}
        if done:
            return TurnResult(done=True, info=turn)
        return TurnResult(messages=[{"role": "user", "content": str(observation)}], info=turn)

    async def end(self, trajectory: Trajectory) -> None:
        env = trajectory.state.pop("env", None)
        if env is not None:
            await _maybe_await(env.close())

    async def aclose(self) -> None:
        import asyncio

        from winnow.rewards.builtin import close_verifiers

        await asyncio.to_thread(close_verifiers)


DEFAULT_FEEDBACK = "That is not right. Try again: {question}"


class MathRetryEnv:
    """A wrong final answer (math-verify against the row's reference) gets feedback and another try; a right one
    ends the episode with reward 1. ``env_config``: ``feedback`` (a format string with ``{question}``, the row's
    last user turn), ``timeout`` (seconds per verification)."""

    def __init__(self, env_config: dict[str, Any] | None = None):
        config = env_config or {}
        self.feedback = str(config.get("feedback", DEFAULT_FEEDBACK))
        self.timeout = float(config.get("timeout", 5.0))
        self.reference: str | None = None
        self.question = ""

    async def reset(self, request: RolloutInferRequest) -> tuple[None, dict[str, Any], None]:
        prompt = request.prompt
        self.reference = prompt.reference if prompt is not None else request.data_dict.get("solution")
        users = [m for m in request.messages if m.get("role") == "user"]
        self.question = str(users[-1].get("content") or "") if users else ""
        return None, {}, None  # the row's own conversation

    async def step(self, messages: list[dict[str, Any]]) -> tuple[str | None, float, bool, dict[str, Any]]:
        from winnow.rewards.builtin import shared_verifier

        answer = str(messages[-1].get("content") or "")
        ((verdict, why),) = await shared_verifier(None, self.timeout).verify([(answer, self.reference)])
        if verdict is None:  # no reference, or it cannot be read: nothing to retry against
            return None, 0.0, True, {"verdict": why}
        if verdict > 0:
            return None, 1.0, True, {"correct": True}
        return self.feedback.format(question=self.question), 0.0, False, {"correct": False}

    async def close(self) -> None:
        """Nothing to release."""


def env_reward(
    completions: list[Any], rollout_infos: list[dict[str, Any]] | None = None, **kwargs: Any
) -> list[float | None]:
    """The environment's total reward of each trajectory (``--multi_turn_scheduler gym``); None without one."""
    infos = rollout_infos or [{} for _ in completions]
    return [info.get("total_reward") if isinstance(info, dict) else None for info in infos]
