"""Best-of-N in the demo world, from one ``winnow sample`` run.

    python -m demo_world.report                  # runs the sample command below, then prints the table
    python -m demo_world.report --from out.jsonl # the table of an existing raw output

The run samples ``--samples`` solutions per test problem from ``demo-policy`` and scores every one
with the ``math`` ORM (math-verify on ``\\boxed{}``), the ``demo-prm`` process reward model and the
``demo-rm`` classifier, writing one raw line per problem. From that one file:

- pass@1: the fraction of all samples that are right (the policy alone, temperature 1);
- majority@N: the most frequent boxed answer of each problem (self-consistency);
- PRM-best@N / RM-best@N: the sample the reward model scores highest;
- pass@N (oracle): whether any sample is right.

The figures come from ``winnow.report``'s estimators (``winnow report`` draws the whole curve).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from winnow import report
from winnow.demo import arith

PRM, RM, ORM = "demo-prm", "demo-rm", "math"


def sample_command(n: int, samples: int, output_dir: str, seed: int = 42, output_file: str = "raw.jsonl") -> list[str]:
    """The ``winnow sample`` arguments of the demo run."""
    return [
        "sample",
        "--model",
        "demo-policy",
        "--dataset",
        f"demo-arith#{n}",
        "--num_return_sequences",
        str(samples),
        "--temperature",
        "1.0",
        "--max_new_tokens",
        "64",
        "--orm_model",
        ORM,
        "--prm_model",
        PRM,
        "--reward_model",
        RM,
        "--output_format",
        "raw",
        "--output_dir",
        output_dir,
        "--output_file",
        output_file,
        "--override_exist_file",
        "true",
        "--seed",
        str(seed),
    ]


def correct(completion: dict, reference: str | None) -> bool:
    """The math ORM's verdict when present; the demo checker's otherwise."""
    score = (completion.get("scores") or {}).get(ORM)
    if score is not None and score.get("value") is not None:
        return float(score["value"]) > 0.5
    answer = arith.boxed_answer(completion.get("text", ""))
    return reference is not None and answer is not None and str(answer) == str(reference).strip()


def problem(record: dict) -> report.Problem | None:
    """A raw record as the report's estimators see it: the demo verdict, boxed answers, PRM and RM scores."""
    comps = [c for c in record["completions"] if c.get("finish_reason") != "error"]
    if not comps:
        return None
    ref = record.get("reference")
    samples = [
        report.Sample(
            correct(c, ref),
            arith.boxed_answer(c.get("text", "")),
            {k: report.score_values(c).get(k) for k in (PRM, RM)},
        )
        for c in comps
    ]
    return report.Problem(str(record.get("id")), samples)


def metrics(records: list[dict]) -> dict[str, float]:
    """pass@1, majority@N, PRM-best@N, PRM-weighted vote@N, RM-best@N and pass@N of raw records (winnow.report's
    estimators at k = 1 and k = N; ties go to the sample seen first)."""
    totals = Counter()
    problems = [p for p in map(problem, records) if p is not None]
    for p in problems:
        n = len(p.samples)
        at_n = report.problem_scores(p, n, rewards=(PRM, RM), vote_rewards=(PRM,), ties="first")
        totals["pass@1"] += report.pass_at_k(n, sum(s.correct for s in p.samples), 1)
        for name, key in (
            ("majority@n", "majority"),
            ("prm-best@n", f"best:{PRM}"),
            ("prm-vote@n", f"vote:{PRM}"),
            ("rm-best@n", f"best:{RM}"),
            ("pass@n", "pass"),
        ):
            totals[name] += at_n[key]
    n = max(1, len(problems))
    names = ("pass@1", "majority@n", "prm-best@n", "prm-vote@n", "rm-best@n", "pass@n")
    return {"problems": n, **{k: totals[k] / n for k in names}}


def table(m: dict[str, float], samples: int) -> str:
    """The metrics as a Markdown table."""
    rows = [
        ("pass@1 (one sample, T=1)", m["pass@1"]),
        (f"majority@{samples}", m["majority@n"]),
        (f"PRM-best@{samples} (demo-prm, min over steps)", m["prm-best@n"]),
        (f"PRM-weighted vote@{samples} (answer with the largest summed PRM score)", m["prm-vote@n"]),
        (f"RM-best@{samples} (demo-rm)", m["rm-best@n"]),
        (f"pass@{samples} (oracle)", m["pass@n"]),
    ]
    lines = [f"| {m['problems']} test problems, N={samples} | accuracy |", "|---|---|"]
    lines += [f"| {name} | {value:.1%} |" for name, value in rows]
    return "\n".join(lines)


def read_raw(path: str | Path) -> list[dict]:
    """The records of a raw output (a bad line is one error naming it)."""
    return [record for _, record in report.read_rows(Path(path))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo_world.report", description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="test problems")
    ap.add_argument("--samples", type=int, default=8, help="samples per problem (N)")
    ap.add_argument("--output_dir", default="demo_output")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--from", dest="source", help="summarise this raw output instead of sampling")
    args = ap.parse_args(argv)
    path = args.source
    if path is None:
        cmd = sample_command(args.n, args.samples, args.output_dir, args.seed)
        print("$ winnow " + shlex.join(cmd), flush=True)
        start = time.time()
        proc = subprocess.run([sys.executable, "-m", "winnow", *cmd])
        if proc.returncode != 0:
            return proc.returncode
        print(f"sampled and scored in {time.time() - start:.0f}s", flush=True)
        path = str(Path(args.output_dir) / "raw.jsonl")
    records = read_raw(path)
    samples = max((len(r["completions"]) for r in records), default=args.samples)
    print(table(metrics(records), samples))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
