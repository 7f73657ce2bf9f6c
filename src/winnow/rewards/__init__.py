"""Rewards: the Reward protocol and the scorer that applies a run's rewards to groups.

(Built out by the rewards issue; this module holds the seam the pipeline calls.)
"""

from __future__ import annotations

from typing import Any, Protocol

from winnow.schema import Group


class Scorer(Protocol):
    """Applies every reward of a run to groups, filling each completion's ``scores`` and ``reward``."""

    async def score(self, groups: list[Group]) -> None: ...

    def describe(self) -> list[dict[str, Any]]: ...

    async def aclose(self) -> None: ...


def wants_rewards(config) -> bool:
    """Whether a run's options ask for any reward."""
    return bool(config.orm_model or config.prm_model or config.reward_funcs or config.reward_model)


def build_scorer(config) -> Scorer | None:
    """The scorer for a run's reward options, or None when it has none."""
    if not wants_rewards(config):
        return None
    from winnow.errors import ConfigError

    raise ConfigError("rewards (--orm_model/--prm_model/--reward_funcs) are not available in this build yet")
