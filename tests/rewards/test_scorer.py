"""The run scorer (rewards/scorer.py): reward options and weights."""

from __future__ import annotations

import asyncio

import pytest

from winnow.config import SampleConfig
from winnow.errors import ConfigError
from winnow.rewards import build_scorer
from winnow.schema import Completion, Group, Prompt


def test_reward_options_and_weights():
    cfg = SampleConfig(model="m", dataset=["d"], reward_funcs=["repetition", "format"], reward_weights=[2.0])
    with pytest.raises(ConfigError, match="--reward_weights has 1 values for 2 rewards"):
        build_scorer(cfg)
    cfg = SampleConfig(model="m", dataset=["d"], reward_funcs=["soft_overlong"])
    with pytest.raises(ConfigError, match="soft_overlong needs soft_max_length"):
        build_scorer(cfg)
    cfg = SampleConfig(model="m", dataset=["d"], reward_funcs=["repetition"], reward_kwargs={"repetition": {"nope": 1}})
    with pytest.raises(ConfigError, match="unknown option"):
        build_scorer(cfg)
    # per-reward options and swift's flat names; weights combine the scores
    cfg = SampleConfig(
        model="m",
        dataset=["d"],
        reward_funcs=["repetition", "format"],
        reward_weights=[2.0, 0.5],
        reward_kwargs={"repetition": {"max_penalty": -0.5}, "repetition_n_grams": 2},
    )
    scorer = build_scorer(cfg)
    g = Group(
        Prompt(id="r", messages=[{"role": "user", "content": "q"}]),
        [Completion(text="a b a b a b"), Completion(text="<think>t</think><answer>a</answer>")],
    )
    asyncio.run(scorer.score([g]))
    rep = -(1 - 2 / 5) * 0.5  # bigrams: ab ba ab ba ab -> 2 unique of 5
    assert g.completions[0].scores["repetition"].value == pytest.approx(rep)
    assert g.completions[0].reward == pytest.approx(2.0 * rep)
    assert g.completions[1].reward == pytest.approx(0.5)
    assert [d["key"] for d in scorer.describe()] == ["repetition", "format"]
