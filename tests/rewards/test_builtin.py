"""The built-in rewards (rewards/builtin.py) on fixed text: format, repetition, soft overlong, cosine."""

from __future__ import annotations

import asyncio
import math

import pytest

from tests.support.rewards import sample
from winnow.rewards.builtin import CosineReward, format_reward, repetition_reward, soft_overlong_reward


def test_format_repetition_soft_overlong():
    assert format_reward(
        ["<think>a</think>\n<answer>b</answer>", "<answer>b</answer>", "<think>a</think><answer>b</answer> extra"]
    ) == [1.0, 0.0, 0.0]
    rep = repetition_reward(["a b c a b c a b c", "one two three four", "hi"], n_grams=3)
    assert rep[0] == pytest.approx(-(1 - 3 / 7)) and rep[1] == 0.0 and rep[2] == 0.0
    assert soft_overlong_reward(
        ["x", "y", "z"], soft_max_length=100, soft_cache_length=20, completion_tokens=[70, 90, 100]
    ) == [0.0, -0.5, -1.0]


def test_cosine_follows_length_and_correctness():
    r = CosineReward(max_len=100, workers=0)
    scores = asyncio.run(
        r.score(
            [
                sample("\\boxed{5}", tokens=0 + 1),
                sample("\\boxed{5}", tokens=100),
                sample("\\boxed{6}", tokens=1),
                sample("\\boxed{6}", tokens=100),
                sample("\\boxed{5}", reference=None),
            ]
        )
    )
    values = [s.value for s in scores]
    assert values[0] == pytest.approx(CosineReward.cosfn(1, 100, 0.5, 1.0)) and values[0] > values[1]
    assert values[1] == pytest.approx(0.5)
    assert values[2] == pytest.approx(CosineReward.cosfn(1, 100, 0.0, -0.5)) and values[2] < values[3]
    assert values[3] == pytest.approx(0.0) and values[4] is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in values if v is not None)
