"""Reward models through the real loading code: tiny checkpoints of every supported kind."""

from __future__ import annotations

import pytest

from winnow.errors import RewardError
from winnow.rewards.models import aggregate_steps, detect_reward_model, load_reward_model, split_steps

STEPS = ["Step 1: 2 + 3 = 5", "Step 2: so the sum is 5", "The answer is \\boxed{5}"]

CONV = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "\n\n".join(STEPS)}]
SHORT = [{"role": "user", "content": "What is 7 * 8?"}, {"role": "assistant", "content": "It is 56"}]


def test_detects_each_kind(tiny_model, tiny_classifier_rm, tiny_prm, tiny_qwen_prm, tiny_token_prm):
    assert detect_reward_model(str(tiny_model)) is None
    assert detect_reward_model(str(tiny_classifier_rm)) == "classifier"
    for prm in (tiny_prm, tiny_qwen_prm, tiny_token_prm):
        assert detect_reward_model(str(prm)) == "prm"


def test_aggregation_and_steps():
    assert split_steps("a\n\n\n\nb\n\n  ") == ["a", "b"]
    assert split_steps("a\nb", sep="\n") == ["a", "b"]
    steps = [0.9, 0.5, 0.8]
    assert aggregate_steps(steps, "min") == 0.5
    assert aggregate_steps(steps, "last") == 0.8
    assert aggregate_steps(steps, "prod") == pytest.approx(0.36)
    assert aggregate_steps(steps, "mean") == pytest.approx(2.2 / 3)
    assert aggregate_steps([], "min") is None
    with pytest.raises(RewardError):
        aggregate_steps(steps, "max")


def test_math_shepherd_reads_good_vs_bad_at_each_tag(tiny_prm):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rm = load_reward_model(str(tiny_prm), prm_agg="last")
    assert rm.kind == "prm"
    (score,) = rm.score_conversations([CONV])
    # by hand: question, then each step followed by " <step>", lines joined by "\n"
    tok = AutoTokenizer.from_pretrained(str(tiny_prm))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_prm)).eval()
    text = "What is 2 + 3? " + "\n".join(f"{s} <step>" for s in STEPS)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    tag = tok.convert_tokens_to_ids("<step>")
    good, bad = tok.encode("+", add_special_tokens=False)[-1], tok.encode("-", add_special_tokens=False)[-1]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0][:, [good, bad]]
    expected = [torch.softmax(logits[i], -1)[0].item() for i, t in enumerate(ids) if t == tag]
    assert len(expected) == 3
    assert score.steps == pytest.approx(expected, abs=1e-5)
    assert score.value == pytest.approx(expected[-1], abs=1e-5)


def test_qwen_prm_layout_reads_head_at_extra_0(tiny_qwen_prm):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen2Model

    rm = load_reward_model(str(tiny_qwen_prm))
    (score,) = rm.score_conversations([CONV])
    tok = AutoTokenizer.from_pretrained(str(tiny_qwen_prm))
    weights = load_file(str(tiny_qwen_prm / "model.safetensors"))
    base = Qwen2Model.from_pretrained(str(tiny_qwen_prm)).eval()
    head = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    head.load_state_dict({k[len("score.") :]: v for k, v in weights.items() if k.startswith("score.")})
    msgs = [
        {"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
        CONV[0],
        {"role": "assistant", "content": "".join(s + "<extra_0>" for s in STEPS)},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    sep = tok.convert_tokens_to_ids("<extra_0>")
    with torch.no_grad():
        probs = torch.softmax(head(base(torch.tensor([ids])).last_hidden_state[0]), -1)[:, 1]
    expected = [probs[i].item() for i, t in enumerate(ids) if t == sep]
    assert score.steps == pytest.approx(expected, abs=1e-5)
    assert score.value == pytest.approx(min(expected), abs=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_prm", "tiny_qwen_prm", "tiny_token_prm", "tiny_classifier_rm"])
def test_batched_equals_one_at_a_time(request, fixture):
    rm = load_reward_model(str(request.getfixturevalue(fixture)), batch_size=4)
    batched = rm.score_conversations([CONV, SHORT, CONV])
    alone = [rm.score_conversations([c])[0] for c in (CONV, SHORT, CONV)]
    for b, a in zip(batched, alone, strict=True):
        assert b.value == pytest.approx(a.value, abs=1e-5)
        if rm.kind == "prm":
            assert b.steps == pytest.approx(a.steps, abs=1e-5)
    if rm.kind == "prm":
        assert [len(s.steps) for s in batched] == [3, 1, 3]
        assert all(0.0 < v < 1.0 for s in batched for v in s.steps)
    else:
        assert all(s.steps is None for s in batched)
        assert batched[0].value != batched[1].value


def test_empty_completion_cannot_be_judged(tiny_prm):
    rm = load_reward_model(str(tiny_prm))
    (score,) = rm.score_conversations([[CONV[0], {"role": "assistant", "content": "  "}]])
    assert score.value is None and score.steps == []


def test_style_flag_on_a_plain_causal_lm(tiny_model):
    with pytest.raises(RewardError, match="ordinary causal LM"):
        load_reward_model(str(tiny_model))
    # a multi-token tag works too: the score is read at the tag's last token
    rm = load_reward_model(str(tiny_model), style="math_shepherd", step_tag="###", good_token="+", bad_token="-")
    (score,) = rm.score_conversations([CONV])
    assert len(score.steps) == 3
