"""PRM-guided beam search and diverse verifier tree search (DVTS) over steps.

Both follow Hugging Face's search-and-learn (Beeching, Tunstall and Rush, "Scaling test-time compute
with open models", 2024; after Snell et al. 2024), with N = ``--num_return_sequences`` and M =
``--search_width``:

- **beam search** samples N first steps, keeps the N/M best open partial answers by the PRM's value
  (``--search_prm_agg``, the last step's score by default), samples M next steps from each, and so on
  until no partial answer is left open; the group is the N best finished answers.
- **DVTS** grows N/M independent subtrees: each samples M next steps from its one partial answer and
  keeps the best (a greedy beam of width M), until that one is finished; the group is the N/M answers,
  one per subtree. Subtrees are independent, so k of them estimate a DVTS of k x M.

Each step of every live partial answer of every prompt in the batch is one engine call; their values
are one PRM call.
"""

from __future__ import annotations

from typing import Any

from winnow.errors import ConfigError
from winnow.schema import Group, Prompt
from winnow.search.steps import Node, Stepper, Tree, rank


def _check_width(strategy: str, n: int, width: int) -> None:
    if n < width or n % width:
        raise ConfigError(
            f"--sampler_type {strategy}: N (--num_return_sequences {n}) must be a multiple of M "
            f"(--search_width {width}), e.g. --num_return_sequences {max(width, n - n % width)}"
        )


class _StepSearch:
    """The options beam search and DVTS share, and their manifest entry."""

    name = "step search"
    independent_samples = False

    def __init__(
        self,
        *,
        n: int = 4,
        search_width: int = 4,
        search_max_steps: int = 40,
        step_separator: str | None = None,
        search_lookahead: int = 0,
        search_prm_agg: str = "last",
        search_filter_duplicates: bool = False,
        **unused: Any,
    ):
        _check_width(self.name, n, search_width)
        self.unique = search_filter_duplicates
        self.n = n
        self.width = search_width
        self.max_steps = search_max_steps
        self.separator = step_separator
        self.lookahead = search_lookahead
        self.agg = search_prm_agg

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n": self.n,
            "search_width": self.width,
            "search_max_steps": self.max_steps,
            "step_separator": self.separator,
            "search_lookahead": self.lookahead,
            "search_prm_agg": self.agg,
            "search_filter_duplicates": self.unique,
            "independent_samples": self.independent_samples,
        }

    def sequences_per_prompt(self) -> int:
        return self.n

    def stepper(self, ctx: Any) -> Stepper:
        return Stepper(ctx, separator=self.separator, max_steps=self.max_steps, agg=self.agg, strategy=self.name)


class BeamSearch(_StepSearch):
    """PRM-guided beam search over steps: keep the N/M best partial answers, sample M next steps from each."""

    name = "beam"

    async def run(self, prompts: list[Prompt], ctx: Any) -> list[Group]:
        stepper = self.stepper(ctx)
        trees = [Tree(p, self.unique) for p in prompts]
        live: dict[int, list[Node]] = {id(t): [t.root] for t in trees}
        finished: dict[int, list[Node]] = {id(t): [] for t in trees}
        for step in range(self.max_steps):
            leaves = [(t, node) for t in trees for node in live[id(t)]]
            if not leaves:
                break
            grown = await stepper.expand(leaves, self.n if step == 0 else self.width)
            children: dict[int, list[Node]] = {id(t): [] for t in trees}
            for (tree, _), nodes in zip(leaves, grown, strict=True):
                children[id(tree)] += nodes
            await stepper.evaluate_ahead(
                [(t, c) for t in trees for c in children[id(t)] if c.ok], self.lookahead, greedy=True
            )
            for tree in trees:
                mine = children[id(tree)]
                finished[id(tree)] += [c for c in mine if c.ok and not c.open]
                kept = rank([c for c in mine if c.open])[: self.n // self.width]
                for c in kept:
                    c.kept = True
                live[id(tree)] = kept
        groups = []
        for tree in trees:
            best = rank(finished[id(tree)])[: self.n]
            groups.append(stepper.group(tree, best, self.describe(), [{"rank": r} for r in range(len(best))]))
        return groups


class DVTS(_StepSearch):
    """Diverse verifier tree search: N/M independent subtrees, each a greedy beam of width M."""

    name = "dvts"
    independent_samples = True

    async def run(self, prompts: list[Prompt], ctx: Any) -> list[Group]:
        stepper = self.stepper(ctx)
        trees = [Tree(p, self.unique) for p in prompts]
        subtrees = self.n // self.width
        tips: dict[tuple[int, int], Node] = {(i, j): t.root for i, t in enumerate(trees) for j in range(subtrees)}
        answers: dict[tuple[int, int], Node] = {}
        for _ in range(self.max_steps):
            if not tips:
                break
            keys = list(tips)
            grown = await stepper.expand(
                [(trees[i], tips[(i, j)]) for i, j in keys], self.width, branches=[j for _, j in keys]
            )
            await stepper.evaluate_ahead(
                [(trees[i], c) for (i, _), nodes in zip(keys, grown, strict=True) for c in nodes if c.ok],
                self.lookahead,
                greedy=True,
            )
            for key, nodes in zip(keys, grown, strict=True):
                usable = [c for c in nodes if c.ok]
                del tips[key]
                if not usable:  # every step of this subtree failed: it ends without an answer
                    continue
                best = rank(usable)[0]
                best.kept = True
                if best.open:
                    tips[key] = best
                else:
                    answers[key] = best
        groups = []
        for i, tree in enumerate(trees):
            mine = [(j, answers[(i, j)]) for j in range(subtrees) if (i, j) in answers]
            groups.append(
                stepper.group(tree, [node for _, node in mine], self.describe(), [{"subtree": j} for j, _ in mine])
            )
        return groups
