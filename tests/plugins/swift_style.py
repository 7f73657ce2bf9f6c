"""A plugin written for ms-swift, as its users write them: swift's imports, registered into swift's dicts."""

from typing import List

from swift.plugin import ORM, orms
from swift.rewards import PRM, prms


class HasDigit(ORM):
    """1.0 when the completion contains a digit, else 0.0."""

    def __call__(self, completions, **kwargs) -> List[float]:
        return [float(any(ch.isdigit() for ch in c)) for c in completions]


class StepLength(PRM):
    """One score per step: shorter steps score higher."""

    def __call__(self, infer_requests, ground_truths, **kwargs):
        out = []
        for req in infer_requests:
            text = req.messages[-1]["content"]
            out.append([1.0 / (1 + len(step)) for step in text.split("\n\n")])
        return out


orms["has_digit"] = HasDigit
prms["step_len"] = StepLength
