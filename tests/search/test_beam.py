"""Beam search and DVTS (search/beam.py) on a scripted engine and a scripted PRM, where the exact tree is
known.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.support.search import SEP, ScriptedEngine, context, prompts
from winnow.errors import ConfigError
from winnow.schema import SamplingParams
from winnow.search import SearchContext
from winnow.search.beam import DVTS, BeamSearch


def counter_script(depth: int):
    """Every sample is a new step ``s<k>`` (k counts every step written); answers end at ``depth``."""
    made = [0]

    def script(prefix, n, call):
        level = prefix.count(SEP)
        out = []
        for _ in range(n):
            made[0] += 1
            out.append(f"s{made[0]}" + ("$" if level + 1 >= depth else ""))
        return out

    return script


def values_for(count: int, seed: int = 7) -> dict[str, float]:
    """Distinct pseudo-random step scores for s1..s<count>."""
    import random

    rng = random.Random(seed)
    scores = rng.sample(range(1, 10_000), count)
    return {f"s{i + 1}": v / 10_000 for i, v in enumerate(scores)}


def by_id(group):
    return {n["id"]: n for n in group.trace["nodes"]}


def test_beam_search_keeps_exactly_the_n_over_m_best_prefixes_at_every_step():
    values = values_for(400)
    engine = ScriptedEngine(counter_script(depth=4))
    beam = BeamSearch(step_separator=SEP, n=8, search_width=4, search_max_steps=4, search_prm_agg="last")
    ctx = context(engine, values, 8)
    groups = asyncio.run(beam.run(prompts(2), ctx))
    for group in groups:
        nodes = by_id(group)
        for depth in (1, 2, 3):
            level = [n for n in nodes.values() if n["depth"] == depth]
            assert len(level) == (8 if depth == 1 else 2 * 4)  # N first steps, then M from each of N/M
            best = sorted(level, key=lambda n: -n["value"])[:2]
            assert {n["id"] for n in level if n.get("kept")} == {n["id"] for n in best}
            for n in level:  # the value ranked is the PRM's score of the step (search_prm_agg last)
                assert n["value"] == pytest.approx(values[n["text"].strip()], abs=1e-6)
            if depth > 1:  # every node of this level grew from a node kept one level up
                assert all(nodes[n["parent"]].get("kept") for n in level)
        finals = [n for n in nodes.values() if n["depth"] == 4]
        assert len(finals) == 8 and all(n["end"] == "stop" for n in finals)
        assert [c.trace["node"] for c in group.completions] == [
            n["id"] for n in sorted(finals, key=lambda n: -n["value"])
        ]
        best = group.completions[0]  # its PRM score is the search's, kept for the run's scorer
        assert best.text.count(SEP) == 3 and best.scores["prm"].steps[-1] == max(values[n["text"]] for n in finals)
    # one engine call per step for every live beam of both prompts, one PRM call per step
    assert [len(prefixes) for prefixes, _ in engine.calls] == [2, 4, 4, 4]
    assert [p.n for _, p in engine.calls] == [8, 4, 4, 4]
    assert ctx.counters["engine_calls"] == 4 and ctx.counters["prm_calls"] == 4
    assert SEP in engine.calls[0][1].stop and SEP not in engine.calls[-1][1].stop  # the last step ends the answer
    assert groups[0].compute["engine_calls"] == 4
    assert groups[0].compute["prm_evaluations"] == 8 + 8 + 8 + 8
    assert groups[0].compute["completion_tokens"] == sum(n["tokens"] for n in by_id(groups[0]).values())


def test_beam_search_finished_answers_leave_the_beam_and_the_best_n_are_the_group():
    # step "a" goes on, "b$" ends the answer at once; at the third step every answer ends with "c"
    def script(prefix, n, call):
        return ["a", "b$", "a", "b$"][:n] if prefix.count(SEP) < 2 else ["c$"] * n

    engine = ScriptedEngine(script)
    (group,) = asyncio.run(
        BeamSearch(step_separator=SEP, n=4, search_width=2, search_max_steps=10).run(
            prompts(1), context(engine, {"a": 0.9, "b": 0.2, "c": 0.7}, 4)
        )
    )
    nodes = by_id(group)
    ended_early = [n for n in nodes.values() if n["text"] == "b"]
    assert len(ended_early) == 4 and all(n["end"] == "stop" for n in ended_early)
    assert not [n for n in nodes.values() if n["parent"] in {e["id"] for e in ended_early}]  # never expanded
    assert [c.text for c in group.completions] == ["a\na\nc"] * 4  # the 4 best of 8 finished answers
    assert all(c.trace["steps"][-1]["id"] == c.trace["node"] for c in group.completions)


def test_beam_and_dvts_need_n_a_multiple_of_m_and_a_prm():
    with pytest.raises(ConfigError, match="multiple of M"):
        BeamSearch(step_separator=SEP, n=6, search_width=4)
    with pytest.raises(ConfigError, match="multiple of M"):
        DVTS(step_separator=SEP, n=2, search_width=4)
    engine = ScriptedEngine(counter_script(2))
    with pytest.raises(ConfigError, match="--prm_model"):
        asyncio.run(BeamSearch(n=4, search_width=2).run(prompts(), SearchContext(engine, SamplingParams(n=4))))


def test_dvts_grows_independent_greedy_subtrees():
    values = values_for(400, seed=3)
    engine = ScriptedEngine(counter_script(depth=3))
    groups = asyncio.run(DVTS(step_separator=SEP, n=12, search_width=4).run(prompts(2), context(engine, values, 12)))
    for group in groups:
        nodes = by_id(group)
        assert len(group.completions) == 3  # one answer per subtree
        assert sorted(c.trace["subtree"] for c in group.completions) == [0, 1, 2]
        for subtree in range(3):
            mine = [n for n in nodes.values() if n["subtree"] == subtree]
            for depth in (1, 2, 3):
                level = [n for n in mine if n["depth"] == depth]
                assert len(level) == 4  # M candidates per step
                (kept,) = [n for n in level if n.get("kept")]
                assert kept["value"] == max(n["value"] for n in level)
                if depth > 1:
                    assert nodes[level[0]["parent"]]["subtree"] == subtree and nodes[level[0]["parent"]]["kept"]
        for c in group.completions:
            assert c.trace["steps"][-1]["id"] == c.trace["node"] and nodes[c.trace["node"]]["end"] == "stop"
    assert [len(prefixes) for prefixes, _ in engine.calls] == [6, 6, 6]  # 2 prompts x 3 subtrees per call
