"""A scripted engine and PRM whose search tree is known, for the strategies' tests."""

from __future__ import annotations

from winnow.rewards.scorer import RewardSlot, RunScorer
from winnow.schema import FINISH_STOP, Completion, Prompt, SamplingParams, Score
from winnow.search import SearchContext

SEP = "\n"


class ScriptedEngine:
    """Writes steps from a script: ``script(prefix, n, call) -> [step texts]``; a step ends the answer when
    the separator is not among the stop strings (the last allowed depth), or when the script marks it
    with a trailing ``"$"``. Records each call's prompts and params."""

    name = "scripted"

    def __init__(self, script):
        self.script = script
        self.calls: list[tuple[list[str], SamplingParams]] = []

    async def generate(self, prompts, params):
        self.calls.append(([p.prefix or "" for p in prompts], params))
        out = []
        for p in prompts:
            completions = []
            for text in self.script(p.prefix or "", params.n, len(self.calls)):
                ends = text.endswith("$") or SEP not in params.stop
                completions.append(
                    Completion(
                        text=text.rstrip("$"),
                        finish_reason=FINISH_STOP,
                        prompt_tokens=5,
                        completion_tokens=len(text.rstrip("$")),
                        stop_string=None if ends else SEP,
                    )
                )
            out.append(completions)
        return out

    def batch_plan(self, n):
        return 8, 1

    def describe(self):
        return {"name": self.name}

    async def aclose(self):
        pass


class ScriptedPRM:
    """A step's score is ``values[step]`` (else 0.5); a partial answer gets one score per step."""

    name = "prm"

    def __init__(self, values: dict[str, float]):
        self.values = values
        self.calls = 0

    async def score(self, samples):
        self.calls += 1
        out = []
        for s in samples:
            steps = [self.values.get(step, 0.5) for step in s.text.split(SEP) if step]
            out.append(Score(value=min(steps) if steps else None, steps=steps))
        return out


def context(engine, values, n, stop=()):
    scorer = RunScorer([RewardSlot("prm", "prm", ScriptedPRM(values), 1.0, "prm")])
    return SearchContext(engine, SamplingParams(n=n, max_new_tokens=None, stop=list(stop)), scorer)


def prompts(k: int = 1) -> list[Prompt]:
    return [Prompt(id=f"p{i}", messages=[{"role": "user", "content": f"problem {i}"}]) for i in range(k)]
