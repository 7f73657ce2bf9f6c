# ruff: noqa  (written as a user would, in the seed's own style)
"""The seed's plugin example (ms-swift docs, "自定义PRM或ORM"), as a user would write it for winnow.

CustomPRM scores each step by whether it contains a digit; the ORM says whether the reference
answer appears in the completion. Also a TRL-style reward function and an async one.
"""

from typing import List, Union

from winnow.rewards import InferRequest


class CustomPRM:
    # 构造需要是无参的
    def __init__(self):
        self.calls = 0

    def __call__(
        self, infer_requests: List[InferRequest], ground_truths: List[str], **kwargs
    ) -> List[Union[float, List[float]]]:
        self.calls += 1
        out = []
        for request in infer_requests:
            answer = request.messages[-1]["content"]
            assert request["messages"][-1]["role"] == "assistant"
            steps = [s for s in answer.split("\n\n") if s.strip()]
            out.append([1.0 if any(ch.isdigit() for ch in s) else 0.25 for s in steps] or 0.0)
        return out


class ContainsAnswerORM:
    def __init__(self):
        pass

    def __call__(self, infer_requests: List[InferRequest], ground_truths: List[str], **kwargs) -> List[float]:
        return [
            float(gt is not None and gt in r.messages[-1]["content"]) for r, gt in zip(infer_requests, ground_truths)
        ]


def length_bonus(completions, level=None, **kwargs):
    """TRL style: dataset columns arrive as keyword arguments."""
    return [None if lv is None else len(c) / 100 * lv for c, lv in zip(completions, level)]


async def async_const(completions, **kwargs):
    """An async TRL-style reward."""
    return [0.5 for _ in completions]


def short_by_one(completions, **kwargs):
    """A broken reward: one score too few."""
    return [1.0 for _ in completions][1:]


prms = {"custom": CustomPRM}
orms = {
    "contains": ContainsAnswerORM,
    "length_bonus": length_bonus,
    "async_const": async_const,
    "short_by_one": short_by_one,
}
