"""A winnow multi-turn scheduler with a calculator, for the demo arithmetic task (docs/multiturn.md).

The demo policy writes one step per line (``48 - 7 = 31``) and was never trained to call tools or to
read feedback. This scheduler checks each step of its answer with the ``calculator`` tool; at the
first wrong result it rewrites that line with the right value, cuts the answer there, and lets the
model continue from the corrected line (the next turn continues the same assistant message). An
answer whose every line checks out ends the trajectory.

    winnow sample --model demo-policy --dataset demo-arith#200 --num_return_sequences 4 \
        --external_plugins docs/examples/calculator_check.py --multi_turn_scheduler calculator_check \
        --max_turns 4 --orm_model math
"""

import re

from winnow.multiturn import Trajectory, TurnResult
from winnow.multiturn.tools import calculator
from winnow.registry import scheduler

STEP = re.compile(r"^\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")


@scheduler("calculator_check")
class CalculatorCheck:
    """Checks each 'a op b = c' line with the calculator; the first wrong one is corrected and the model goes on."""

    async def step(self, trajectory: Trajectory) -> TurnResult:
        answer = trajectory.messages[-1]  # the reply, appended to the answer so far
        text = answer["content"] or ""
        start = trajectory.state.get("checked", 0)  # the corrected part written by an earlier turn
        at = start
        for line in text[start:].splitlines(keepends=True):
            step = STEP.match(line)
            if step:
                a, op, b, claimed = step.groups()
                right = calculator(f"{a} {op} {b}")
                if right != str(int(claimed)):
                    if trajectory.last_turn:  # no turn left to continue: the answer stays as the model wrote it
                        return TurnResult(info={"wrong": f"{a} {op} {b} = {claimed}"})
                    answer["content"] = text[:at] + f"{a} {op} {b} = {right}\n"  # the model continues after it
                    trajectory.state["checked"] = len(answer["content"])
                    return TurnResult(info={"corrected": f"{a} {op} {b} = {claimed} -> {right}"})
            at += len(line)
        return TurnResult(done=True)
