"""The run's scorer: builds every reward a run's options name and applies them to groups.

Each completion gets one Score per reward under the reward's key, and ``reward``: the weighted sum
of the scores that are not None (None when every one is None). Rewards of a batch run
concurrently, none on the event loop: math verification in worker processes, reward models in
their own thread, plugin functions in threads.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from winnow import registry
from winnow.errors import ConfigError, RewardError
from winnow.rewards.base import ModelReward, Reward, Sample, adapt
from winnow.rewards.remote import RemoteReward, is_remote
from winnow.schema import Group


@dataclass
class RewardSlot:
    """One reward of a run: its key in ``Completion.scores``, its role and weight."""

    key: str
    role: str  # orm, prm, func, rm
    reward: Reward
    weight: float
    spec: str


def _looks_like_model(name: str) -> bool:
    return Path(name).expanduser().is_dir() or "/" in name or registry.REGISTRY.get("model", name) is not None


class RunScorer:
    """Applies a run's rewards to groups (the :class:`winnow.rewards.Scorer` the pipeline calls)."""

    def __init__(self, slots: list[RewardSlot]):
        self.slots = slots
        self.orm_key = next((s.key for s in slots if s.role == "orm"), None)
        self.prm_key = next((s.key for s in slots if s.role == "prm"), None)

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for s in self.slots:
            info = s.reward.describe() if hasattr(s.reward, "describe") else {}
            out.append({"key": s.key, "role": s.role, "spec": s.spec, "weight": s.weight, **info})
        return out

    async def score_samples(self, samples: list[Sample]) -> None:
        """Score samples in place: every reward at once, then the weighted combination. A score a sample
        already holds under a reward's key is kept (a search strategy scored its final answers with the PRM
        on the way); stage-2 caches hold none (their scores are dropped when read)."""
        todo = [[s for s in samples if slot.key not in s.completion.scores] for slot in self.slots]
        results = await asyncio.gather(*(self._run(slot, part) for slot, part in zip(self.slots, todo, strict=True)))
        for slot, part, scores in zip(self.slots, todo, results, strict=True):
            for sample, score in zip(part, scores, strict=True):
                sample.completion.scores[slot.key] = score
        for sample in samples:
            parts = [(slot.weight, sample.completion.scores[slot.key].value) for slot in self.slots]
            known = [w * v for w, v in parts if v is not None]
            sample.completion.reward = sum(known) if known else None

    async def score(self, groups: list[Group]) -> None:
        await self.score_samples([Sample(g.prompt, c) for g in groups for c in g.completions if not c.failed])

    def slot(self, key: str) -> RewardSlot:
        """The reward slot under ``key``."""
        return next(s for s in self.slots if s.key == key)

    async def score_with(self, key: str, samples: list[Sample]) -> list:
        """The scores of one reward (``key``) for samples, without storing them (search strategies score
        partial answers with the PRM this way)."""
        return await self._run(self.slot(key), samples)

    async def _run(self, slot: RewardSlot, samples: list[Sample]):
        if not samples:
            return []
        try:
            scores = await slot.reward.score(samples)
        except (RewardError, ConfigError):
            raise
        except Exception as e:
            raise RewardError(f"reward {slot.key} failed: {type(e).__name__}: {e}") from e
        if not isinstance(scores, list) or len(scores) != len(samples):
            got = len(scores) if isinstance(scores, list) else type(scores).__name__
            raise RewardError(f"reward {slot.key} returned {got} scores for {len(samples)} samples")
        return scores

    async def aclose(self) -> None:
        from winnow.rewards.builtin import close_verifiers

        for slot in self.slots:
            closer = getattr(slot.reward, "aclose", None)
            if closer is not None:
                await closer()
        await asyncio.to_thread(close_verifiers)


def _model_reward(spec: str, options: dict[str, Any], config, kind: str | None) -> Reward:
    from winnow.rewards.models import load_reward_model

    opts = {"device": config.device, "torch_dtype": config.torch_dtype, "prm_agg": config.prm_agg, **options}
    if kind is not None:
        opts.setdefault("kind", kind)
    if config.ray and config.ray_reward_workers:  # scored on replicas over the Ray cluster
        from winnow.runners.ray import ray_model_reward

        return ray_model_reward(Path(spec).name or spec, spec, opts, config)
    model = load_reward_model(spec, **opts)
    return ModelReward(Path(spec).name or spec, model)


def _named_reward(spec: str, role: str, config) -> Reward | None:
    entry = registry.get_entry(spec)
    if entry is None:
        return None
    kwargs = dict(config.reward_kwargs or {})
    own = kwargs.get(spec, kwargs.get(entry.name, {}))
    if not isinstance(own, dict):
        own = {}
    if entry.name == "json_schema" and getattr(config, "response_format", None):
        own = {"schema": config.response_format, **own}  # the run's own schema unless told otherwise
    flat = {k: v for k, v in kwargs.items() if not isinstance(v, dict)}
    obj = registry.build(entry, own, flat)
    return adapt(entry.name, obj, agg=config.prm_agg, args=own or None, swift_registered=entry.role in ("orm", "prm"))


def build_run_scorer(config) -> RunScorer:
    """The scorer for a run's --orm_model, --prm_model, --reward_funcs and --reward_model."""
    for path in config.external_plugins or []:
        registry.load_plugin(path)
    kwargs = config.reward_kwargs or {}
    wanted: list[tuple[str, str]] = []
    if config.orm_model:
        wanted.append(("orm", config.orm_model))
    if config.prm_model:
        wanted.append(("prm", config.prm_model))
    wanted += [("func", name) for name in config.reward_funcs or []]
    wanted += [("rm", name) for name in config.reward_model or []]
    weights = list(config.reward_weights or [])
    if weights and len(weights) != len(wanted):
        order = ", ".join(spec for _, spec in wanted)
        raise ConfigError(
            f"--reward_weights has {len(weights)} values for {len(wanted)} rewards ({order}); "
            "give one per reward, in the order orm, prm, reward_funcs..., reward_model..."
        )
    if (config.easy_query_threshold is not None or config.hard_query_threshold is not None) and not config.orm_model:
        raise ConfigError("--easy_query_threshold/--hard_query_threshold need --orm_model (they use its pass rate)")
    slots: list[RewardSlot] = []
    used: set[str] = set()
    for i, (role, spec) in enumerate(wanted):
        option_key = {"orm": "orm", "prm": "prm", "rm": "reward_model"}.get(role)
        named = _named_reward(spec, role, config)
        if named is not None:
            reward = named
        elif is_remote(spec) and role != "func":
            options = kwargs.get(option_key) or kwargs.get(spec) or {}
            reward = RemoteReward(spec, name=f"remote-{role}", **options)
        elif _looks_like_model(spec) and role != "func":
            options = kwargs.get(option_key) or kwargs.get(spec) or {}
            if not isinstance(options, dict):
                raise ConfigError(f"--reward_kwargs {option_key}: expected a JSON object of options")
            reward = _model_reward(spec, options, config, None)
        else:
            raise registry.unknown_reward(spec)
        key = reward.name
        n = 2
        while key in used:
            key, n = f"{reward.name}#{n}", n + 1
        used.add(key)
        slots.append(RewardSlot(key, role, reward, float(weights[i]) if weights else 1.0, spec))
    return RunScorer(slots)
