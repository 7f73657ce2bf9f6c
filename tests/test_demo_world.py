"""The demo world: the task generator and checker, the shipped names, and a shortened reproduction."""

from __future__ import annotations

import json
import random

import pytest
from demo_world import report, train

from winnow import demo
from winnow.demo import arith


def test_problems_are_seeded_disjoint_and_self_consistent():
    tr, te = arith.make_splits(300, 50, seed=3)
    tr2, te2 = arith.make_splits(300, 50, seed=3)
    assert [p.question() for p in tr] == [p.question() for p in tr2]
    assert not {p.question() for p in tr} & {p.question() for p in te}
    for p in tr + te:
        assert 2 <= len(p.ops) <= 4
        assert all(0 <= v <= arith.MAX_VALUE for v in p.results())
        assert arith.parse_question(p.question()) == p
        assert eval(p.expression()) == p.answer  # the parentheses give left-to-right order
        assert arith.step_labels(p, p.solution()) == [True] * (len(p.ops) + 1)
        assert arith.is_correct(p, p.solution())


def test_step_labels_catch_the_first_wrong_step_and_everything_after():
    p = arith.parse_question("Compute (17 + 25) * 3 - 8.")
    assert p.answer == 118
    wrong_arith = "17 + 25 = 42\n42 * 3 = 125\n125 - 8 = 117\nThe answer is \\boxed{117}."
    assert arith.step_labels(p, wrong_arith) == [True, False, False, False]
    wrong_carry = "17 + 25 = 42\n41 * 3 = 123\n123 - 8 = 115\nThe answer is \\boxed{115}."
    assert arith.step_labels(p, wrong_carry) == [True, False, False, False]
    wrong_op = "17 + 25 = 42\n42 + 3 = 45\n45 - 8 = 37\nThe answer is \\boxed{37}."
    assert arith.step_labels(p, wrong_op) == [True, False, False, False]
    lucky = "17 + 25 = 42\n42 * 3 = 126\nThe answer is \\boxed{118}."  # skipped a step
    assert arith.step_labels(p, lucky) == [True, True, False]
    assert arith.step_labels(p, "17 + 25 = 42\n42 * 3 = 126") == [True, True]
    assert not arith.is_correct(p, "17 + 25 = 42\n42 * 3 = 126")


def test_prm_input_matches_the_rewards_side_format():
    # "{step} <step>" joined by the step separator: what winnow.rewards' math_shepherd style builds
    tagged = train.tag_steps("1 + 2 = 3\nThe answer is \\boxed{3}.")
    assert tagged == "1 + 2 = 3 <step>\nThe answer is \\boxed{3}. <step>"
    assert train.PRM_HINT["style"] == "math_shepherd" and train.PRM_HINT["step_sep"] == arith.STEP_SEPARATOR


def test_demo_names_resolve_to_shipped_files():
    for name in ("demo-policy", "demo-prm", "demo-rm"):
        path = demo.resolve_model(name)
        assert path and (demo.ASSETS / name / "config.json").is_file()
    cfg = json.loads((demo.ASSETS / "demo-prm" / "config.json").read_text())
    assert cfg["winnow_prm"]["style"] == "math_shepherd"
    assert json.loads((demo.ASSETS / "demo-rm" / "config.json").read_text())["pad_token_id"] is not None
    with open(demo.resolve_dataset("demo-arith"), encoding="utf-8") as f:
        row = json.loads(f.readline())
    assert set(row) >= {"problem", "solution", "answer"}
    assert demo.resolve_dataset("demo-arith-train")
    assert demo.resolve_model("not-a-demo") is None and demo.resolve_dataset("not-a-demo") is None


def test_report_metrics_from_raw_records():
    def comp(answer, prm, rm, right=None):
        scores = {"demo-prm": {"value": prm}, "demo-rm": {"value": rm}}
        if right is not None:
            scores["math"] = {"value": float(right)}
        return {"text": f"x\nThe answer is \\boxed{{{answer}}}.", "finish_reason": "stop", "scores": scores}

    records = [
        {"reference": "5", "completions": [comp(5, 0.9, -1), comp(4, 0.1, 2), comp(4, 0.2, 0)]},
        {"reference": "7", "completions": [comp(1, 0.5, 0, right=False), comp(2, 0.4, 1, right=False)]},
    ]
    m = report.metrics(records)
    assert m["problems"] == 2
    assert m["pass@1"] == pytest.approx((1 / 3 + 0) / 2)
    assert m["majority@n"] == 0.0 and m["prm-best@n"] == 0.5 and m["rm-best@n"] == 0.0 and m["pass@n"] == 0.5
    assert m["prm-vote@n"] == 0.5  # answer 5 sums 0.9, answer 4 only 0.1 + 0.2


@pytest.mark.slow
def test_shortened_reproduction_runs(tmp_path):
    rep = train.build_world(tmp_path, train.WorldConfig.quick(), threads=1)
    for name in ("demo-policy", "demo-prm", "demo-rm"):
        assert (tmp_path / "assets" / name / "model.safetensors").is_file()
    assert (tmp_path / "data" / "arith_test.jsonl").is_file()
    assert set(rep["held_out_check"]) == {"pass@1", "majority@8", "prm-best@8", "prm-vote@8", "rm-best@8", "pass@8"}
    assert json.loads((tmp_path / "assets" / "demo-prm" / "config.json").read_text())["winnow_prm"] == train.PRM_HINT


def test_noisy_solutions_carry_the_written_values_and_are_labelled_step_by_step():
    rng = random.Random(0)
    wrong_steps = total = 0
    for p in arith.generate(300, seed=5):
        s = arith.noisy_solution(p, rng)
        checks = arith.step_checks(p, s)
        assert len(checks) == len(p.ops) + 1
        wrong_steps += checks.count(False)
        total += len(checks)
        lines = arith.split_steps(arith.noisy_solution(p, rng, p_miscopy=0.0))
        for before, after in zip(lines, lines[1:-1], strict=False):  # each step starts from the value written before
            assert after.split(" ")[0] == before.split(" = ")[1]
    assert 0.4 < wrong_steps / total < 0.7


def test_near_misses_are_wrong_and_close():
    rng = random.Random(1)
    for value in list(range(100)) * 5:
        miss = arith.near_miss(value, rng)
        assert miss != value and miss >= 0 and abs(miss - value) <= max(20, 9 * value)


def test_char_checks_mark_where_a_step_goes_wrong():
    p = arith.parse_question("Compute 25 - 17 + 5.")
    s = "25 - 17 = 9\n9 + 6 = 15\nThe answer is \\boxed{15}."
    marks = "".join(f"{s[i]}{'' if ok else '!'}" for i, ok in arith.char_checks(p, s))
    # 25 - 17 is 8, not 9; the next step starts right from the 9 written but adds 6, not 5 (its sum
    # of what it wrote is right); the answer boxes the last result
    assert marks == "25-179!9+6!1515"
    assert arith.char_checks(p, p.solution()) and all(ok for _, ok in arith.char_checks(p, p.solution()))


def test_verifier_examples_put_targets_on_the_right_tokens():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo.ASSETS / "demo-prm"))
    p = arith.parse_question("Compute 25 - 17 + 5.")
    item = train.labelled(p, "25 - 17 = 9\n9 + 5 = 14\nThe answer is \\boxed{14}.")
    prm = train.verifier_example(tok, p, p.question(), item, tagged=True)
    names = tok.convert_ids_to_tokens(prm.ids)
    assert [names[t] for t, _ in prm.steps] == [train.STEP_TAG] * 3
    assert [ok for _, ok in prm.steps] == [False, True, True]
    assert [(names[t].lstrip("\u0120"), ok) for t, ok in prm.dense if not ok] == [("9", False)]
    rm = train.verifier_example(tok, p, p.question(), item, tagged=False)
    names = tok.convert_ids_to_tokens(rm.ids)
    assert [(names[t], ok) for t, ok in rm.steps] == [("\u010a", False), ("\u010a", False)]
    assert rm.outcome is False and len(rm.dense) == len(prm.dense)
    bare = train.verifier_example(
        tok,
        arith.Problem(42, (arith.Op("*", 2),)),
        None,
        train.labelled(arith.Problem(42, (arith.Op("*", 2),)), "42 * 2 = 84"),
        tagged=True,
    )
    assert tok.decode(bare.ids) == "42 * 2 = 84 <step>" and bare.steps == [(len(bare.ids) - 1, True)]
