"""Reinforcement fine-tuning (rejection-sampling fine-tuning) in winnow's demo world.

    python examples/rft.py            # 3 iterations, a few minutes on 2 CPU cores

Each iteration: **sample** train problems with winnow (N per problem, temperature 1) -> **filter**
with the ``math`` ORM (keep the right samples, at most 2 distinct ones per problem) -> **fine-tune**
the policy on the kept samples (a plain PyTorch loop, loss on the assistant tokens) -> **evaluate**
pass@1 on the test split with winnow again. Starts from ``demo-policy``; models go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's demo_world/

import winnow  # noqa: E402
from demo_world import report, train  # noqa: E402
from winnow.demo import resolve_model  # noqa: E402


def sample(model: str, dataset: str, n: int, out: Path, name: str, seed: int) -> list[dict]:
    """One winnow run scored by the math ORM; its raw records (one per problem, every sample)."""
    winnow.sample(
        model=model,
        dataset=[dataset],
        num_return_sequences=n,
        temperature=1.0,
        max_new_tokens=64,
        orm_model="math",
        output_format="raw",
        output_dir=str(out),
        output_file=name,
        override_exist_file=True,
        seed=seed,
        progress=False,
    )
    return report.read_raw(out / name)


def is_right(completion: dict) -> bool:
    return report.correct(completion, None)  # the math ORM's verdict


def pass_at_1(records: list[dict]) -> float:
    """The mean fraction of right samples per problem."""
    return sum(sum(map(is_right, r["completions"])) / len(r["completions"]) for r in records) / len(records)


def keep_right(records: list[dict], per_problem: int) -> list[tuple[str, str]]:
    """(question, solution) pairs the ORM accepted, distinct, at most ``per_problem`` each."""
    kept = []
    for r in records:
        question = next(m["content"] for m in reversed(r["messages"]) if m["role"] == "user")
        right = list(dict.fromkeys(c["text"] for c in r["completions"] if is_right(c)))
        kept += [(question, s) for s in right[:per_problem]]
    return kept


def finetune(model_dir: str, pairs: list[tuple[str, str]], out_dir: Path, steps: int, lr: float, seed: int) -> None:
    """Supervised fine-tuning on the kept samples; saves the model (with tokenizer) to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    examples = [train.lm_example(tok, q, s) for q, s in pairs]
    cfg = train.WorldConfig(seed=seed, policy_steps=steps, policy_batch=min(32, len(examples)), policy_lr=lr)
    train.train_policy(model, tok, examples, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    train._save_tokenizer_and_generation(tok, model, out_dir)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo-policy", help="the starting policy (a name or a directory)")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--train_problems", type=int, default=500, help="train problems sampled per iteration")
    ap.add_argument("--samples", type=int, default=4, help="samples per train problem")
    ap.add_argument("--eval_problems", type=int, default=200, help="test problems for pass@1")
    ap.add_argument("--eval_samples", type=int, default=4, help="samples per test problem (pass@1 is their mean)")
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps per iteration")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--out", default="rft_output")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    out = Path(args.out)
    test = f"demo-arith#{args.eval_problems}"
    model = resolve_model(args.model) or args.model
    history = []
    start = time.time()
    p1 = pass_at_1(sample(model, test, args.eval_samples, out, "eval-0.jsonl", args.seed))
    history.append({"iteration": 0, "pass@1": p1, "kept": None})
    print(f"iteration 0 (demo-policy): test pass@1 {p1:.1%}", flush=True)
    for it in range(1, args.iterations + 1):
        # fresh train problems each iteration (the dataset is shuffled with a different seed)
        records = sample(
            model, f"demo-arith-train#{args.train_problems}", args.samples, out, f"train-{it}.jsonl", args.seed + it
        )
        pairs = keep_right(records, per_problem=2)
        print(
            f"iteration {it}: sampled {len(records) * args.samples}, kept {len(pairs)} right (train pass@1 "
            f"{pass_at_1(records):.1%})",
            flush=True,
        )
        target = out / f"policy-{it}"
        finetune(model, pairs, target, args.steps, args.lr, args.seed + it)
        model = str(target)
        p1 = pass_at_1(sample(model, test, args.eval_samples, out, f"eval-{it}.jsonl", args.seed))
        history.append({"iteration": it, "pass@1": p1, "kept": len(pairs)})
        print(f"iteration {it}: test pass@1 {p1:.1%}", flush=True)
    print(f"\n| iteration | kept samples | test pass@1 ({args.eval_problems} problems x {args.eval_samples}) |")
    print("|---|---|---|")
    for h in history:
        print(f"| {h['iteration']} | {h['kept'] if h['kept'] is not None else '-'} | {h['pass@1']:.1%} |")
    print(f"\n{time.time() - start:.0f}s in all")
    (out / "rft_history.json").write_text(json.dumps(history, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
