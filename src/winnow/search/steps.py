"""What the step-wise searches (beam search, DVTS, MCTS) share.

Each prompt's search is a :class:`Tree` of steps. A step is what the engine writes when asked to
continue the partial answer (``Prompt.prefix``) until the step separator; it keeps its separator, so
the steps of a path join back into the answer exactly. A step ends the answer when the engine stopped
otherwise (end of sequence, a ``--stop_words`` string, the token limit), and the step at the last
allowed depth is generated to the end of the answer.

:class:`Stepper` does the work every search needs, for all prompts of a batch at once: one engine call
expands every live node of every tree (:meth:`Stepper.expand`), one PRM call values them
(:meth:`Stepper.evaluate`), rolled-out continuations (lookahead, MCTS rollouts) are detached nodes of
the same tree, and :meth:`Stepper.group` turns the finished answers into an ordinary group with each
answer's path, the whole tree (``trace``) and what the search spent (``compute``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from winnow.engines import check_aligned
from winnow.errors import ConfigError
from winnow.rewards.base import Sample, SplitsSteps
from winnow.rewards.models import aggregate_steps
from winnow.schema import FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, Completion, Group, Prompt, SamplingParams, Score

DEFAULT_SEPARATOR = "\n\n"
DUPLICATE = "duplicate"
COMPUTE_KEYS = ("completion_tokens", "prompt_tokens", "engine_calls", "prm_evaluations", "prm_steps")


@dataclass(eq=False)
class Node:
    """One step of a partial answer (the root is the empty answer). ``score`` is the PRM's score of the path
    up to here; ``value`` is what the search ranks by (``--search_prm_agg`` of its step scores, or of a
    lookahead's or rollout's). ``detached`` nodes (lookahead and rollout steps) are not children of their
    parent: the search does not select them."""

    id: int
    parent: Node | None = None
    text: str = ""
    tokens: int = 0
    depth: int = 0
    path_tokens: int = 0
    end: str | None = None  # None: the answer goes on; else stop, length, error or duplicate
    error: str | None = None
    detached: bool = False
    score: Score | None = None
    value: float | None = None
    children: list[Node] = field(default_factory=list)
    kept: bool = False  # survived a beam's pruning, or chosen by its DVTS subtree
    branch: int | None = None  # DVTS: the subtree it grew in
    visits: int = 0  # MCTS
    total: float = 0.0  # MCTS: the sum of the values backed up through this node

    @property
    def open(self) -> bool:
        """The answer goes on from here."""
        return self.end is None

    @property
    def ok(self) -> bool:
        """A usable step (not a failed engine call, nor a copy of a partial answer the tree holds already)."""
        return self.end not in (FINISH_ERROR, DUPLICATE)

    def path(self) -> list[Node]:
        """The steps from the first to this one."""
        out: list[Node] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            out.append(node)
            node = node.parent
        return out[::-1]

    def answer(self) -> str:
        """The partial (or finished) answer this node ends."""
        return "".join(n.text for n in self.path())

    def step_score(self) -> float | None:
        """The PRM's score of this node's own step (its path's last step)."""
        if self.score is None:
            return None
        return self.score.steps[-1] if self.score.steps else self.score.value

    def describe(self) -> dict[str, Any]:
        """The node as the group's trace shows it."""
        out: dict[str, Any] = {
            "id": self.id,
            "parent": self.parent.id if self.parent else None,
            "depth": self.depth,
            "text": self.text,
            "tokens": self.tokens,
            "score": _round(self.step_score()),
            "value": _round(self.value),
        }
        if self.end is not None:
            out["end"] = self.end
        if self.error:
            out["error"] = self.error
        if self.detached:
            out["detached"] = True
        if self.kept:
            out["kept"] = True
        if self.branch is not None:
            out["subtree"] = self.branch
        if self.visits:
            out.update(visits=self.visits, q=_round(self.total / self.visits))
        return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


class Tree:
    """One prompt's search: the root (the empty answer), every node, and what it cost."""

    def __init__(self, prompt: Prompt, unique: bool = False):
        self.prompt = prompt
        self.root = Node(0)
        self.nodes: list[Node] = [self.root]
        self.unique = unique  # a step that repeats a partial answer of the tree is a duplicate, not a child
        self.answers: dict[tuple[int | None, str], Node] = {}
        self.compute: dict[str, int] = dict.fromkeys(COMPUTE_KEYS, 0)
        self.prompt_tokens = 0  # of the prompt alone (the first call's)

    def add(
        self,
        parent: Node,
        completion: Completion,
        separator: str,
        detached: bool,
        budget: int | None,
        branch: int | None = None,
    ) -> Node:
        """A child of ``parent`` from one engine completion (in DVTS subtree ``branch``, within which
        duplicates are told apart)."""
        node = Node(
            len(self.nodes),
            parent,
            depth=parent.depth + 1,
            detached=detached,
            branch=branch,
            tokens=completion.completion_tokens,
        )
        node.path_tokens = parent.path_tokens + node.tokens
        if completion.failed:
            node.end, node.error = FINISH_ERROR, completion.error or f"finish reason {completion.finish_reason}"
        elif completion.stop_string == separator:
            node.text = completion.text + separator
            if budget is not None and node.path_tokens >= budget:
                node.end = FINISH_LENGTH  # the whole answer's --max_new_tokens is spent
        else:  # the end of the answer, another stop string, or the token limit
            node.text = completion.text
            node.end = FINISH_LENGTH if completion.finish_reason == FINISH_LENGTH else FINISH_STOP
        self.nodes.append(node)
        if detached:
            return node
        if self.unique and node.ok:
            answer = (branch, node.answer())
            if answer in self.answers:
                node.end = DUPLICATE
                return node
            self.answers[answer] = node
        parent.children.append(node)
        return node

    def count(self, name: str, value: int = 1) -> None:
        self.compute[name] += value


class Stepper:
    """Batched step generation and PRM valuation for the searches of a batch of prompts."""

    def __init__(self, ctx: Any, *, separator: str | None, max_steps: int, agg: str, strategy: str):
        scorer = ctx.scorer
        if scorer is None or scorer.prm_key is None:
            raise ConfigError(
                f"--sampler_type {strategy} needs a process reward model to guide it: give "
                "--prm_model (e.g. --prm_model demo-prm)"
            )
        self.ctx = ctx
        self.prm_key: str = scorer.prm_key
        prm = scorer.slot(self.prm_key).reward
        own = prm.step_separator if isinstance(prm, SplitsSteps) else None
        self.separator = separator or own or DEFAULT_SEPARATOR
        self.max_steps = max_steps
        self.agg = agg
        self.budget = ctx.params.max_new_tokens

    def describe(self) -> dict[str, Any]:
        """What the manifest records of how steps are made and valued."""
        return {"step_separator": self.separator, "prm": self.prm_key}

    # ------------------------------------------------------------------ generation

    def _params(self, n: int, finish: bool, greedy: bool = False) -> SamplingParams:
        base = self.ctx.params
        stop = list(base.stop) if finish else [self.separator, *base.stop]
        params = dataclasses.replace(base, n=n, stop=stop)
        return dataclasses.replace(params, temperature=0.0) if greedy else params

    async def expand(
        self,
        leaves: Sequence[tuple[Tree, Node]],
        n: int,
        *,
        detached: bool = False,
        greedy: bool = False,
        to_end: bool = False,
        branches: Sequence[int | None] | None = None,
    ) -> list[list[Node]]:
        """``n`` next steps of every leaf, aligned with ``leaves``: one engine call for all the leaves that go
        on stepping and one for those generated to the end of the answer (at the last allowed depth, or all of
        them with ``to_end``). ``branches``: the DVTS subtree of each leaf."""
        out: list[list[Node]] = [[] for _ in leaves]
        for finish in (False, True):
            todo = [i for i, (_, node) in enumerate(leaves) if (to_end or node.depth + 1 >= self.max_steps) == finish]
            if not todo:
                continue
            prompts = [dataclasses.replace(leaves[i][0].prompt, prefix=leaves[i][1].answer()) for i in todo]
            params = self._params(n, finish, greedy)
            results = await self.ctx.engine.generate(prompts, params)
            check_aligned(self.ctx.engine, prompts, n, results)
            self.ctx.count("engine_calls")
            seen: set[int] = set()
            for i, completions in zip(todo, results, strict=True):
                tree, node = leaves[i]
                if id(tree) not in seen:  # one call, however many of its nodes it held
                    seen.add(id(tree))
                    tree.count("engine_calls")
                for c in completions:
                    tree.count("completion_tokens", c.completion_tokens)
                    tree.count("prompt_tokens", c.prompt_tokens)
                    if node.parent is None and not tree.prompt_tokens:
                        tree.prompt_tokens = c.prompt_tokens
                    self.ctx.count("completion_tokens", c.completion_tokens)
                    self.ctx.count("prompt_tokens", c.prompt_tokens)
                    out[i].append(
                        tree.add(
                            node,
                            c,
                            self.separator,
                            detached,
                            self.budget,
                            branches[i] if branches is not None else node.branch,
                        )
                    )
        return out

    async def roll(self, items: Sequence[tuple[Tree, Node]], steps: int, *, greedy: bool) -> list[Node]:
        """Each open node continued by up to ``steps`` more steps (one sample each, detached from the tree),
        batched step by step, or to the end of the answer in one call when ``steps`` reaches
        ``--search_max_steps``; the last node of each continuation (the node itself when it ended already)."""
        tips = [node for _, node in items]
        to_end = steps >= self.max_steps
        for _ in range(1 if to_end else steps):
            live = [i for i, tip in enumerate(tips) if tip.open]
            if not live:
                break
            grown = await self.expand(
                [(items[i][0], tips[i]) for i in live], 1, detached=True, greedy=greedy, to_end=to_end
            )
            for i, (child,) in zip(live, grown, strict=True):
                tips[i] = child
        return tips

    # ------------------------------------------------------------------ valuation

    async def evaluate(self, items: Sequence[tuple[Tree, Node]]) -> None:
        """The PRM's score of each node's partial answer (one call for all), and its value."""
        todo = [(tree, node) for tree, node in items if node.ok and node.score is None]
        if not todo:
            return
        samples = [Sample(tree.prompt, Completion(text=node.answer())) for tree, node in todo]
        scores = await self.ctx.scorer.score_with(self.prm_key, samples)
        self.ctx.count("prm_calls")
        for (tree, node), score in zip(todo, scores, strict=True):
            steps = len(score.steps) if score.steps is not None else 1
            tree.count("prm_evaluations")
            tree.count("prm_steps", steps)
            self.ctx.count("prm_evaluations")
            self.ctx.count("prm_steps", steps)
            node.score = score
            node.value = self.value_of(score)

    def value_of(self, score: Score) -> float | None:
        """What the search ranks a partial answer by: ``--search_prm_agg`` of its step scores."""
        if score.steps:
            return aggregate_steps(score.steps, self.agg)
        return score.value

    async def evaluate_ahead(self, items: Sequence[tuple[Tree, Node]], steps: int, *, greedy: bool) -> list[Node]:
        """Value each open node by its continuation ``steps`` further (a lookahead, or an MCTS rollout); a node
        that ended is valued itself. Returns the continuations' last nodes (finished answers among them)."""
        tips = await self.roll(items, steps, greedy=greedy) if steps else [node for _, node in items]
        await self.evaluate([(tree, tip) for (tree, _), tip in zip(items, tips, strict=True)])
        for (_, node), tip in zip(items, tips, strict=True):
            if tip is not node:
                node.value = tip.value
        return tips

    # ------------------------------------------------------------------ the group

    def completion(self, tree: Tree, node: Node, **trace: Any) -> Completion:
        """A finished answer as an ordinary completion: its text, the tokens of its path, its PRM score (the
        run's scorer keeps it) and its path in ``trace``."""
        path = node.path()
        c = Completion(
            text=node.answer(),
            finish_reason=FINISH_LENGTH if node.end == FINISH_LENGTH else FINISH_STOP,
            prompt_tokens=tree.prompt_tokens,
            completion_tokens=node.path_tokens,
        )
        if node.score is not None:
            c.scores[self.prm_key] = node.score
        c.trace = {
            "node": node.id,
            "value": _round(node.value),
            "steps": [{"id": n.id, "score": _round(n.step_score())} for n in path],
            **trace,
        }
        return c

    def group(
        self, tree: Tree, finals: Sequence[Node], strategy: dict[str, Any], trace: Sequence[dict[str, Any]] = ()
    ) -> Group:
        """The prompt's group: its finished answers (their order is the search's ranking), what it spent and
        its tree. Without any finished answer, one failed completion says why."""
        completions = [
            self.completion(tree, node, **extra)
            for node, extra in zip(finals, list(trace) or [{}] * len(finals), strict=True)
        ]
        if not completions:
            errors = sorted({n.error for n in tree.nodes if n.error})
            completions = [
                Completion(
                    text="",
                    finish_reason=FINISH_ERROR,
                    prompt_tokens=tree.prompt_tokens,
                    error="the search finished no answer" + (": " + "; ".join(errors)[:500] if errors else ""),
                )
            ]
        return Group(
            tree.prompt,
            completions,
            compute=dict(tree.compute),
            trace={**strategy, **self.describe(), "nodes": [n.describe() for n in tree.nodes[1:]]},
        )


def rank(nodes: Sequence[Node]) -> list[Node]:
    """Highest value first; on equal values the higher score of the node's own step (with ``min`` the siblings
    of a weak prefix all share its value: their own steps still differ); an unvalued node last; then the order
    they were generated in."""

    def key(node: Node) -> tuple:
        own = node.step_score()
        return node.value is None, -(node.value or 0.0), own is None, -(own or 0.0)

    return sorted(nodes, key=key)
