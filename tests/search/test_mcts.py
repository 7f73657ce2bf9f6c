"""MCTS (search/mcts.py) on a scripted engine and PRM: visit counts, UCT, rollouts."""

from __future__ import annotations

import asyncio
import math

import pytest

from tests.support.search import SEP, ScriptedEngine, context, prompts
from winnow.search.mcts import MCTS, uct

TREE = {
    "": ["A", "B"],
    "A\n": ["AA", "AB"],
    "B\n": ["BA", "BB"],
    "B\nBA\n": ["BAA", "BAB"],
    "A\nAA\n": ["AAA", "AAB"],
    "A\nAB\n": ["ABA", "ABB"],
    "B\nBB\n": ["BBA", "BBB"],
}

TREE_VALUES = {
    "A": 0.9,
    "B": 0.5,
    "AA": 0.2,
    "AB": 0.4,
    "BA": 0.8,
    "BB": 0.7,
    "BAA": 0.95,
    "BAB": 0.3,
    "AAA": 0.1,
    "AAB": 0.1,
    "ABA": 0.6,
    "ABB": 0.6,
    "BBA": 0.5,
    "BBB": 0.5,
}


def reference_mcts(iterations: int, c: float) -> dict[str, int]:
    """UCT on TREE by hand: visit counts by node name (each expansion backs up both children's values)."""
    visits: dict[str, int] = {"": 0}
    total: dict[str, float] = {"": 0.0}
    children: dict[str, list[str]] = {}
    for _ in range(iterations):
        path, node = [""], ""
        while node in children:
            parent = node
            node = max(
                children[parent],
                key=lambda ch: total[ch] / visits[ch] + c * math.sqrt(math.log(visits[parent]) / visits[ch]),
            )
            path.append(node)
        key = "".join(name + SEP for name in path[1:])
        kids = TREE.get(key)
        if not kids:  # a finished answer: its value again
            for name in path:
                visits[name] += 1
                total[name] += TREE_VALUES[path[-1]]
            continue
        children[node] = kids
        for kid in kids:
            visits[kid], total[kid] = 1, TREE_VALUES[kid]
            for name in path:
                visits[name] += 1
                total[name] += TREE_VALUES[kid]
    return visits


def test_mcts_visit_counts_follow_uct_on_a_known_tree():
    def script(prefix, n, call):
        kids = TREE[prefix]
        return [k + ("$" if len(k) == 3 else "") for k in kids][:n]

    engine = ScriptedEngine(script)
    mcts = MCTS(step_separator=SEP, n=4, search_width=2, search_max_steps=3, mcts_iterations=6, mcts_exploration=1.0)
    (group,) = asyncio.run(mcts.run(prompts(1), context(engine, TREE_VALUES, 4)))
    nodes = group.trace["nodes"]
    by_path = {}
    for n in nodes:
        names, at = [], n
        while at is not None:
            names.append(at["text"].strip())
            at = next((m for m in nodes if m["id"] == at["parent"]), None)
        by_path[names[0]] = n
    expected = reference_mcts(6, 1.0)
    assert {name: by_path[name]["visits"] for name in expected if name} == {k: v for k, v in expected.items() if k}
    # by hand, for the first four: A and B; A (UCT 1.73 > 1.33); B (1.68 > 1.18); B then BA (1.85 > 1.75)
    assert [prefixes[0] for prefixes, _ in engine.calls[:4]] == ["", "A\n", "B\n", "B\nBA\n"]
    # the answer follows the most visited child at each level
    chosen = group.completions[0]
    top = max(("A", "B"), key=lambda k: expected[k])
    second = max(TREE[top + SEP], key=lambda k: expected.get(k, 0))
    assert chosen.trace["chosen"] is True and chosen.text.startswith(f"{top}\n{second}\n")
    finished = {n["id"] for n in nodes if n.get("end") == "stop"}
    assert {c.trace["node"] for c in group.completions[1:]} <= finished


def test_uct_is_mean_value_plus_the_exploration_bonus():
    from winnow.search.steps import Node

    node = Node(1, visits=2, total=1.0)
    assert uct(node, 8, 1.0) == pytest.approx(0.5 + math.sqrt(math.log(8) / 2))
    assert uct(node, 8, 0.0) == pytest.approx(0.5)


def test_mcts_rollouts_value_a_node_by_a_sampled_continuation():
    def script(prefix, n, call):
        depth = prefix.count(SEP)
        return [f"d{depth}" + ("$" if depth >= 2 else "")] * n

    engine = ScriptedEngine(script)
    values = {"d0": 0.9, "d1": 0.9, "d2": 0.1}
    mcts = MCTS(step_separator=SEP, n=2, search_width=1, search_max_steps=5, mcts_iterations=1, mcts_rollout_depth=2)
    (group,) = asyncio.run(mcts.run(prompts(1), context(engine, values, 2)))
    first = next(n for n in group.trace["nodes"] if n["depth"] == 1 and not n.get("detached"))
    assert first["value"] == pytest.approx(0.1)  # the rollout's last step (search_prm_agg last), not its own 0.9
    rolled = [n for n in group.trace["nodes"] if n.get("detached")]
    assert [n["text"] for n in rolled][:2] == ["d1\n", "d2"]
    # the answer: the most visited path (d0) finished with one sample; then the rollout, which finished too
    assert [c.text for c in group.completions] == ["d0\nd1", "d0\nd1\nd2"]
    assert [c.trace["chosen"] for c in group.completions] == [True, False]
