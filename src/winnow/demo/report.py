"""Best-of-N in the demo world, from one ``winnow sample`` run.

    python -m winnow.demo.report                  # runs the sample command below, then prints the table
    python -m winnow.demo.report --from out.jsonl # the table of an existing raw output

The run samples ``--samples`` solutions per test problem from ``demo-policy`` and scores every one
with the ``math`` ORM (math-verify on ``\\boxed{}``), the ``demo-prm`` process reward model and the
``demo-rm`` classifier, writing one raw line per problem. From that one file:

- pass@1: the fraction of all samples that are right (the policy alone, temperature 1);
- majority@N: the most frequent boxed answer of each problem (self-consistency);
- PRM-best@N / RM-best@N: the sample the reward model scores highest;
- pass@N (oracle): whether any sample is right.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from winnow.demo import arith

PRM, RM, ORM = "demo-prm", "demo-rm", "math"


def sample_command(n: int, samples: int, output_dir: str, seed: int = 42, output_file: str = "raw.jsonl") -> list[str]:
    """The ``winnow sample`` arguments of the demo run."""
    return ["sample", "--model", "demo-policy", "--dataset", f"demo-arith#{n}", "--num_return_sequences",
            str(samples), "--temperature", "1.0", "--max_new_tokens", "64", "--orm_model", ORM,
            "--prm_model", PRM, "--reward_model", RM, "--output_format", "raw", "--output_dir", output_dir,
            "--output_file", output_file, "--override_exist_file", "true", "--seed", str(seed)]


def correct(completion: dict, reference: str | None) -> bool:
    """The math ORM's verdict when present; the demo checker's otherwise."""
    score = (completion.get("scores") or {}).get(ORM)
    if score is not None and score.get("value") is not None:
        return float(score["value"]) > 0.5
    answer = arith.boxed_answer(completion.get("text", ""))
    return reference is not None and answer is not None and str(answer) == str(reference).strip()


def _best(completions: list[dict], key: str) -> dict | None:
    """The completion ``key`` scores highest (the first of equals); None if it scored none."""
    scored = [(c["scores"][key]["value"], -i, c) for i, c in enumerate(completions)
              if (c.get("scores") or {}).get(key, {}).get("value") is not None]
    return max(scored, key=lambda t: (t[0], t[1]))[2] if scored else None


def _majority(completions: list[dict]) -> dict | None:
    """A completion carrying the most frequent boxed answer (ties: the answer seen first)."""
    answers = [(arith.boxed_answer(c.get("text", "")), c) for c in completions]
    counts = Counter(a for a, _ in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(c for a, c in answers if a is not None and counts[a] == top)


def _weighted_vote(completions: list[dict], key: str) -> dict | None:
    """A completion carrying the boxed answer whose samples' ``key`` scores sum highest."""
    totals: dict[int, float] = {}
    first: dict[int, dict] = {}
    for c in completions:
        answer = arith.boxed_answer(c.get("text", ""))
        value = (c.get("scores") or {}).get(key, {}).get("value")
        if answer is not None and value is not None:
            totals[answer] = totals.get(answer, 0.0) + float(value)
            first.setdefault(answer, c)
    return first[max(totals, key=totals.__getitem__)] if totals else None


def metrics(records: list[dict]) -> dict[str, float]:
    """pass@1, majority@N, PRM-best@N, RM-best@N and pass@N of raw records."""
    totals = Counter()
    for r in records:
        comps = [c for c in r["completions"] if c.get("finish_reason") != "error"]
        if not comps:
            continue
        ref = r.get("reference")
        right = [correct(c, ref) for c in comps]
        totals["problems"] += 1
        totals["pass@1"] += sum(right) / len(right)
        totals["pass@n"] += any(right)
        for name, pick in (("majority@n", _majority(comps)), ("prm-best@n", _best(comps, PRM)),
                           ("prm-vote@n", _weighted_vote(comps, PRM)), ("rm-best@n", _best(comps, RM))):
            totals[name] += pick is not None and correct(pick, ref)
    n = max(1, totals.pop("problems"))
    names = ("pass@1", "majority@n", "prm-best@n", "prm-vote@n", "rm-best@n", "pass@n")
    return {"problems": n, **{k: totals[k] / n for k in names}}


def table(m: dict[str, float], samples: int) -> str:
    """The metrics as a Markdown table."""
    rows = [("pass@1 (one sample, T=1)", m["pass@1"]), (f"majority@{samples}", m["majority@n"]),
            (f"PRM-best@{samples} (demo-prm, min over steps)", m["prm-best@n"]),
            (f"PRM-weighted vote@{samples} (answer with the largest summed PRM score)", m["prm-vote@n"]),
            (f"RM-best@{samples} (demo-rm)", m["rm-best@n"]), (f"pass@{samples} (oracle)", m["pass@n"])]
    lines = [f"| {m['problems']} test problems, N={samples} | accuracy |", "|---|---|"]
    lines += [f"| {name} | {value:.1%} |" for name, value in rows]
    return "\n".join(lines)


def read_raw(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m winnow.demo.report", description=__doc__.splitlines()[0])
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
