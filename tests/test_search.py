"""Search strategies (beam search, DVTS, MCTS): the search logic on a scripted engine and a scripted PRM,
where the exact tree is known, then the real thing on the demo world's policy and PRM through the
pipeline, the CLI (with kill -9 and resume), a plugin strategy, and ``winnow serve`` as the engine.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support.commands import raw_output, run_winnow
from tests.support.files import read_jsonl, write_jsonl
from winnow.errors import ConfigError
from winnow.rewards.scorer import RewardSlot, RunScorer
from winnow.schema import FINISH_STOP, Completion, Prompt, SamplingParams, Score
from winnow.search import SearchContext, build_strategy, decode_escapes
from winnow.search.beam import DVTS, BeamSearch
from winnow.search.mcts import MCTS, uct

SEP = "\n"


# ----------------------------------------------------------------------------- scripted engine and PRM


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


# ----------------------------------------------------------------------------- beam search


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


# ----------------------------------------------------------------------------- DVTS


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


def test_filter_duplicates_drops_repeated_partial_answers():
    def script(prefix, n, call):
        return ["x"] * n if not prefix else ["y$"] * n

    engine = ScriptedEngine(script)
    groups = asyncio.run(
        BeamSearch(step_separator=SEP, n=4, search_width=2, search_filter_duplicates=True).run(
            prompts(1), context(engine, {}, 4)
        )
    )
    ends = [n.get("end") for n in groups[0].trace["nodes"]]
    assert ends.count("duplicate") == 3 + 1  # 3 copies of "x", then 1 of "x\ny"
    assert [c.text for c in groups[0].completions] == ["x\ny"]
    assert groups[0].compute["prm_evaluations"] == 2  # duplicates are not valued


# ----------------------------------------------------------------------------- MCTS

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


# ----------------------------------------------------------------------------- options


def test_strategies_are_built_from_the_config_and_escapes_are_read():
    from winnow.config import SampleConfig

    config = SampleConfig(
        model="m",
        dataset=["d.jsonl"],
        sampler_type="dvts",
        num_return_sequences=8,
        search_width=2,
        step_separator="\\n",
        search_kwargs={"unknown_option": 1},
    )
    strategy = build_strategy(config)
    assert isinstance(strategy, DVTS) and strategy.n == 8 and strategy.width == 2 and strategy.separator == "\n"
    assert decode_escapes("a\\n\\tb\\\\n") == "a\n\tb\\n"
    assert build_strategy(SampleConfig(model="m", dataset=["d"], num_return_sequences=6)).describe() == {
        "name": "sample"
    }
    with pytest.raises(ConfigError, match="multiple of M"):
        build_strategy(SampleConfig(model="m", dataset=["d"], sampler_type="beam", num_return_sequences=6))


# ----------------------------------------------------------------------------- the demo world

DEMO = [
    "--model",
    "demo-policy",
    "--temperature",
    "1.0",
    "--max_new_tokens",
    "64",
    "--orm_model",
    "math",
    "--prm_model",
    "demo-prm",
    "--progress",
    "false",
]


@pytest.mark.parametrize("strategy", ["beam", "dvts", "mcts"])
def test_each_strategy_on_the_demo_world_ends_in_ordinary_groups(tmp_path, strategy):
    from winnow.config import SampleConfig
    from winnow.pipeline import sample

    out = tmp_path / "out"
    config = SampleConfig(
        model="demo-policy",
        dataset=["demo-arith#6"],
        sampler_type=strategy,
        num_return_sequences=4,
        search_width=2,
        temperature=1.0,
        max_new_tokens=64,
        orm_model="math",
        prm_model="demo-prm",
        output_format="raw",
        output_dir=str(out),
        output_file="raw.jsonl",
        progress=False,
    )
    summary = sample(config)
    records = read_jsonl(out / "raw.jsonl")
    manifest = json.loads((out / "raw.manifest.json").read_text())
    assert summary.groups_written == 6 and len(records) == 6
    assert manifest["strategy"]["name"] == strategy and manifest["strategy"]["step_separator"] is None
    for r in records:
        assert r["search"]["step_separator"] == "\n"  # demo-prm's own: the demo's steps are lines
        assert r["compute"]["completion_tokens"] >= max(c["completion_tokens"] for c in r["completions"])
        assert r["compute"]["prm_evaluations"] > 0 and r["compute"]["engine_calls"] > 0
        nodes = {n["id"]: n for n in r["search"]["nodes"]}
        for c in r["completions"]:
            path = [nodes[s["id"]] for s in c["trace"]["steps"]]
            assert "".join(n["text"] for n in path) == c["text"]  # steps join back into the answer
            assert c["completion_tokens"] == sum(n["tokens"] for n in path)
            assert c["scores"]["demo-prm"]["steps"] and "math" in c["scores"]
            assert len(c["scores"]["demo-prm"]["steps"]) == c["text"].strip().count("\n") + 1
    assert (
        sum(r["compute"]["completion_tokens"] for r in records)
        == summary.completion_tokens
        == manifest["compute"]["completion_tokens"]
    )
    assert manifest["compute"]["prm_evaluations"] == sum(r["compute"]["prm_evaluations"] for r in records)


def test_a_search_run_writes_swift_records_with_rejected_responses(tmp_path):
    out = tmp_path / "out"
    proc = run_winnow(
        "sample",
        *DEMO,
        "--dataset",
        "demo-arith#4",
        "--sampler_type",
        "beam",
        "--num_return_sequences",
        "4",
        "--search_width",
        "2",
        "--n_best_to_keep",
        "1",
        "--output_dir",
        str(out),
        "--output_file",
        "s.jsonl",
    )
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(out / "s.jsonl")
    assert records and len({r["id"] for r in records}) == len(records)  # n_best_to_keep 1: one line a prompt
    assert all(r["messages"][-1]["role"] == "assistant" for r in records)
    assert "compute" not in records[0] and "search" not in records[0]


@pytest.mark.slow
def test_kill_9_during_a_search_run_then_resume_loses_and_repeats_no_group(tmp_path):
    rows = [
        json.loads(line)
        for line in (__import__("winnow.demo", fromlist=["DATA"]).DATA / "arith_test.jsonl")
        .read_text()
        .splitlines()[:40]
    ]
    dataset = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    args = [
        "sample",
        *DEMO,
        "--dataset",
        str(dataset),
        "--sampler_type",
        "beam",
        "--num_return_sequences",
        "4",
        "--search_width",
        "2",
        "--num_sampling_batch_size",
        "2",
        "--output_format",
        "raw",
        "--output_dir",
        str(out),
        "--output_file",
        "o.jsonl",
        "--dataset_shuffle",
        "false",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "winnow", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 300
        while not ((out / "o.jsonl").exists() and len((out / "o.jsonl").read_bytes().splitlines()) >= 6):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no groups written in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    written = (out / "o.jsonl").read_bytes()
    before = [json.loads(line) for line in written[: written.rfind(b"\n") + 1].splitlines()]  # whole lines
    assert 6 <= len(before) < 40
    again = run_winnow(*args, "--resume", "true", timeout=600)
    assert again.returncode == 0, again.stderr
    after = read_jsonl(out / "o.jsonl")
    assert sorted(r["id"] for r in after) == sorted(r["id"] for r in rows)  # none lost, none twice
    assert after[: len(before)] == before  # what was written stays as it was
    assert all(r["compute"]["completion_tokens"] > 0 for r in after)


# ----------------------------------------------------------------------------- a plugin strategy

PLUGIN = '''
import dataclasses
from winnow.registry import strategy
from winnow.schema import Group


@strategy("greedy_then_sample")
class GreedyThenSample:
    """One greedy answer, then N-1 samples (a user's own strategy)."""

    name = "greedy_then_sample"

    def __init__(self, n=1, **options):
        self.n = n

    def describe(self):
        return {"name": self.name, "n": self.n}

    async def run(self, prompts, ctx):
        greedy = await ctx.engine.generate(prompts, dataclasses.replace(ctx.params, n=1, temperature=0.0))
        rest = await ctx.engine.generate(prompts, dataclasses.replace(ctx.params, n=self.n - 1))
        ctx.count("engine_calls", 2)
        return [Group(p, g + r, compute={"completion_tokens": sum(c.completion_tokens for c in g + r)})
                for p, g, r in zip(prompts, greedy, rest)]
'''


def test_a_strategy_from_a_plugin_file_runs_with_the_usual_command(tmp_path, tiny_model):
    plugin = tmp_path / "my_strategy.py"
    plugin.write_text(PLUGIN)
    dataset = write_jsonl(tmp_path / "d.jsonl", [{"query": f"Count to {i}."} for i in range(3)])
    out = tmp_path / "out"
    proc = run_winnow(
        "sample",
        "--model",
        str(tiny_model),
        "--dataset",
        str(dataset),
        "--sampler_type",
        "greedy_then_sample",
        "--external_plugins",
        str(plugin),
        "--num_return_sequences",
        "3",
        "--max_new_tokens",
        "4",
        *raw_output(out),
    )
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(out / "o.jsonl")
    assert len(records) == 3 and all(len(r["completions"]) == 3 for r in records)
    manifest = json.loads((out / "o.manifest.json").read_text())
    assert manifest["strategy"] == {"name": "greedy_then_sample", "n": 3} and manifest["compute"]["engine_calls"] == 2
    unknown = run_winnow(
        "sample",
        "--model",
        str(tiny_model),
        "--dataset",
        str(dataset),
        "--sampler_type",
        "nope",
        "--external_plugins",
        str(plugin),
        "--output_dir",
        str(out),
    )
    assert unknown.returncode != 0 and "Unknown strategy 'nope'" in unknown.stderr
    assert "greedy_then_sample" in unknown.stderr and "Traceback" not in unknown.stderr


# ----------------------------------------------------------------------------- engines: a step and an answer


def test_engines_say_which_stop_string_ended_a_step():
    from winnow.engines import _local, generate_sync, get_engine
    from winnow.engines.openai import _stop_string

    engine = get_engine("transformers", "demo-policy", device="cpu", seed=1)
    problem = [{"role": "user", "content": "Compute (17 + 25) * 2 - 8."}]
    (steps,) = generate_sync(
        engine, [Prompt(id="a", messages=problem)], SamplingParams(n=4, max_new_tokens=40, temperature=1.0, stop=[SEP])
    )
    for c in steps:  # a first step: it stopped at the separator, which is cut from the text
        assert c.stop_string == SEP and SEP not in c.text and c.text.startswith("17 + 25 = ")
        # the tokens generated, up to and including the separator: not the padding of a batch that ran longer
        assert c.completion_tokens == len(engine.tokenizer(c.text + SEP, add_special_tokens=False)["input_ids"])
    done = Prompt(id="b", messages=problem, prefix="17 + 25 = 42\n42 * 2 = 84\n84 - 8 = 76\n")
    (last,) = generate_sync(engine, [done], SamplingParams(n=1, max_new_tokens=40, temperature=0.0, stop=[SEP]))
    assert last[0].text == "The answer is \\boxed{76}." and last[0].stop_string is None  # the answer ended
    # vLLM and SGLang trim the stop string and say which it was; LMDeploy's text runs past it
    assert _local.make_completion("x = 1", "stop", 3, 4, [SEP], stop_reason=SEP).stop_string == SEP
    assert _local.make_completion("x = 1", "stop", 3, 4, [SEP], stop_reason=None).stop_string is None
    assert _local.make_completion("x = 1\ny", "stop", 3, 4, [SEP]).text == "x = 1"
    assert _local.make_completion("x = 1\ny", "length", 3, 4, [SEP]).stop_string == SEP
    assert _stop_string({"stop_reason": SEP}) == SEP and _stop_string({"matched_stop": SEP}) == SEP
    assert _stop_string({"matched_stop": 2}) is None and _stop_string({"finish_reason": "stop"}) is None
    asyncio.run(engine.aclose())


def test_search_through_winnow_serve_with_continue_final_message(tmp_path):
    import httpx
    import openai

    from tests.support.commands import Server

    srv = Server(tmp_path / "serve.log", "--model", "demo-policy", "--served_model_name", "demo")
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=60)
        problem = [{"role": "user", "content": "Compute (17 + 25) * 2 - 8."}]
        partial = {"role": "assistant", "content": "17 + 25 = 42\n"}
        extra = {"continue_final_message": True, "add_generation_prompt": False}
        resp = client.chat.completions.create(
            model="demo", messages=[*problem, partial], max_tokens=30, temperature=0, stop=[SEP], extra_body=extra
        )
        choice = resp.choices[0].model_dump()
        assert choice["message"]["content"] == "42 * 2 = 84" and choice["stop_reason"] == SEP
        # the same continuation as the local engine's, which renders a partial answer the same way
        from winnow.engines import generate_sync, get_engine

        local = get_engine("transformers", "demo-policy", device="cpu")
        (mine,) = generate_sync(
            local,
            [Prompt(id="a", messages=problem, prefix=partial["content"])],
            SamplingParams(n=1, max_new_tokens=30, temperature=0.0, stop=[SEP]),
        )
        assert mine[0].text == choice["message"]["content"]
        ended = (
            client.chat.completions.create(
                model="demo",
                messages=[*problem, {"role": "assistant", "content": "17 + 25 = 42\n42 * 2 = 84\n84 - 8 = 76\n"}],
                max_tokens=30,
                temperature=0,
                stop=[SEP],
                extra_body=extra,
            )
            .choices[0]
            .model_dump()
        )
        assert ended["message"]["content"] == "The answer is \\boxed{76}." and ended["stop_reason"] is None
        bad = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "demo", "messages": problem, **extra})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
        both = httpx.post(
            f"{srv.url}/v1/chat/completions",
            json={
                "model": "demo",
                "messages": [*problem, partial],
                "continue_final_message": True,
                "add_generation_prompt": True,
            },
        )
        assert both.status_code == 400 and both.json()["error"]["param"] == "add_generation_prompt"
        # a beam search with the client engine against the server
        out = tmp_path / "out"
        proc = run_winnow(
            "sample",
            *DEMO,
            "--sampler_engine",
            "client",
            "--model",
            "demo",
            "--engine_kwargs",
            json.dumps({"base_url": f"{srv.url}/v1"}),
            "--dataset",
            "demo-arith#4",
            "--sampler_type",
            "beam",
            "--num_return_sequences",
            "4",
            "--search_width",
            "2",
            "--output_format",
            "raw",
            "--output_dir",
            str(out),
            "--output_file",
            "o.jsonl",
        )
        assert proc.returncode == 0, proc.stderr
        records = read_jsonl(out / "o.jsonl")
        assert len(records) == 4
        for r in records:
            nodes = {n["id"]: n for n in r["search"]["nodes"]}
            assert all(n.get("end") != "error" for n in nodes.values())
            for c in r["completions"]:
                assert "".join(nodes[s["id"]]["text"] for s in c["trace"]["steps"]) == c["text"]
                assert len(c["trace"]["steps"]) >= 3 and "\\boxed{" in c["text"]  # step by step, to the answer
            assert r["compute"]["completion_tokens"] > 0 and r["compute"]["engine_calls"] >= 3
    finally:
        srv.stop()
