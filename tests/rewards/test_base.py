"""Rewards' calling styles (rewards/base.py): score shapes, and seed and TRL reward functions adapted."""

from __future__ import annotations

import asyncio

import pytest

from tests.support import PLUGINS
from tests.support.rewards import sample
from winnow import registry
from winnow.errors import RewardError
from winnow.rewards.base import FunctionReward, adapt, to_score

PLUGIN = PLUGINS / "seed_prm.py"


def test_to_score_shapes():
    assert to_score(None, "r").value is None
    assert to_score(True, "r").value == 1.0
    assert to_score(float("nan"), "r").value is None
    s = to_score([0.9, 0.4, 0.7], "r", agg="min")
    assert s.value == 0.4 and s.steps == [0.9, 0.4, 0.7]
    with pytest.raises(RewardError, match="reward r returned 'x'"):
        to_score("x", "r")


def test_seed_and_trl_plugins_are_adapted():
    registry.load_plugin(str(PLUGIN))
    samples = [sample("Step 1\n\n2 + 3 = 5", level=2), sample("no digits", level=None)]

    prm = FunctionReward("custom", registry.build(registry.get_entry("custom"), {}), agg="min")
    assert prm.style == "seed"
    scores = asyncio.run(prm.score(samples))
    assert scores[0].steps == [1.0, 1.0] and scores[1].steps == [0.25] and scores[1].value == 0.25

    orm = FunctionReward("contains", registry.build(registry.get_entry("contains"), {}))
    assert [s.value for s in asyncio.run(orm.score(samples))] == [1.0, 0.0]

    # a completions-style function in swift's orms table is called as swift calls ORMs: completions as strings
    swift_style = adapt("length_bonus", registry.build(registry.get_entry("length_bonus"), {}), swift_registered=True)
    assert swift_style.style == "swift"
    assert [s.value for s in asyncio.run(swift_style.score(samples))] == [
        pytest.approx(len("Step 1\n\n2 + 3 = 5") / 50),
        None,
    ]

    aconst = FunctionReward("async_const", registry.get_entry("async_const").target)
    assert [s.value for s in asyncio.run(aconst.score(samples))] == [0.5, 0.5]

    broken = FunctionReward("short_by_one", registry.get_entry("short_by_one").target)
    with pytest.raises(RewardError, match="reward short_by_one returned 1 scores for 2 samples"):
        asyncio.run(broken.score(samples))
