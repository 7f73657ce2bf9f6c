#!/usr/bin/env python
"""Test-time search in the demo world: accuracy against generated tokens for best-of-N, majority vote,
beam search, DVTS and MCTS, at equal token budgets, and the search overhead.

    python benchmarks/search_demo.py                         # 100 test problems, budgets 4 16 64: minutes
    python benchmarks/search_demo.py --problems 500 --split test
    python benchmarks/search_demo.py --split train           # choose settings here, never on the test split

Every strategy runs through ``winnow sample`` (in this process, on one loaded transformers engine) with
the same policy (demo-policy, temperature 1), the same PRM (demo-prm) and the same ORM (math), and writes
raw output; the figures come from ``winnow.report``'s estimators:

- best-of-N (``sample``): one run of max(budgets) samples per problem; best-of-k by the PRM, majority@k and
  PRM-weighted vote@k at each budget k are exact expectations over k-subsets of it, and its tokens are
  k/N of the run's.
- beam, dvts, mcts: one run per budget N (``--num_return_sequences N``); the answer is the group's best
  by the PRM (what selection keeps), and its tokens are every token the search generated (``compute``).

Then each search point is compared with best-of-N and majority vote *at the same generated tokens* (their
curves interpolated in log tokens between budgets). ``--overhead`` also times a search run against
plain sampling of the same number of tokens on the same engine (goal: <= 1.5 on the transformers
engine). The last lines print the ``winnow report`` command that draws every strategy on one axis.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from winnow import report
from winnow.config import ReportConfig, SampleConfig
from winnow.engines import get_engine
from winnow.pipeline import sample

PRM, ORM = "demo-prm", "math"
SEARCHES = ("beam", "dvts", "mcts")


class TimedEngine:
    """The run's engine, timing its ``generate`` calls (the search's generation, apart from its PRM work)."""

    def __init__(self, engine):
        self.engine = engine
        self.name = engine.name
        self.seconds = 0.0

    async def generate(self, prompts, params):
        started = time.perf_counter()
        try:
            return await self.engine.generate(prompts, params)
        finally:
            self.seconds += time.perf_counter() - started

    def batch_plan(self, n: int) -> tuple[int, int]:
        return self.engine.batch_plan(n)

    def describe(self) -> dict:
        return self.engine.describe()

    def generation_defaults(self) -> dict:
        return self.engine.generation_defaults()

    async def aclose(self) -> None:
        await self.engine.aclose()


def run(strategy: str, n: int, args: argparse.Namespace, engine, out: Path, **extra) -> tuple[Path, float]:
    """One ``winnow sample`` run; (its raw output, its wall seconds)."""
    name = f"{strategy}-{n}.jsonl"
    options = dict(
        model="demo-policy",
        dataset=[f"{args.dataset}#{args.problems}"],
        sampler_type=strategy,
        num_return_sequences=n,
        temperature=1.0,
        max_new_tokens=64,
        orm_model=ORM,
        prm_model=PRM,
        output_format="raw",
        output_dir=str(out),
        output_file=name,
        override_exist_file=True,
        seed=args.seed,
        progress=False,
        reward_kwargs={"prm": {"batch_size": args.prm_batch}},
    )
    if strategy in SEARCHES:
        options.update(
            search_width=args.width,
            search_prm_agg=args.search_prm_agg,
            search_filter_duplicates=args.filter_duplicates,
            search_lookahead=args.lookahead,
        )
    if strategy == "mcts":
        options.update(mcts_exploration=args.mcts_c, mcts_rollout_depth=args.mcts_rollout)
    options.update(extra)
    started = time.perf_counter()
    sample(SampleConfig(**options), engine=engine)
    return out / name, time.perf_counter() - started


def rows(path: Path, ks: list[int]) -> list[report.Row]:
    config = ReportConfig(outputs=[str(path)], bootstrap=0, plots=False, answer_match="exact", rewards=[PRM])
    return report.scaling(report.load_run(path, config), ks, draws=200, bootstrap=0)


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """y at x on the polyline through ``points`` (x on a log scale); None outside it."""
    points = sorted(points)
    if points and points[-1][0] < x <= points[-1][0] * 1.02:  # a hair past the last budget: its value
        return points[-1][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            t = 0.0 if x1 == x0 else (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return None


def overhead(args: argparse.Namespace, engine, out: Path) -> None:
    """A beam search's wall time (whole run, and its engine calls alone) against plain samples of as many
    tokens on the same engine, per generated token."""
    timed = TimedEngine(engine)
    path, wall = run("beam", args.overhead, args, timed, out / "overhead")
    manifest = json.loads(path.with_name(path.stem + ".manifest.json").read_text())
    tokens = manifest["compute"]["completion_tokens"]
    problems = manifest["counts"]["groups_written"]
    # plain samples of the same problems, N chosen so that their tokens match the search's
    probe, _ = run("sample", 4, args, engine, out / "probe", orm_model=None, prm_model=None)
    per_sample = json.loads(probe.with_name(probe.stem + ".manifest.json").read_text())["counts"][
        "completion_tokens"
    ] / (4 * problems)
    n = max(1, round(tokens / (per_sample * problems)))
    plain_timed = TimedEngine(engine)
    plain, plain_wall = run("sample", n, args, plain_timed, out / "plain", orm_model=None, prm_model=None)
    plain_tokens = json.loads(plain.with_name(plain.stem + ".manifest.json").read_text())["counts"]["completion_tokens"]
    per_token = {"search": wall / tokens, "search engine": timed.seconds / tokens, "plain": plain_wall / plain_tokens}
    print(
        f"\noverhead (beam N={args.overhead}, {problems} problems): the search generated {tokens:,} tokens in "
        f"{wall:.1f} s ({timed.seconds:.1f} s of it in {manifest['compute']['engine_calls']} engine calls, the rest "
        f"{manifest['compute']['prm_evaluations']:,} PRM evaluations and the ORM); plain sampling N={n} "
        f"(no rewards) generated {plain_tokens:,} tokens in {plain_wall:.1f} s"
    )
    print(
        f"  wall time per generated token, search / plain sampling: whole run "
        f"{per_token['search'] / per_token['plain']:.2f}, generation alone "
        f"{per_token['search engine'] / per_token['plain']:.2f} (goal <= 1.5)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=("test", "train"), default="test")
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--budgets", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--strategies", nargs="+", default=["sample", *SEARCHES])
    ap.add_argument("--width", type=int, default=4, help="--search_width (M)")
    ap.add_argument("--search_prm_agg", default="min")
    ap.add_argument("--filter_duplicates", type=lambda s: s.lower() == "true", default=True)
    ap.add_argument("--lookahead", type=int, default=0)
    ap.add_argument("--mcts_c", type=float, default=0.2)
    ap.add_argument("--mcts_rollout", type=int, default=0)
    ap.add_argument("--prm_batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--overhead", type=int, default=16, help="time beam search at this N (0: do not)")
    ap.add_argument("--output_dir", default="search_bench_output")
    args = ap.parse_args()
    args.dataset = "demo-arith" if args.split == "test" else "demo-arith-train"
    out = Path(args.output_dir)
    engine = get_engine("transformers", "demo-policy", torch_dtype="auto", device="cpu", seed=args.seed)
    results: dict[str, list[tuple[int, report.Row, float]]] = {}
    paths: list[tuple[str, Path]] = []
    curve: list[report.Row] = []  # best-of-N at every k = 1, 2, 4, ...: what the searches are compared with
    if "sample" in args.strategies:
        path, wall = run("sample", max(args.budgets), args, engine, out)
        curve = rows(path, report.ks_for(max(args.budgets)))
        results["best-of-N"] = [(r.k, r, wall * r.k / max(args.budgets)) for r in curve if r.k in args.budgets]
        paths.append(("best-of-N", path))
    for strategy in [s for s in args.strategies if s in SEARCHES]:
        for n in args.budgets:
            if n % args.width and strategy != "mcts":
                continue
            path, wall = run(strategy, n, args, engine, out)
            (row,) = rows(path, [n])
            results.setdefault(strategy, []).append((n, row, wall))
            paths.append((strategy, path))
            print(
                f"{strategy} N={n}: {row.metrics[f'best:{PRM}'].value:.1%} at {row.tokens:,.0f} tokens/problem "
                f"({wall:.0f} s)",
                file=sys.stderr,
            )
    print(
        f"\n{args.problems} {args.split} problems; demo-policy T=1, demo-prm; M={args.width}, "
        f"search_prm_agg={args.search_prm_agg}, filter_duplicates={args.filter_duplicates}, "
        f"lookahead={args.lookahead}, mcts c={args.mcts_c}, rollout={args.mcts_rollout}\n"
    )
    print("| strategy | N | tokens/problem | PRM-best | majority | PRM-weighted vote | pass@N | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, points in results.items():
        for n, row, wall in points:
            m = row.metrics
            print(
                f"| {name} | {n} | {row.tokens:,.0f} | {m[f'best:{PRM}'].value:.1%} | {m['majority'].value:.1%} | "
                f"{m[f'vote:{PRM}'].value:.1%} | {m['pass'].value:.1%} | {wall:.0f} |"
            )
    if curve:
        bon = [(r.tokens, r.metrics[f"best:{PRM}"].value) for r in curve]
        maj = [(r.tokens, r.metrics["majority"].value) for r in curve]
        print("\nAt equal generated tokens (best-of-N and majority interpolated in log tokens):\n")
        print("| strategy | N | tokens/problem | accuracy | best-of-N (PRM) | majority vote |")
        print("|---|---|---|---|---|---|")
        for name in [s for s in results if s != "best-of-N"]:
            for n, row, _ in results[name]:
                b, v = interpolate(bon, row.tokens), interpolate(maj, row.tokens)
                cell = lambda x: "outside" if x is None else f"{x:.1%}"  # noqa: E731
                print(
                    f"| {name} | {n} | {row.tokens:,.0f} | {row.metrics[f'best:{PRM}'].value:.1%} | {cell(b)} | "
                    f"{cell(v)} |"
                )
    if args.overhead:
        overhead(args, engine, out)
    labels = " ".join(name for name, _ in paths)
    print(
        f"\nplot: winnow report {' '.join(str(p) for _, p in paths)} --label {labels} --rewards {PRM} "
        f"--answer_match exact --output_dir {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
