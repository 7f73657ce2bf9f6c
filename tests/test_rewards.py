"""Built-in rewards, math verification, calling-style adapters and the run scorer, on fixed text."""

from __future__ import annotations

import asyncio
import math
import threading

import pytest

from tests.support import PLUGINS
from tests.support.commands import run_winnow
from winnow import registry
from winnow.config import SampleConfig
from winnow.errors import ConfigError, RewardError
from winnow.rewards import build_scorer
from winnow.rewards.base import FunctionReward, Sample, adapt, to_score
from winnow.rewards.builtin import CosineReward, format_reward, repetition_reward, soft_overlong_reward
from winnow.rewards.mathverify import (
    MathVerifier,
    VerifyTimeout,
    answer_text,
    call_with_timeout,
    last_boxed,
    verify_answer,
)
from winnow.schema import Completion, Group, Prompt

PLUGIN = PLUGINS / "seed_prm.py"


def sample(text: str, reference: str | None = "5", tokens: int = 0, **columns) -> Sample:
    prompt = Prompt(id="r", messages=[{"role": "user", "content": "q"}], reference=reference, columns=columns)
    return Sample(prompt, Completion(text=text, completion_tokens=tokens))


def test_answer_extraction():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\sqrt{\\frac{a}{b}}} end") == "\\sqrt{\\frac{a}{b}}"
    assert last_boxed("\\boxed{cut off") is None
    assert answer_text("<think>x = 3</think><answer>4</answer>") == "4"


@pytest.mark.parametrize(
    "text,reference,expected",
    [
        ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("first \\boxed{3}, no wait: \\boxed{4}", "4", 1.0),
        ("first \\boxed{3}, no wait: \\boxed{4}", "3", 0.0),
        ("<think>hmm</think><answer>42</answer>", "#### 42", 1.0),
        ("Adding them we get 18", "Janet makes 9 * 2 = 18 dollars.\n#### 18", 1.0),
        ("The final answer is 17", "We get \\boxed{18}.", 0.0),
        ("I do not know", "7", 0.0),
        ("\\boxed{7}", "no number here at all", None),
        ("\\boxed{7}", None, None),
    ],
)
def test_verify_answer(text, reference, expected):
    value, _ = verify_answer(text, reference)
    assert value == expected


def test_timeout_works_off_the_main_thread():
    def spin():
        while True:
            pass

    caught = []

    def worker():
        try:
            call_with_timeout(spin, 0.2)
        except VerifyTimeout:
            caught.append("thread")

    t = threading.Thread(target=worker)
    t.start()
    t.join(10)
    assert caught == ["thread"]
    with pytest.raises(VerifyTimeout):
        call_with_timeout(spin, 0.2)  # main thread: the SIGALRM path
    assert call_with_timeout(lambda: 3, 0.2) == 3


def test_verifier_pool_matches_in_process():
    pairs = [("\\boxed{2}", "2"), ("\\boxed{3}", "2"), ("x", "abc"), ("\\boxed{\\frac{2}{4}}", "1/2")]
    in_process = MathVerifier(workers=0).verify_blocking(pairs)
    pool = MathVerifier(workers=1)
    try:
        assert pool.verify_blocking(pairs) == in_process
    finally:
        pool.close()
    assert [v for v, _ in in_process] == [1.0, 0.0, None, 1.0]


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


def test_unknown_reward_names_the_known_ones(tmp_path):
    cfg = SampleConfig(model="m", dataset=["d.jsonl"], orm_model="mth")
    with pytest.raises(ConfigError, match="Unknown reward 'mth'. Known: .*math.*--external_plugins"):
        build_scorer(cfg)


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


def test_list_rewards_cli():

    proc = run_winnow("list", "rewards")
    assert proc.returncode == 0, proc.stderr
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    for name in ("math", "format", "react_format", "cosine", "repetition", "soft_overlong", "judge", "code"):
        assert name in names
    assert "(aliases: accuracy)" in proc.stdout
