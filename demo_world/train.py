"""Reproduce the demo world: datasets, tokenizer, policy, process reward model, classifier RM.

    python -m demo_world.train --all                 # everything, into src/winnow/demo/{data,assets}
    python -m demo_world.train --all --quick --out /tmp/w   # a shortened run (what the tests do)

Seeded and CPU-only (about 40 minutes on 2 shared cores; ``--threads 1`` is fastest when other
processes share the cores). The steps:

1. ``arith.make_splits`` -> ``data/arith_train.jsonl`` and ``data/arith_test.jsonl``.
2. A digit-level BPE tokenizer (Qwen2's pre-tokenizer) with a ChatML template; ``<step>`` is special.
3. ``demo-policy``: a Qwen2-architecture causal LM trained from scratch on the reference solutions
   (loss on the assistant tokens only); the shipped checkpoint is the first at which held-out
   pass@1 at temperature 1 reaches the target, so there is room for best-of-N to help. The run
   continues to its end; that stronger checkpoint (the verifier base, kept under ``$WINNOW_CACHE``,
   not shipped) is what the reward models start from.
4. The policy samples train problems; every sample's steps are re-checked (``arith.step_checks``).
5. Line phase: the verifier base, deepened by identity layers, learns to check one step
   ``a op b = c <step>`` (``+``/``-`` at the tag, and dense per-character labels from
   ``arith.char_checks`` through a training-only head): single lines are short, so a batch holds
   hundreds of checked steps. On whole solutions alone a model this small only learns how hard a
   step's numbers look.
6. ``demo-prm``: a Math-Shepherd-style PRM, that model trained further on whole tagged chats
   (policy samples and made-up solutions whose every result is right or a near miss).
7. ``demo-rm``: a one-logit sequence classifier on the PRM's trunk, trained with BCE on the outcome
   at the last token and "every step so far is right" at the end of each step.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from demo_world.report import PRM, RM, metrics
from winnow.demo import HERE as PACKAGE
from winnow.demo import arith

STEP_TAG = "<step>"
GOOD, BAD = "+", "-"
# config.json's "winnow_prm": step_sep/chat are the names winnow.rewards reads; step_separator/input the
# names the contract spelled out; both say the same (input = chat template over [user, tagged assistant])
PRM_HINT = {
    "style": "math_shepherd",
    "step_tag": STEP_TAG,
    "good_token": GOOD,
    "bad_token": BAD,
    "step_sep": arith.STEP_SEPARATOR,
    "step_separator": arith.STEP_SEPARATOR,
    "chat": True,
    "input": "chat",
    "tag_format": "{step} <step>",
}
POLICY_SIZE = dict(hidden=128, layers=3, heads=4, kv_heads=2, inter=384, max_positions=256)
HELD_OUT_SAMPLES = 8  # per held-out problem, at every evaluation and in the final check


@dataclass
class WorldConfig:
    """Sizes and budgets of one reproduction (``quick`` shrinks every one of them)."""

    seed: int = 0
    n_train: int = 12000
    n_test: int = 500
    policy_steps: int = 2000
    policy_batch: int = 32
    policy_lr: float = 3e-3
    target_pass1: tuple[float, float] = (0.35, 0.55)
    eval_every: int = 100
    eval_problems: int = 100
    label_problems: int = 1000
    label_samples: int = 8
    line_steps: int = 2000
    line_batch: int = 256
    prm_steps: int = 600
    rm_steps: int = 600
    verifier_extra_layers: int = 2
    reward_batch: int = 64
    reward_lr: float = 1e-3

    @classmethod
    def quick(cls) -> WorldConfig:
        return cls(
            n_train=400,
            n_test=50,
            policy_steps=6,
            policy_batch=8,
            eval_every=2,
            eval_problems=8,
            target_pass1=(0.0, 1.0),
            label_problems=6,
            label_samples=2,
            line_steps=3,
            line_batch=8,
            prm_steps=3,
            rm_steps=3,
            reward_batch=4,
        )


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- text


def chat_text(tok, question: str, solution: str | None = None) -> str:
    """The ChatML text of [user: question, assistant: solution] (or the generation prompt), rendered as
    winnow's engine and reward models render it."""
    from winnow.engines.hf import render_chat

    messages = [{"role": "user", "content": question}]
    if solution is None:
        return render_chat(tok, messages, add_generation_prompt=True)
    return render_chat(tok, messages + [{"role": "assistant", "content": solution}], add_generation_prompt=False)


def tag_steps(solution: str) -> str:
    """The solution with the step tag after each step: ``step1 <step>\\nstep2 <step>``."""
    return arith.STEP_SEPARATOR.join(f"{s.strip()} {STEP_TAG}" for s in arith.split_steps(solution))


def lm_example(tok, question: str, solution: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat and a 0/1 mask of the assistant tokens (the ones trained on)."""
    prompt = tok(chat_text(tok, question), add_special_tokens=False)["input_ids"]
    answer = tok(solution + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return prompt + answer, [0] * len(prompt) + [1] * len(answer)


# ----------------------------------------------------------------------------- training loops


def _batches(n: int, size: int, rng: random.Random):
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n - size + 1, size):
            yield order[i : i + size]


def _pad(rows: list[list[int]], value: int):
    import torch

    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train_policy(model, tok, examples, cfg: WorldConfig, evaluate=None):
    """Next-token loss on the assistant tokens; ``evaluate(step)`` may return True to stop early."""
    import torch

    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.policy_lr, weight_decay=0.01, betas=(0.9, 0.98))
    batches = _batches(len(examples), cfg.policy_batch, rng)
    pad = tok.pad_token_id
    model.train()
    for step in range(cfg.policy_steps):
        idx = next(batches)
        ids = _pad([examples[i][0] for i in idx], pad)
        attention = _pad([[1] * len(examples[i][0]) for i in idx], 0)
        labels = ids.masked_fill(_pad([examples[i][1] for i in idx], 0) == 0, -100)
        for g in opt.param_groups:
            g["lr"] = cfg.policy_lr * _schedule(step, cfg.policy_steps, 50)
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0:
            log(f"policy step {step} loss {loss.item():.4f}")
        if evaluate is not None and (step + 1) % cfg.eval_every == 0:
            model.eval()
            stop = evaluate(step + 1)
            model.train()
            if stop:
                break
    model.eval()
    return model


# ----------------------------------------------------------------------------- sampling and scoring


def policy_engine(policy_dir: Path, model=None):
    """winnow's transformers engine over the policy in ``policy_dir`` (or over ``model``, the policy being
    trained, with its current weights), on the CPU. The shipped weights were made from samples drawn as a
    plain ``model.generate`` loop draws them (prompts in the order given, 256 sequences per call, each
    sample prefilling its prompt), so the engine is asked to draw them the same way."""
    from winnow.engines.transformers import TransformersEngine

    return TransformersEngine(
        str(policy_dir),
        device="cpu",
        loaded_model=model,
        max_batch_sequences=256,
        sort_by_length=False,
        shared_prefill=False,
    )


def sample(engine, problems: list[arith.Problem], n: int, seed: int) -> list[list[str]]:
    """``n`` solutions per problem at temperature 1 (at most 64 tokens), torch's generator seeded first."""
    from winnow.schema import Prompt, SamplingParams

    engine.reseed(seed)
    prompts = [Prompt(id=str(i), messages=[{"role": "user", "content": p.question()}]) for i, p in enumerate(problems)]
    groups = engine.generate_blocking(prompts, SamplingParams(n=n, temperature=1.0, max_new_tokens=64))
    failed = next((c.error for group in groups for c in group if c.failed), None)
    if failed is not None:  # an empty sample in its place would change what the reward models learn
        raise RuntimeError(f"the policy could not sample: {failed}")
    return [[c.text for c in group] for group in groups]


def raw_records(problems: list[arith.Problem], samples: list[list[str]]) -> list[dict]:
    """The samples as ``winnow sample``'s raw output records (what ``demo_world.report.metrics`` reads)."""
    return [
        {
            "id": str(i),
            "messages": [{"role": "user", "content": p.question()}],
            "reference": str(p.answer),
            "completions": [{"text": s, "scores": {}} for s in group],
        }
        for i, (p, group) in enumerate(zip(problems, samples, strict=True))
    ]


def score_records(records: list[dict], reward_models: dict[str, Path]) -> None:
    """Each completion scored by each reward model (by key), loaded as ``--prm_model``/``--reward_model`` load it."""
    from winnow.rewards.models import load_reward_model

    scored = [(r, c) for r in records for c in r["completions"]]
    chats = [[*r["messages"], {"role": "assistant", "content": c["text"]}] for r, c in scored]
    for key, path in reward_models.items():
        scores = load_reward_model(str(path), device="cpu").score_conversations(chats)
        for (_, c), score in zip(scored, scores, strict=True):
            c["scores"][key] = {"value": score.value}


# ----------------------------------------------------------------------------- reward models


@dataclass
class Labelled:
    """A sampled solution with its step labels and outcome."""

    question: str
    solution: str
    steps: list[bool]  # prefix labels: every step so far is right
    checks: list[bool]  # each step right given the steps before it
    correct: bool


def label_samples(problems: list[arith.Problem], samples: list[list[str]]) -> list[Labelled]:
    """Every distinct sample per problem, with its step labels (re-checked arithmetic)."""
    out = []
    for p, group in zip(problems, samples, strict=True):
        out += [item for item in (labelled(p, s) for s in dict.fromkeys(group)) if item.steps]
    return out


def labelled(p: arith.Problem, solution: str) -> Labelled:
    """``solution`` to ``p`` with its step checks, prefix labels and outcome."""
    checks = arith.step_checks(p, solution)
    return Labelled(p.question(), solution, arith.step_labels(p, solution), checks, arith.is_correct(p, solution))


@dataclass
class VerifierExample:
    """One verifier input: token ids, the dense per-token labels (``arith.char_checks``, read by
    the training-only auxiliary head), the step labels read by the model's own head, and the
    outcome label at the last token (classifier only)."""

    ids: list[int]
    dense: list[tuple[int, bool]]
    steps: list[tuple[int, bool]]
    outcome: bool | None = None


def _token_index(offsets) -> dict[int, int]:
    """Character offset -> index of the token that covers it."""
    out: dict[int, int] = {}
    for t, (a, b) in enumerate(offsets):
        for c in range(a, b):
            out.setdefault(c, t)
    return out


def _in_text(text: str, part: str, start: int) -> list[int]:
    """The offset in ``text`` of each character of ``part`` (a subsequence of ``text`` from
    ``start``: the tagged solution adds tags between the plain solution's characters)."""
    out, i = [], start
    for ch in part:
        i = text.index(ch, i)
        out.append(i)
        i += 1
    return out


def verifier_example(
    tok, problem: arith.Problem, question: str | None, item: Labelled, *, tagged: bool
) -> VerifierExample | None:
    """The PRM input (``tagged``: the chat over the solution with ``<step>`` after each step; the
    targets at the tags are each step's own check) or the classifier's (the plain chat; targets:
    at the end of each step whether every step so far is right, and the outcome at the last token).
    ``question`` None: the bare tagged solution, with no chat around it (the line phase). None when
    the tags cannot be matched to the steps (a sample that spells out the tag itself)."""
    solution = tag_steps(item.solution) if tagged else item.solution
    text = solution if question is None else chat_text(tok, question, solution)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, where = enc["input_ids"], _token_index(enc["offset_mapping"])
    start = text.rfind(solution)
    chars = _in_text(text, item.solution, start)
    dense = [(where[chars[c]], ok) for c, ok in arith.char_checks(problem, item.solution)]
    if tagged:
        tag = tok.convert_tokens_to_ids(STEP_TAG)
        tags = [t for t, v in enumerate(ids) if v == tag]
        if len(tags) != len(item.checks):
            return None
        return VerifierExample(ids, dense, list(zip(tags, item.checks, strict=True)))
    # the end of every step but the last (the outcome covers that one): the newline after it
    ends = [where[chars[i]] for i, ch in enumerate(item.solution) if ch == arith.STEP_SEPARATOR]
    return VerifierExample(ids, dense, list(zip(ends, item.steps, strict=False)), item.correct)


def line_batches(problems: list[arith.Problem], data: list[Labelled], size: int, rng: random.Random):
    """Endless batches for the line phase: single tagged steps ``a op b = c <step>``, half taken from
    policy samples (right and wrong equally), half made up from train problems (the result right or
    a near miss, equally): checking one step's arithmetic is the skill the reward models share."""
    right: list[tuple[arith.Problem, str]] = []
    wrong: list[tuple[arith.Problem, str]] = []
    for d in data:
        for step, ok in zip(arith.split_steps(d.solution), d.checks, strict=True):
            m = arith._STEP.match(step)
            if m:
                (right if ok else wrong).append((arith.Problem(int(m[1]), (arith.Op(m[2], int(m[3])),)), step.strip()))
    while True:
        batch = []
        for i in range(size):
            if i % 2 and right and wrong:  # odd slots: policy lines, right and wrong in turn
                batch.append(rng.choice(right if i % 4 == 1 else wrong))
                continue
            p = rng.choice(problems)
            k = rng.randrange(len(p.ops))
            one = arith.Problem(([p.start] + p.results())[k], (p.ops[k],))
            truth = one.answer
            result = truth if rng.random() < 0.5 else arith.near_miss(truth, rng)
            batch.append((one, f"{one.start} {p.ops[k].sign} {p.ops[k].value} = {result}"))
        yield [(p, None, labelled(p, line)) for p, line in batch]


def reward_batches(data: list[Labelled], problems: list[arith.Problem], size: int, rng: random.Random):
    """Endless batches of whole solutions: half policy samples (right and wrong equally), half
    made-up ones: a reference solution or, mostly, a noisy one (``arith.noisy_solution``)."""
    right = [d for d in data if d.correct]
    wrong = [d for d in data if not d.correct]
    while True:
        half = size // 2
        if right and wrong:
            batch = rng.sample(right, min(half // 2, len(right))) + rng.sample(wrong, min(half - half // 2, len(wrong)))
        else:
            batch = rng.sample(data, min(half, len(data)))
        batch = [(arith.parse_question(d.question), d.question, d) for d in batch]
        while len(batch) < size:
            p = rng.choice(problems)
            s = p.solution() if rng.random() < 0.3 else arith.noisy_solution(p, rng)
            batch.append((p, p.question(), labelled(p, s)))
        yield batch


def deepened(auto_cls, base_dir: Path, extra_layers: int, **config_overrides):
    """``base_dir``'s model with ``extra_layers`` more decoder layers on top, each initialised as the
    identity (zero output projections), so it starts as the base model.

    A verifier must both redo the arithmetic and compare it with what is written; the policy's
    layers all go to the first, and a model of the same depth cannot read its own last-layer
    prediction at a later position. The added layers give the comparison room.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base_dir), **config_overrides)
    base_layers = config.num_hidden_layers
    config.num_hidden_layers = base_layers + extra_layers
    if getattr(config, "layer_types", None):
        config.layer_types = (list(config.layer_types) + [config.layer_types[-1]] * extra_layers)[
            : config.num_hidden_layers
        ]
    torch.manual_seed(0)
    model = auto_cls.from_config(config)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).model.state_dict()
    missing, unexpected = model.model.load_state_dict(base, strict=False)
    assert not unexpected and all(k.startswith("layers.") for k in missing), (missing, unexpected)
    if hasattr(model, "lm_head") and not config.tie_word_embeddings:
        model.lm_head.weight.data.copy_(AutoModelForCausalLM.from_pretrained(str(base_dir)).lm_head.weight.data)
    for layer in model.model.layers[base_layers:]:
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    return model


class Verifier:
    """A reward model in training: the model, how its own head scores every position (PRM: the
    ``+``/``-`` logit difference; classifier: the ``score`` logit), and a training-only linear head
    for the dense labels (not saved: the shipped model is a plain PRM or classifier)."""

    def __init__(self, model, tok):
        import torch

        self.model, self.tok = model, tok
        self.aux = torch.nn.Linear(model.config.hidden_size, 1)
        self.pair = [tok.convert_tokens_to_ids(GOOD), tok.convert_tokens_to_ids(BAD)]

    def parameters(self):
        return list(self.model.parameters()) + list(self.aux.parameters())

    def forward(self, ids, attention):
        if hasattr(self.model, "lm_head"):
            out = self.model(input_ids=ids, attention_mask=attention, output_hidden_states=True)
            return out.logits[..., self.pair[0]] - out.logits[..., self.pair[1]], out.hidden_states[-1]
        hidden = self.model.model(input_ids=ids, attention_mask=attention).last_hidden_state
        return self.model.score(hidden)[..., 0], hidden

    def loss(self, examples: list[VerifierExample], dense_weight: float):
        """BCE on the steps and outcome through the model's head, plus the dense labels through the
        auxiliary head; also the accuracy on the step labels (for the log)."""
        import torch

        bce = torch.nn.functional.binary_cross_entropy_with_logits
        ids = _pad([e.ids for e in examples], self.tok.pad_token_id)
        scores, hidden = self.forward(ids, _pad([[1] * len(e.ids) for e in examples], 0))

        def at(pairs, values):
            rows = torch.tensor([b for b, t, _ in pairs])
            cols = torch.tensor([t for _, t, _ in pairs])
            return values[rows, cols], torch.tensor([float(y) for *_, y in pairs])

        steps = [(b, t, y) for b, e in enumerate(examples) for t, y in e.steps]
        z, y = at(steps, scores)
        loss = bce(z, y)
        accuracy = ((z > 0) == (y > 0.5)).float().mean().item()
        outcome = [(b, len(e.ids) - 1, e.outcome) for b, e in enumerate(examples) if e.outcome is not None]
        if outcome:
            z, y = at(outcome, scores)
            loss = loss + bce(z, y)
            accuracy = ((z > 0) == (y > 0.5)).float().mean().item()
        dense = [(b, t, y) for b, e in enumerate(examples) for t, y in e.dense]
        if dense:
            h, y = at(dense, hidden)
            loss = loss + dense_weight * bce(self.aux(h)[:, 0], y)
        return loss, accuracy


def train_verifier(
    verifier: Verifier, batches, steps: int, lr: float, name: str, *, tagged: bool, dense_weight: float = 1.0
) -> Verifier:
    """AdamW with warm-up and cosine decay; logs the loss and the accuracy of the head's verdicts."""
    import torch

    params = verifier.parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    verifier.model.train()
    seen, correct = 0, 0.0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * _schedule(step, steps, 50)
        examples = [
            e
            for e in (verifier_example(verifier.tok, p, q, d, tagged=tagged) for p, q, d in next(batches))
            if e is not None and e.steps
        ]
        loss, accuracy = verifier.loss(examples, dense_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen, correct = seen + 1, correct + accuracy
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"{name} step {step + 1}: loss {loss.item():.4f}, verdicts right {correct / seen:.3f}")
            seen, correct = 0, 0.0
    verifier.model.eval()
    return verifier


def train_reward_models(base_dir: Path, tok, data: list[Labelled], problems: list[arith.Problem], cfg: WorldConfig):
    """The line phase, then the PRM and the classifier from it (returns both models).

    1. Lines: the verifier base deepened by identity layers learns to check one step ``a op b = c``
       (its own head at the tag, the dense labels on the digits), cheap because a line is short.
    2. PRM: that model on whole tagged chats (policy samples and made-up solutions).
    3. Classifier: the PRM's trunk (it already checks steps in context) with a fresh ``score``
       head on whole plain chats; it has to learn only to carry the verdicts to the last token.
    """
    import copy

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    rng = random.Random(cfg.seed + 1)
    lines = Verifier(deepened(AutoModelForCausalLM, base_dir, cfg.verifier_extra_layers), tok)
    train_verifier(
        lines, line_batches(problems, data, cfg.line_batch, rng), cfg.line_steps, cfg.reward_lr, "lines", tagged=True
    )
    # each Verifier() draws a head from torch's generator even when it is replaced: the seeded run
    # that made the shipped weights drew them in this order
    prm = Verifier(lines.model, tok)
    prm.aux = lines.aux
    train_verifier(
        prm, reward_batches(data, problems, cfg.reward_batch, rng), cfg.prm_steps, cfg.reward_lr, "prm", tagged=True
    )
    config = copy.deepcopy(prm.model.config)
    config.num_labels = 1
    config.pad_token_id = tok.pad_token_id
    rm = Verifier(AutoModelForSequenceClassification.from_config(config), tok)
    rm.model.model.load_state_dict(prm.model.model.state_dict())  # copies
    rm.aux = prm.aux
    train_verifier(
        rm, reward_batches(data, problems, cfg.reward_batch, rng), cfg.rm_steps, cfg.reward_lr, "rm", tagged=False
    )
    return prm.model, rm.model


# ----------------------------------------------------------------------------- the whole world


def _save_tokenizer_and_generation(tok, model, path: Path) -> None:
    from winnow.demo.build import save_generation_config

    tok.save_pretrained(str(path))
    save_generation_config(model.config, path, temperature=1.0, top_p=1.0, top_k=0)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def build_world(
    out: Path, cfg: WorldConfig, threads: int = 2, *, reuse_policy: bool = False, policy_only: bool = False
) -> dict:
    """Run every step; returns the measured figures (also written to ``assets/train_report.json``).
    ``reuse_policy`` keeps the policy already in ``out`` and retrains only the reward models."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from winnow.demo import build

    torch.set_num_threads(threads)
    t_start = time.time()
    report: dict = {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "threads": threads}
    data_dir, assets = out / "data", out / "assets"
    assets.mkdir(parents=True, exist_ok=True)

    # 1. data: the last eval_problems train problems are held out for early stopping and checks
    train_p, test_p = arith.make_splits(cfg.n_train, cfg.n_test, cfg.seed)
    arith.write_split(train_p, data_dir / "arith_train.jsonl", "train")
    arith.write_split(test_p, data_dir / "arith_test.jsonl", "test")
    val_p, fit_p = train_p[-cfg.eval_problems :], train_p[: -cfg.eval_problems]
    log(f"data: {len(train_p)} train, {len(test_p)} test problems")

    # 2. tokenizer: saved beside the policy's config and read back the way every loader reads it
    policy_dir = assets / "demo-policy"
    if not reuse_policy:
        _replace_dir(policy_dir)
        tok = build.build_digit_tokenizer(None, [chat_text_raw(p.question(), p.solution()) for p in fit_p[:4000]])
        tok.save_pretrained(str(policy_dir))
        build.model_config("qwen2", tok, **POLICY_SIZE).save_pretrained(str(policy_dir))
    tok = AutoTokenizer.from_pretrained(str(policy_dir))

    # 3. policy: one run from scratch; the shipped policy is the checkpoint at which held-out pass@1
    # first reaches the target (right often, not always); the run goes on to its end, and that
    # stronger checkpoint (not shipped) is what the reward models start from: a verifier that knows
    # the arithmetic better than the policy it judges, as real PRMs/RMs usually do
    t0 = time.time()
    base_dir = build_dir(out) / "verifier-base"
    if reuse_policy:
        report["policy"] = json.loads((policy_dir / "winnow_model.json").read_text())
    else:
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(build.model_config("qwen2", tok, **POLICY_SIZE))
        examples = [lm_example(tok, p.question(), p.solution()) for p in fit_p]
        history: list[dict] = []
        snapshot: dict = {}
        low, _ = cfg.target_pass1
        engine = policy_engine(policy_dir, model)

        def evaluate(step: int) -> bool:
            if snapshot and step < cfg.policy_steps:
                return False
            figures = metrics(raw_records(val_p, sample(engine, val_p, HELD_OUT_SAMPLES, cfg.seed)))
            pass1, pass8 = figures["pass@1"], figures["pass@n"]
            history.append({"step": step, "pass@1": round(pass1, 4), "pass@8": round(pass8, 4)})
            log(f"policy step {step}: held-out pass@1 {pass1:.3f} pass@8 {pass8:.3f}")
            if not snapshot and low <= pass1:
                snapshot.update(step=step, state={k: v.detach().clone() for k, v in model.state_dict().items()})
            return False

        train_policy(model, tok, examples, cfg, evaluate)
        _replace_dir(base_dir)
        model.save_pretrained(str(base_dir))
        tok.save_pretrained(str(base_dir))
        if snapshot:
            model.load_state_dict(snapshot["state"])
        model.save_pretrained(str(policy_dir))
        _save_tokenizer_and_generation(tok, model, policy_dir)
        report["policy"] = {
            "params": sum(p.numel() for p in model.parameters()),
            "step": snapshot.get("step", cfg.policy_steps),
            "evals": history,
            "verifier_base_step": cfg.policy_steps,
            "seconds": round(time.time() - t0),
        }
        _write_json(policy_dir / "winnow_model.json", {"role": "policy", "task": "demo-arith", **report["policy"]})
    if policy_only:
        return report
    policy = policy_engine(policy_dir)

    # 4. labelled data: policy samples of train problems (every distinct one, its steps re-checked);
    # the training batches add fresh synthetic right/wrong pairs (see reward_batches)
    t0 = time.time()
    label_p = fit_p[: cfg.label_problems]
    data = label_samples(label_p, sample(policy, label_p, cfg.label_samples, cfg.seed + 7))
    report["labels"] = {
        "problems": len(label_p),
        "policy_samples": len(data),
        "policy_right": sum(d.correct for d in data),
        "steps": sum(len(d.steps) for d in data),
        "good_steps": sum(sum(d.checks) for d in data),
        "seconds": round(time.time() - t0),
    }
    log(f"labelled samples: {report['labels']}")

    # 5. reward models: the line phase, then the PRM and the classifier from it
    t0 = time.time()
    prm, rm = train_reward_models(base_dir, tok, data, fit_p, cfg)
    prm_dir, rm_dir = assets / "demo-prm", assets / "demo-rm"
    _replace_dir(prm_dir)
    prm.config.winnow_prm = PRM_HINT
    prm.save_pretrained(str(prm_dir))
    _save_tokenizer_and_generation(tok, prm, prm_dir)
    _replace_dir(rm_dir)
    rm.save_pretrained(str(rm_dir))
    tok.save_pretrained(str(rm_dir))
    report["reward_models"] = {"seconds": round(time.time() - t0)}

    # 7. a check on held-out problems: does selection by each model beat one sample? (demo_world.report's
    # table, on train problems the policy never saw)
    records = raw_records(val_p, sample(policy, val_p, HELD_OUT_SAMPLES, cfg.seed + 11))
    score_records(records, {PRM: prm_dir, RM: rm_dir})
    figures = metrics(records)
    report["held_out_check"] = {
        name.replace("@n", f"@{HELD_OUT_SAMPLES}"): round(value, 4)
        for name, value in figures.items()
        if name != "problems"
    }
    log(f"held-out check: {report['held_out_check']}")
    report["seconds"] = round(time.time() - t_start)
    _write_json(assets / "train_report.json", report)
    return report


def build_dir(out: Path) -> Path:
    """Where intermediate checkpoints go (not shipped): under ``$WINNOW_CACHE``, keyed by ``out``."""
    import hashlib

    from winnow.demo import cache_dir

    return cache_dir() / "demo-world-build" / hashlib.md5(str(out.resolve()).encode()).hexdigest()[:12]


def chat_text_raw(question: str, solution: str) -> str:
    """ChatML text without a tokenizer (the corpus the tokenizer is trained on)."""
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{solution} {STEP_TAG}<|im_end|>\n"


def _replace_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo_world.train", description="Reproduce the demo world.")
    ap.add_argument("--all", action="store_true", help="build data, tokenizer, policy, PRM and RM")
    ap.add_argument(
        "--out",
        default=str(PACKAGE),
        help="where data/ and assets/ go (default: the installed package's src/winnow/demo)",
    )
    ap.add_argument("--quick", action="store_true", help="a shortened run that only checks the scripts work")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--reuse_policy",
        action="store_true",
        help="keep the trained policy (and its verifier base in $WINNOW_CACHE); retrain PRM and RM",
    )
    ap.add_argument("--policy_only", action="store_true", help="stop after training the policy")
    args = ap.parse_args(argv)
    if not args.all:
        ap.error("nothing to do: pass --all")
    cfg = WorldConfig.quick() if args.quick else WorldConfig()
    cfg.seed = args.seed
    report = build_world(
        Path(args.out), cfg, threads=args.threads, reuse_policy=args.reuse_policy, policy_only=args.policy_only
    )
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
