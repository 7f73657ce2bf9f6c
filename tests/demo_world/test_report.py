"""The demo world's report (demo_world/report.py): its metrics come from winnow.report's estimators."""

from __future__ import annotations

import pytest

from demo_world import report


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


def test_demo_metrics_go_through_the_report_estimators():
    def comp(answer: int, right: bool, prm: float, rm: float) -> dict:
        return {
            "text": f"\\boxed{{{answer}}}",
            "finish_reason": "stop",
            "scores": {"math": {"value": float(right)}, "demo-prm": {"value": prm}, "demo-rm": {"value": rm}},
        }

    # votes 5 (right) and 6 tie 2-2: the first seen (5) wins; PRM picks 6, RM picks 5; PRM-weighted: 6 (1.0 vs 0.5)
    record = {
        "reference": "5",
        "completions": [
            comp(5, True, 0.2, 0.9),
            comp(6, False, 0.5, 0.1),
            comp(5, True, 0.3, 0.2),
            comp(6, False, 0.5, 0.3),
        ],
    }
    m = report.metrics([record])
    assert m == {
        "problems": 1,
        "pass@1": 0.5,
        "majority@n": 1.0,
        "prm-best@n": 0.0,
        "prm-vote@n": 0.0,
        "rm-best@n": 1.0,
        "pass@n": 1.0,
    }
