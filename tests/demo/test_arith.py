"""The demo task (demo/arith.py): seeded problems, the checker, step labels, noisy solutions, near misses."""

from __future__ import annotations

import random

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
