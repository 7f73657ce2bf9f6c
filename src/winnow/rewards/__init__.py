"""Rewards: the Reward protocol and the scorer that applies a run's rewards to groups.

See :mod:`winnow.rewards.base` for the contract and the accepted calling styles,
:mod:`winnow.rewards.builtin` for the built-in rewards, :mod:`winnow.rewards.models` for reward
models and :mod:`winnow.rewards.scorer` for how a run combines them. Nothing heavy is imported here.
"""

from __future__ import annotations

from typing import Any, Protocol

from winnow.rewards.base import InferRequest, Reward, Sample
from winnow.schema import Group, Score

__all__ = ["InferRequest", "Reward", "Sample", "Scorer", "build_scorer", "wants_rewards"]


class Scorer(Protocol):
    """Applies every reward of a run to groups, filling each completion's ``scores`` and ``reward``."""

    orm_key: str | None
    prm_key: str | None
    slots: list[Any]  # every reward of the run (each a :class:`winnow.rewards.scorer.RewardSlot`)

    async def score(self, groups: list[Group]) -> None: ...

    def slot(self, key: str) -> Any:
        """The reward under ``key`` with its role and weight (a :class:`winnow.rewards.scorer.RewardSlot`)."""
        ...

    async def score_with(self, key: str, samples: list[Sample]) -> list[Score]:
        """One reward's scores for samples, not stored (search strategies score partial answers)."""
        ...

    def describe(self) -> list[dict[str, Any]]: ...

    async def aclose(self) -> None: ...


def wants_rewards(config) -> bool:
    """Whether a run's options ask for any reward."""
    return bool(config.orm_model or config.prm_model or config.reward_funcs or config.reward_model)


def build_scorer(config) -> Scorer | None:
    """The scorer for a run's reward options, or None when it has none."""
    if not wants_rewards(config):
        return None
    from winnow.rewards.scorer import build_run_scorer

    return build_run_scorer(config)
