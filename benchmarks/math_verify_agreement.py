"""Agreement of winnow's math reward with the human labels of GSM8K example model solutions, and speed.

    .venv/bin/python benchmarks/math_verify_agreement.py [--limit N] [--workers 2]

Data: ../shared/data/external/gsm8k_openai/example_model_solutions.jsonl (openai/grade-school-math, MIT):
1319 problems x 4 model solutions, each labelled is_correct. The reference is the problem's ground_truth
solution (its final "A: x" line is what math-verify finds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from winnow.rewards.mathverify import MathVerifier

DATA = Path(__file__).resolve().parents[2] / "shared/data/external/gsm8k_openai/example_model_solutions.jsonl"


def load(limit: int | None):
    pairs, labels = [], []
    with open(DATA, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                break
            row = json.loads(line)
            for value in row.values():
                if isinstance(value, dict) and "is_correct" in value:
                    pairs.append((value["solution"], row["ground_truth"]))
                    labels.append(bool(value["is_correct"]))
    return pairs, labels


def run(verifier: MathVerifier, pairs):
    start = time.perf_counter()
    out = verifier.verify_blocking(pairs)
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None, help="problems to use (default: all 1319)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    pairs, labels = load(args.limit)
    single, t1 = run(MathVerifier(workers=0), pairs)
    pool = MathVerifier(workers=args.workers)
    pool.verify_blocking(pairs[:8])  # start the workers outside the timing
    pooled, t2 = run(pool, pairs)
    pool.close()
    assert [v for v, _ in single] == [v for v, _ in pooled], "pool and single process disagree"
    judged = [(v, y) for (v, _), y in zip(single, labels, strict=True) if v is not None]
    agree = sum((v > 0) == y for v, y in judged)
    tp = sum(v > 0 and y for v, y in judged)
    fp = sum(v > 0 and not y for v, y in judged)
    fn = sum(v <= 0 and y for v, y in judged)
    print(
        json.dumps(
            {
                "solutions": len(pairs),
                "judged": len(judged),
                "cannot_judge": len(pairs) - len(judged),
                "agreement": round(agree / len(judged), 4),
                "false_accepts": fp,
                "false_rejects": fn,
                "true_accepts": tp,
                "single_process_per_s": round(len(pairs) / t1, 1),
                f"pool_{args.workers}_workers_per_s": round(len(pairs) / t2, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
