"""Monte Carlo tree search over steps, valued by a PRM.

Each simulation of each prompt's tree (all prompts of a batch step in lock-step, so one engine call
serves them all):

1. **selection**: from the root, descend to the child with the highest UCT score
   ``Q + c * sqrt(ln N(parent) / N(child))`` (Kocsis and Szepesvari 2006; ``c`` is
   ``--mcts_exploration``, Q the mean value backed up through the child) until a node without children;
2. **expansion**: sample M (``--search_width``) next steps from it; a finished answer is not expanded:
   its value is backed up again;
3. **evaluation**: each new step's value is the PRM's (``--search_prm_agg`` of its step scores), or, with
   ``--mcts_rollout_depth`` D, that of a sampled continuation D steps further (to the end of the answer
   when D reaches ``--search_max_steps``; a rollout that finishes is a candidate answer too);
4. **backup**: each new node's value is added to it and to every node above it, one visit each.

After ``--mcts_iterations`` simulations (default N) the answer is the most visited path, finished with
one sample if it is still open; the group is that answer first, then the other finished answers the
search met (its terminal nodes and finished rollouts), best value first, N at most.
"""

from __future__ import annotations

import math
from typing import Any

from winnow.schema import Group, Prompt
from winnow.search.steps import Node, Stepper, Tree, rank


def uct(node: Node, parent_visits: int, c: float) -> float:
    """The UCT score of a visited child."""
    return node.total / node.visits + c * math.sqrt(math.log(max(parent_visits, 1)) / node.visits)


def select(root: Node, c: float) -> Node:
    """The leaf a simulation expands: the highest-UCT usable child at each level (the first on ties)."""
    node = root
    while node.open:
        usable = [child for child in node.children if child.ok and child.visits]
        if not usable:
            break
        node = max(usable, key=lambda child: uct(child, node.visits, c))
    return node


def backup(node: Node, value: float) -> None:
    """One visit with ``value`` for the node and every node above it."""
    at: Node | None = node
    while at is not None:
        at.visits += 1
        at.total += value
        at = at.parent


def most_visited(root: Node) -> Node:
    """The end of the most visited path (the higher mean value on equal visits, then the first)."""
    node = root
    while True:
        usable = [child for child in node.children if child.ok and child.visits]
        if not usable:
            return node
        node = max(usable, key=lambda child: (child.visits, child.total / child.visits))


class MCTS:
    """Monte Carlo tree search over steps: UCT selection on PRM values, expansion by M sampled next steps."""

    name = "mcts"
    independent_samples = False

    def __init__(
        self,
        *,
        n: int = 4,
        search_width: int = 4,
        search_max_steps: int = 40,
        step_separator: str | None = None,
        search_prm_agg: str = "last",
        mcts_iterations: int | None = None,
        mcts_exploration: float = 1.414,
        mcts_rollout_depth: int = 0,
        search_filter_duplicates: bool = False,
        **unused: Any,
    ):
        self.n = n
        self.unique = search_filter_duplicates
        self.width = search_width
        self.max_steps = search_max_steps
        self.separator = step_separator
        self.agg = search_prm_agg
        self.iterations = mcts_iterations or n
        self.c = mcts_exploration
        self.rollout = mcts_rollout_depth

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n": self.n,
            "search_width": self.width,
            "search_max_steps": self.max_steps,
            "step_separator": self.separator,
            "search_prm_agg": self.agg,
            "mcts_iterations": self.iterations,
            "mcts_exploration": self.c,
            "mcts_rollout_depth": self.rollout,
            "search_filter_duplicates": self.unique,
            "independent_samples": self.independent_samples,
        }

    def sequences_per_prompt(self) -> int:
        return self.width

    async def run(self, prompts: list[Prompt], ctx: Any) -> list[Group]:
        stepper = Stepper(ctx, separator=self.separator, max_steps=self.max_steps, agg=self.agg, strategy=self.name)
        trees = [Tree(p, self.unique) for p in prompts]
        finished: dict[int, list[Node]] = {id(t): [] for t in trees}
        for _ in range(self.iterations):
            leaves = []
            for tree in trees:
                leaf = select(tree.root, self.c)
                if leaf.open:
                    leaves.append((tree, leaf))
                else:  # a finished answer: its value again
                    backup(leaf, leaf.value or 0.0)
            if not leaves:
                continue
            grown = await stepper.expand(leaves, self.width)
            new = [
                (tree, child)
                for (tree, _), children in zip(leaves, grown, strict=True)
                for child in children
                if child.ok
            ]
            tips = await stepper.evaluate_ahead(new, self.rollout, greedy=False)
            for (tree, child), tip in zip(new, tips, strict=True):
                if not tip.open and tip.ok:
                    finished[id(tree)].append(tip)
                backup(child, child.value or 0.0)
        chosen = {id(t): most_visited(t.root) for t in trees}
        unfinished = [(t, chosen[id(t)]) for t in trees if chosen[id(t)].open]
        if unfinished:  # the most visited path is still open: finish it with one sample
            tips = await stepper.roll(unfinished, self.max_steps, greedy=False)
            await stepper.evaluate([(t, tip) for (t, _), tip in zip(unfinished, tips, strict=True)])
            for (tree, _), tip in zip(unfinished, tips, strict=True):
                chosen[id(tree)] = tip
        groups = []
        for tree in trees:
            pick = chosen[id(tree)]
            others, seen = [], {pick.answer()}
            for node in rank(finished[id(tree)]):
                if node.answer() not in seen:
                    seen.add(node.answer())
                    others.append(node)
            finals = ([pick] if pick.ok and not pick.open else []) + others[: self.n - 1]
            groups.append(
                stepper.group(
                    tree,
                    finals,
                    self.describe(),
                    [
                        {"chosen": node is pick, "visits": (node.visits if not node.detached else None)}
                        for node in finals
                    ],
                )
            )
        return groups
