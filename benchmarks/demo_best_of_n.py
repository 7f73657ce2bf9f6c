"""Best-of-N in the demo world: pass@1, majority@N, PRM-best@N, RM-best@N and pass@N for several N.

    python benchmarks/demo_best_of_n.py --n 200 --samples 16

One ``winnow sample`` run with the largest N; smaller N use the first N samples of each problem.
Not a timed test: it prints a table (see docs/demo.md for the figures).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's demo_world/

from demo_world import report  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--output_dir", default="demo_bench_output")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    cmd = report.sample_command(args.n, args.samples, args.output_dir, args.seed)
    subprocess.run([sys.executable, "-m", "winnow", *cmd], check=True)
    records = report.read_raw(Path(args.output_dir) / "raw.jsonl")
    print("| N | pass@1 | majority@N | PRM-best@N | RM-best@N | pass@N |")
    print("|---|---|---|---|---|---|")
    k = 1
    while k <= args.samples:
        m = report.metrics([{**r, "completions": r["completions"][:k]} for r in records])
        print(
            f"| {k} | {m['pass@1']:.1%} | {m['majority@n']:.1%} | {m['prm-best@n']:.1%} | {m['rm-best@n']:.1%} "
            f"| {m['pass@n']:.1%} |"
        )
        k *= 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
