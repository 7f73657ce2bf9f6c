"""The demo world's reproduction (demo_world/train.py): the PRM input format, the verifier examples, and a
shortened run.
"""

from __future__ import annotations

import json

import pytest

from demo_world import train
from winnow import demo
from winnow.demo import arith


def test_prm_input_matches_the_rewards_side_format():
    # "{step} <step>" joined by the step separator: what winnow.rewards' math_shepherd style builds
    tagged = train.tag_steps("1 + 2 = 3\nThe answer is \\boxed{3}.")
    assert tagged == "1 + 2 = 3 <step>\nThe answer is \\boxed{3}. <step>"
    assert train.PRM_HINT["style"] == "math_shepherd" and train.PRM_HINT["step_sep"] == arith.STEP_SEPARATOR


@pytest.mark.slow
def test_shortened_reproduction_runs(tmp_path):
    rep = train.build_world(tmp_path, train.WorldConfig.quick(), threads=1)
    for name in ("demo-policy", "demo-prm", "demo-rm"):
        assert (tmp_path / "assets" / name / "model.safetensors").is_file()
    assert (tmp_path / "data" / "arith_test.jsonl").is_file()
    assert set(rep["held_out_check"]) == {"pass@1", "majority@8", "prm-best@8", "prm-vote@8", "rm-best@8", "pass@8"}
    assert json.loads((tmp_path / "assets" / "demo-prm" / "config.json").read_text())["winnow_prm"] == train.PRM_HINT


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
