"""The code sandbox and the ``code`` reward on HumanEval: correctness, verifications/s one at a time vs a
pool, and the hostile-program suite's outcomes.

    PYTHONPATH=src .venv/bin/python benchmarks/code_sandbox.py [--workers 2 4] [--rounds 1]

Data: ../shared/data/external/humaneval_openai/ (openai/human-eval, MIT): HumanEval.jsonl.gz (164
problems with canonical solutions: all must pass), example_problem.jsonl + example_samples.jsonl (one
problem, 6 samples; the repo's expected pass@1 is 0.5). Exits 1 if a canonical solution fails, a
hostile program breaks a limit, or anything is left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from hostile_programs import (  # noqa: E402 - the tests' hostile suite, shared
    EXPECTED_LIMIT,
    HOSTILE,
    LIMITS,
    new_marker,
    outside_targets,
    processes_with,
    program,
    sandbox_folders,
)

from winnow.rewards import sandbox  # noqa: E402
from winnow.rewards.base import Sample  # noqa: E402
from winnow.rewards.code import CodeReward  # noqa: E402
from winnow.schema import Completion, Prompt  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared/data/external/humaneval_openai"


def samples_for(row: dict, texts: list[str]) -> list[Sample]:
    """A HumanEval row as the pipeline sees it (the prompt is the user turn) with completions."""
    columns = {k: v for k, v in row.items() if k != "prompt"}
    prompt = Prompt(id=row["task_id"], messages=[{"role": "user", "content": row["prompt"]}], columns=columns)
    return [Sample(prompt, Completion(text=t)) for t in texts]


def score(samples: list[Sample], workers: int, **options) -> tuple[list, float]:
    reward = CodeReward(workers=workers, **options)
    start = time.perf_counter()
    scores = asyncio.run(reward.score(samples))
    seconds = time.perf_counter() - start
    reward.sandbox.close()
    return scores, seconds


def humaneval(workers_list: list[int], rounds: int) -> bool:
    with gzip.open(DATA / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    samples = [s for row in rows for s in samples_for(row, [row["canonical_solution"]])] * rounds
    ok = True
    print(f"HumanEval canonical solutions ({len(rows)} problems x {rounds} round(s)):")
    for workers in [1, *workers_list]:
        scores, seconds = score(samples, workers)
        passed = sum(s.value == 1.0 for s in scores)
        ok &= passed == len(samples)
        label = "one at a time" if workers == 1 else f"pool of {workers}"
        print(
            f"  {label:14s} {passed}/{len(samples)} passed in {seconds:5.1f}s = {len(samples) / seconds:5.1f} "
            f"verifications/s"
        )
    return ok


def examples() -> None:
    row = json.loads((DATA / "example_problem.jsonl").read_text())
    texts = [json.loads(line)["completion"] for line in (DATA / "example_samples.jsonl").read_text().splitlines()]
    scores, _ = score(samples_for(row, texts), 2)
    print(f"\nexample_samples.jsonl ({row['task_id']}, {len(texts)} samples), timeout 5 s:")
    for text, s in zip(texts, scores, strict=True):
        print(f"  {s.value:.0f}  {text!r:58.58s} {s.info['verdict']}")
    print(f"  pass@1 = {sum(s.value for s in scores) / len(scores):.2f} (the human-eval repo expects 0.5)")


def hostile() -> bool:
    modes = ["namespaces", "none"] if sandbox.isolation() == "namespaces" else ["none"]
    print(
        f"\nhostile programs (timeout {LIMITS.timeout_s:.0f} s, memory {LIMITS.memory_mb} MB, "
        f"{LIMITS.max_processes} processes, file {LIMITS.file_size_mb} MB, output {LIMITS.max_output_bytes} B; "
        f"euid {os.geteuid()}):"
    )
    os.environ["WINNOW_BENCH_SECRET"] = secret = "s3cret-" + new_marker()
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    ok = True
    for mode in modes:
        for name in HOSTILE:
            marker = new_marker()
            targets = outside_targets(marker)
            before = sandbox_folders()
            r = sandbox.run_python(
                program(name, marker, port=server.getsockname()[1], targets=targets), limits=LIMITS, isolation_mode=mode
            )
            left = processes_with(marker)
            files = [t for t in targets if os.path.exists(t)] + sorted(sandbox_folders() - before)
            try:
                server.accept()[0].close()
                note = "a connection reached the host"
            except BlockingIOError:
                note = ""
            verdict = r.limit or (f"exit {r.exit_code}" if r.exit_code is not None else f"signal {r.signal}")
            expected = EXPECTED_LIMIT.get(name, "exit 1" if name == "socket" and mode == "namespaces" else "exit 0")
            fine = (
                r.error is None
                and r.duration_s < LIMITS.timeout_s + 3
                and not left
                and not files
                and verdict == expected
                and secret not in r.stdout
                and (not note or mode == "none")
            )
            ok &= fine
            print(
                f"  {mode:10s} {name:14s} {verdict:8s} {r.duration_s:5.2f}s  processes left {len(left)}, "
                f"files left {len(files)}  {'ok' if fine else 'FAILED'} {note}"
            )
    server.close()
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[os.cpu_count() or 2])
    parser.add_argument("--rounds", type=int, default=1, help="run the 164 solutions this many times")
    args = parser.parse_args()
    box = sandbox.Sandbox(workers=1)
    print(
        f"isolation: {sandbox.isolation()}, interpreter {sandbox.default_python()}, "
        f"per-run uid: {box.describe()['per_run_uid']}, {os.cpu_count()} CPUs\n"
    )
    box.close()
    ok = humaneval(args.workers, args.rounds)
    examples()
    ok &= hostile()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
