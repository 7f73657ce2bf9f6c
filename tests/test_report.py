"""``winnow report``: the estimators against hand-computed values, the reader, the Qwen2.5-Math eval adapter on a
slice of the real file, and the command end to end writing the table, report.json, the PNG and the HTML page.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import math
import random
from pathlib import Path

import pytest

from tests.support import DATA
from tests.support.commands import run_winnow
from winnow import report
from winnow.config import ReportConfig
from winnow.errors import ConfigError, DataError
from winnow.report import Problem, Sample, best_of_k, pass_at_k, vote, votes_at_k
from winnow.rewards import mathverify
from winnow.schema import Completion, Group, Prompt, Score

QWEN_SLICE = DATA / "qwen_math_cot_6.jsonl"

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def samples(correct: list[bool], answers: list | None = None, **rewards: list) -> list[Sample]:
    answers = answers or [None] * len(correct)
    return [
        Sample(c, a, {k: v[i] for k, v in rewards.items()})
        for i, (c, a) in enumerate(zip(correct, answers, strict=True))
    ]


def completion(answer, right: bool, tokens: int, **scores) -> dict:
    return {
        "text": f"so the answer is \\boxed{{{answer}}}",
        "finish_reason": "stop",
        "prompt_tokens": 5,
        "completion_tokens": tokens,
        "scores": {"math": {"value": 1.0 if right else 0.0}, **{k: {"value": v} for k, v in scores.items()}},
    }


def write_raw(path: Path, records: list[dict], manifest: bool = True) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    if manifest:
        path.with_name(path.stem + ".manifest.json").write_text(
            json.dumps(
                {
                    "output_file": path.name,
                    "config": {"model": "/models/tiny-policy", "sampler_type": "sample", "num_return_sequences": 4},
                    "rewards": [
                        {"key": "math", "role": "orm", "spec": "math", "weight": 1.0},
                        {"key": "prm", "role": "prm", "spec": "p", "weight": 1.0},
                        {"key": "rm", "role": "rm", "spec": "r", "weight": 1.0},
                    ],
                }
            )
        )
    return path


def tiny_records(group_tokens: int | None = None) -> list[dict]:
    """Two problems of 4 samples; figures worked out by hand in test_report_command_end_to_end."""
    p1 = [
        completion(7, True, 10, prm=0.9, rm=-1.0),
        completion(5, False, 20, prm=0.2, rm=2.0),
        completion(7, True, 30, prm=0.4, rm=0.5),
        completion(9, False, 40, prm=0.8, rm=0.1),
    ]
    p2 = [
        completion(3, False, 10, prm=0.3, rm=0.5),
        completion(3, False, 10, prm=0.3, rm=0.2),
        completion(4, True, 10, prm=0.9, rm=0.1),
        completion(6, False, 10, prm=0.1, rm=0.9),
    ]
    records = [
        {"id": "p1", "messages": [], "reference": "7", "completions": p1},
        {"id": "p2", "messages": [], "reference": "4", "completions": p2},
    ]
    if group_tokens is not None:
        for r in records:
            r["compute"] = {"completion_tokens": group_tokens}
    return records


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 2, 1) == 0.5
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(4, 2, 3) == 1.0  # every 3 of 4 holds a right one
    assert pass_at_k(5, 1, 2) == pytest.approx(1 - 6 / 10)  # 1 - C(4,2)/C(5,2)
    assert pass_at_k(8, 0, 8) == 0.0
    with pytest.raises(ValueError):
        pass_at_k(4, 2, 5)


def test_best_of_k_exact_expectation():
    # scores 0.9 (wrong), 0.5 (right), 0.3 (right), 0.1 (wrong)
    s = samples([False, True, True, False], rm=[0.9, 0.5, 0.3, 0.1])
    assert best_of_k(s, "rm", 1) == 0.5
    # pairs: {0,x} pick the wrong 0.9 (3 of 6), {1,2} {1,3} {2,3} pick a right one
    assert best_of_k(s, "rm", 2) == 0.5
    assert best_of_k(s, "rm", 3) == 0.25  # only {1,2,3} leaves out the 0.9
    assert best_of_k(s, "rm", 4) == 0.0
    assert best_of_k(s, "rm", 9) == 0.0  # k is capped at n


def test_best_of_k_ties_and_unscored_samples():
    s = samples([True, False, False], rm=[0.8, 0.8, 0.1])
    assert best_of_k(s, "rm", 1, "first") == pytest.approx(1 / 3)
    # {0,1}: the first of the tied pair (right); {0,2}: right; {1,2}: wrong
    assert best_of_k(s, "rm", 2, "first") == pytest.approx(2 / 3)
    assert best_of_k(s, "rm", 3, "first") == 1.0
    # average: {0,1} counts 1/2
    assert best_of_k(s, "rm", 2, "average") == pytest.approx(1.5 / 3)
    assert best_of_k(s, "rm", 3, "average") == 0.5
    # an unscored sample is never picked: {0} alone scores 0
    s = samples([True, True], rm=[None, 0.2])
    assert best_of_k(s, "rm", 1) == 0.5 and best_of_k(s, "rm", 2) == 1.0


def test_majority_with_ties_by_hand():
    # answers a (right), b, a (right), b, c
    s = samples([True, False, True, False, False], ["a", "b", "a", "b", "c"])
    assert vote(s, ties="first") == 1.0  # a and b tie at 2; a is seen first
    assert vote(s, ties="average") == 0.5
    assert vote(s[1:] + s[:1], ties="first") == 0.0  # b seen first now
    # k=3 over the 10 subsets: a wins {012} {023} {024}, b wins {013} {123} {134}; the four a/b/c ties go to the
    # first seen: a in {014} {034} {234}, b in {124} -> 6/10; averaged, each tie counts 1/3 -> (3 + 4/3)/10
    assert votes_at_k(s, 3, [None], "first")[None] == pytest.approx(0.6)
    assert votes_at_k(s, 3, [None], "average")[None] == pytest.approx(13 / 30)
    assert votes_at_k(s, 1, [None])[None] == pytest.approx(0.4)
    # a sample with no answer does not vote; no votes scores 0
    assert vote(samples([True, False], [None, "x"])) == 0.0
    assert vote(samples([True], [None])) == 0.0


def test_weighted_majority_by_hand():
    # b has 3 votes, a 2; by PRM weight a has 1.7 and b 0.6; the last sample has no PRM score and does not vote
    s = samples(
        [True, False, False, False, True, False], ["a", "b", "b", "b", "a", "c"], prm=[0.9, 0.1, 0.2, 0.3, 0.8, None]
    )
    assert vote(s) == 0.0
    assert vote(s, "prm") == 1.0
    at_1 = votes_at_k(s, 1, [None, "prm"])
    assert at_1[None] == pytest.approx(2 / 6) and at_1["prm"] == pytest.approx(2 / 6)


def test_monte_carlo_subsets_match_exact_enumeration():
    rng = random.Random(3)
    s = samples(
        [rng.random() < 0.4 for _ in range(12)],
        [rng.choice("abcd") for _ in range(12)],
        prm=[rng.random() for _ in range(12)],
    )
    exact = votes_at_k(s, 6, [None, "prm"], draws=1000)  # C(12,6) = 924: every subset
    drawn = votes_at_k(s, 6, [None, "prm"], draws=20000, rng=random.Random(0))
    assert math.comb(12, 6) < 1000
    drawn_small = votes_at_k(s, 6, [None, "prm"], draws=500, rng=random.Random(0))  # 500 < 924: drawn
    for key in (None, "prm"):
        assert abs(drawn_small[key] - exact[key]) < 0.06
        assert drawn[key] == exact[key]  # 20000 >= 924: still exact


def test_ks_and_bootstrap_interval():
    assert report.ks_for(8) == [1, 2, 4, 8]
    assert report.ks_for(6) == [1, 2, 4, 6]
    assert report.ks_for(1) == [1]
    assert report.ks_for(64, max_k=3) == [1, 2, 3]
    assert report.estimate([1.0, 0.0, 1.0, 0.0]) == report.Estimate(0.5)
    rng = random.Random(0)
    resamples = [[rng.randrange(4) for _ in range(4)] for _ in range(500)]
    e = report.estimate([1.0, 0.0, 1.0, 0.0], resamples)
    assert e.value == 0.5 and 0.0 <= e.low < 0.5 < e.high <= 1.0
    assert report.estimate([1.0] * 4, resamples) == report.Estimate(1.0, 1.0, 1.0)


def test_tokens_at_k():
    p = Problem("p", [Sample(True, tokens=10), Sample(False, tokens=30)])
    assert p.tokens_at(1) == 20 and p.tokens_at(2) == 40
    assert Problem("p", [Sample(True, tokens=10)], tokens=500).tokens_at(1) == 500  # a search group's own count
    assert Problem("p", [Sample(True)]).tokens_at(1) is None
    assert Problem("p", [Sample(True, tokens=0)]).tokens_at(1) is None


def test_score_values_and_group_tokens_shapes():
    assert report.score_values({"scores": {"m": {"value": 1}, "p": {"value": None, "steps": [1]}}, "reward": 2}) == {
        "m": 1.0,
        "p": None,
        "reward": 2.0,
    }
    assert report.score_values({"scores": [{"name": "m", "value": 0.5}, {"name": "p", "value": 1}]}) == {
        "m": 0.5,
        "p": 1.0,
    }
    assert report.score_values({"scores": {"m": 3}}) == {"m": 3.0}
    assert report.group_tokens({"compute": {"completion_tokens": 1200, "engine_calls": 9}}) == 1200
    assert report.group_tokens({"search": {"tokens": 7}}) == 7
    assert report.group_tokens({"completions": []}) is None


def test_answer_classes_merge_equivalent_forms_with_few_verifications(monkeypatch):
    classes = mathverify.answer_classes(
        ["\\boxed{0.5}", "\\boxed{\\frac{1}{2}}", "\\boxed{3}", None, "\\boxed{1/2}", "", "\\boxed{3}"]
    )
    assert classes == [0, 0, 1, None, 0, None, 1]
    calls = []
    real = mathverify._equivalent
    monkeypatch.setattr(mathverify, "_equivalent", lambda *a: calls.append(a) or real(*a))
    answers = [f"\\boxed{{{v}}}" for v in ("7", "8", "\\frac{14}{2}", "9") * 16]  # 64 answers, 3 values
    classes = mathverify.answer_classes(answers)
    assert classes[:4] == [0, 1, 0, 2] and classes[4:8] == [0, 1, 0, 2]
    assert len(calls) <= 3  # 8 vs 7, 14/2 vs 7, 9 vs 7 and 8 at most: never one per pair of answers


def test_report_command_end_to_end(tmp_path):
    a = write_raw(tmp_path / "a.jsonl", tiny_records())
    b = write_raw(tmp_path / "b.jsonl", tiny_records(group_tokens=1000))
    out = tmp_path / "out"
    proc = run_winnow("report", str(a), str(b), "--output_dir", str(out), "--bootstrap", "200")
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "report.json").read_text())
    # two runs of the same sampler and N: told apart by file name
    assert [r["label"] for r in data["runs"]] == ["tiny-policy sample N=4 (a)", "tiny-policy sample N=4 (b)"]
    run = data["runs"][0]
    assert run["problems"] == 2 and run["samples"] == 4
    assert "no rm-weighted vote: its scores go below 0" in run["notes"]
    rows = {r["k"]: r for r in run["rows"]}
    assert sorted(rows) == [1, 2, 4]
    value = {k: {n: m["value"] for n, m in r["metrics"].items()} for k, r in rows.items()}
    # k=1: p1 has 2 right of 4, p2 1 of 4
    assert value[1]["pass"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    # k=2: p1 1 - C(2,2)/C(4,2) = 5/6, p2 1 - C(3,2)/C(4,2) = 1/2
    assert value[2]["pass"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    # best-of-2 by prm: p1 ranks 0.9 R, 0.8 W, 0.4 R, 0.2 W -> (3 + 1)/6; p2 0.9 R first -> 3/6
    assert value[2]["best:prm"] == pytest.approx((4 / 6 + 3 / 6) / 2)
    # all 4: p1 votes 7 (right), p2 votes 3 (wrong); prm-weighted: 7 (1.3) and 4 (0.9) both right;
    # best prm 0.9 right in both; best rm 2.0 and 0.9 both wrong
    assert value[4] == pytest.approx({"pass": 1.0, "majority": 0.5, "best:prm": 1.0, "best:rm": 0.0, "vote:prm": 1.0})
    assert [rows[k]["tokens"] for k in (1, 2, 4)] == [17.5, 35.0, 70.0]  # (25 + 10) / 2 per sample
    assert [r["tokens"] for r in data["runs"][1]["rows"]] == [250.0, 500.0, 1000.0]  # the group's own count
    for m in rows[4]["metrics"].values():
        assert m["low"] <= m["value"] <= m["high"]
    assert "majority@k" in proc.stdout and "37.5" in proc.stdout  # the printed table
    page = (out / "report.html").read_text()
    assert "<table>" in page and "tiny-policy sample N=4 (a)" in page
    if HAS_MATPLOTLIB:
        assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "data:image/png;base64," in page
    else:
        assert "pip install 'winnow[report]'" in proc.stderr


def test_report_errors_name_the_file_and_the_fix(tmp_path):
    bare = write_raw(tmp_path / "bare.jsonl", tiny_records(), manifest=False)
    proc = run_winnow("report", str(bare), "--output_dir", str(tmp_path))
    assert proc.returncode == 2 and "--orm KEY" in proc.stderr and "math, prm, rm" in proc.stderr
    proc = run_winnow(
        "report", str(bare), "--orm", "math", "--rewards", "prm", "--output_dir", str(tmp_path), "--plots", "false"
    )
    assert proc.returncode == 0, proc.stderr
    assert "best-of-k prm" in proc.stdout and "best-of-k rm" not in proc.stdout
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(tiny_records()[0]) + "\n{not json\n")
    proc = run_winnow("report", str(broken), "--orm", "math", "--output_dir", str(tmp_path))
    assert proc.returncode == 2 and f"{broken}:2" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_winnow("report", "--output_dir", str(tmp_path))
    assert proc.returncode == 2 and "give at least one output" in proc.stderr
    with pytest.raises(ConfigError, match="--ties"):
        ReportConfig(outputs=["x"], ties="random")
    with pytest.raises(DataError, match="no 'completions' list"):
        report.load_run(
            write_raw(tmp_path / "c.jsonl", [{"id": 1}], manifest=False), ReportConfig(outputs=["x"], orm="m")
        )


def test_failed_samples_are_left_out(tmp_path):
    records = tiny_records()
    records[0]["completions"][1] = {"text": "", "finish_reason": "error", "error": "boom", "completion_tokens": 0}
    records.append({"id": "p3", "messages": [], "completions": [{"text": "", "finish_reason": "error"}]})
    run = report.load_run(write_raw(tmp_path / "f.jsonl", records), ReportConfig(outputs=["x"], plots=False))
    assert [len(p.samples) for p in run.problems] == [3, 4]
    assert run.notes[:2] == ["2 failed samples left out", "1 problems with no usable sample left out"]


def test_qwen_eval_slice_matches_the_files_own_figures(tmp_path):
    rows = [json.loads(line) for line in QWEN_SLICE.read_text().splitlines()]
    # the file's own figures, computed as its evaluation does: any label, the most common pred (first seen on a
    # tie), the highest pred_score
    pass_n = sum(any(r["score"]) for r in rows)
    maj_n = sum(r["score"][r["pred"].index(collections.Counter(r["pred"]).most_common(1)[0][0])] for r in rows)
    rm_n = sum(r["score"][max(range(8), key=lambda i: (r["pred_score"][i][0], -i))] for r in rows)
    assert (pass_n, maj_n, rm_n) == (5, 3, 3)  # the slice was chosen to have misses of each kind (README)
    config = ReportConfig(outputs=[str(QWEN_SLICE)], output_dir=str(tmp_path), bootstrap=0, plots=False)
    run = report.load_run(QWEN_SLICE, config)
    assert run.verdict == "the file's own labels (score)" and run.rewards == ["pred_score"]
    rows_by_k = {r.k: r.metrics for r in report.scaling(run, report.ks_for(run.samples), bootstrap=0)}
    assert rows_by_k[8]["pass"].value * 6 == pytest.approx(pass_n)
    assert rows_by_k[8]["majority"].value * 6 == pytest.approx(maj_n)
    assert rows_by_k[8]["best:pred_score"].value * 6 == pytest.approx(rm_n)
    assert rows_by_k[1]["pass"].value == pytest.approx(sum(sum(r["score"]) / 8 for r in rows) / 6)
    # the same answers grouped by exact text give the same votes here (the preds are already normalised)
    exact = report.load_run(QWEN_SLICE, ReportConfig(outputs=["x"], answer_match="exact"))
    assert [s.answer is None for p in exact.problems for s in p.samples] == [
        s.answer is None for p in run.problems for s in p.samples
    ]


def test_a_search_output_is_one_point_per_run_on_its_own_line(tmp_path):
    """Beam search's group is one result: reported at k = N only, with the group's own token count; runs of
    one search at several N share one line of the plot, apart from best-of-N's."""

    def search_run(name: str, n: int, group_tokens: int) -> Path:
        path = write_raw(tmp_path / name, tiny_records(group_tokens=group_tokens))
        manifest = json.loads(path.with_name(path.stem + ".manifest.json").read_text())
        manifest["config"].update(sampler_type="beam", num_return_sequences=n)
        manifest["strategy"] = {"name": "beam", "n": n, "independent_samples": False}
        path.with_name(path.stem + ".manifest.json").write_text(json.dumps(manifest))
        return path

    bon = write_raw(tmp_path / "bon.jsonl", tiny_records())
    beam4, beam8 = search_run("beam4.jsonl", 4, 120), search_run("beam8.jsonl", 8, 300)
    config = ReportConfig(
        outputs=[str(bon), str(beam4), str(beam8)], bootstrap=0, output_dir=str(tmp_path / "out"), plots=HAS_MATPLOTLIB
    )
    results = report.report(config, out=lambda _: None, log=lambda _: None)
    (bon_run, bon_rows), (run4, rows4), (run8, rows8) = results
    assert [r.k for r in bon_rows] == [1, 2, 4] and bon_run.independent
    assert [r.k for r in rows4] == [4] and [r.tokens for r in rows4] == [120.0]  # the whole group, its own tokens
    assert [r.tokens for r in rows8] == [300.0] and not run8.independent
    # at k = N the figures are those of the whole group: best-of-4 by the PRM picks 0.9 in both problems
    assert rows4[0].metrics["best:prm"].value == 1.0 and rows4[0].metrics["majority"].value == 0.5
    assert run4.series == run8.series == "tiny-policy beam" != bon_run.series
    assert any("one result, not independent samples" in n for n in run4.notes)
    if HAS_MATPLOTLIB:
        assert (tmp_path / "out" / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_run_quality_by_hand_and_no_pass_at_1_for_dependent_groups():
    def group(*samples):
        comps = [
            Completion(text=f"so \\boxed{{{a}}}", scores={"math": Score(float(ok)), "prm": Score(v)})
            for a, ok, v in samples
        ]
        return Group(Prompt(id="p", messages=[{"role": "user", "content": "q"}]), comps)

    groups = [
        group((5, True, 0.2), (6, False, 0.9), (5, True, 0.4)),
        group((1, False, 0.5), (2, False, 0.1), (1, False, 0.3)),
    ]
    independent, dependent = report.RunQuality("math", ["math", "prm"]), report.RunQuality("math", ["prm"], False)
    for g in groups:
        independent.add(g)
        dependent.add(g)
    # pass@1 (2/3 + 0) / 2; pass@3 1/2; majority (5 and 1 win) 1/2; best by prm picks 6 (wrong) and 1 (wrong): 0
    assert independent.summary() == {
        "pass@1": round(1 / 3, 4),
        "pass@3": 0.5,
        "majority@3": 0.5,
        "best-of-3 by prm": 0.0,
        "prompts judged": 2,
    }
    assert dependent.summary() == {"pass@3": 0.5, "majority@3": 0.5, "best-of-3 by prm": 0.0, "prompts judged": 2}
