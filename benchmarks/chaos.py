"""Chaos: random SIGKILLs of real ``winnow sample`` runs, each resumed, against a server that fails 30% of
requests, and a count of what went wrong.

    .venv/bin/python benchmarks/chaos.py                       # 50 cycles per scenario
    .venv/bin/python benchmarks/chaos.py --cycles 10 --scenarios client-stream

Scenarios: ``client`` and ``client-stream`` (the client engine against the fault-injecting server with
``--chaos 0.3``: 429/500/503, dropped connections, malformed bodies, empty answers and, when
streaming, streams cut mid-answer), and ``transformers`` (a tiny local model). Each cycle starts the
run (``--resume true`` after the first) and kills it with SIGKILL: one cycle in five at a random
moment of its start-up (loading, opening the output to resume), the others once a random number of
rows more are settled (mid-batch, mid-write); then the run is finished without kills, and once more
with the faults off so that rows left for a retry get their retry. Printed per scenario:

- lost: rows neither written nor in the failed log; duplicated: rows written twice;
- torn: output lines that do not parse; fragments: written answers that are not the whole answer;
- failed: rows in the failed log at the end (after the retry pass, should be 0).

Goal: all 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))

from fakeserver import FakeServer  # noqa: E402


def winnow(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "winnow", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def settled(out: Path) -> int:
    """Rows written or logged as failed so far (lines of the raw output and of the failed log)."""
    total = 0
    for path in (out / "o.jsonl", out / "o.failed.jsonl"):
        try:
            total += path.read_bytes().count(b"\n")
        except FileNotFoundError:
            pass
    return total


def check(out: Path, rows: int, expected: dict[str, str] | None) -> dict[str, int]:
    """Lost, duplicated, torn and fragment counts of a finished output."""
    torn = 0
    seen: dict[str, int] = {}
    fragments = 0
    for raw in (out / "o.jsonl").read_bytes().splitlines():
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            torn += 1
            continue
        key = str(record["k"])
        seen[key] = seen.get(key, 0) + 1
        if expected is not None:
            fragments += sum(1 for c in record["completions"] if c["text"] != expected[key])
    failed_path = out / "o.failed.jsonl"
    failed = (
        {str(e["source"]).rsplit(":", 1)[1] for e in map(json.loads, failed_path.read_text().splitlines())}
        if failed_path.exists()
        else set()
    )
    keys = {str(k) for k in range(rows)}
    # a JSONL dataset's source is "file:line": line = k + 1
    failed_keys = {str(int(line) - 1) for line in failed}
    return {
        "lost": len(keys - set(seen) - failed_keys),
        "duplicated": sum(v - 1 for v in seen.values() if v > 1),
        "torn": torn,
        "fragments": fragments,
        "failed": len(failed_keys),
    }


def scenario(name: str, cycles: int, work: Path, rng: random.Random, model: str | None) -> dict:
    rows = 500 if name.startswith("client") else 160
    data = work / "d.jsonl"
    data.write_text("".join(json.dumps({"query": f"What is {k} + {k}?", "k": k}) + "\n" for k in range(rows)))
    out = work / "out"
    expected = (
        {str(k): f"The answer is \\boxed{{{2 * k}}}." for k in range(rows)} if name.startswith("client") else None
    )
    server = FakeServer(latency=0.05, chaos=0.3, chaos_seed=rng.randrange(10**6))
    with server.running():
        args = [
            "sample",
            "--dataset",
            str(data),
            "--output_dir",
            str(out),
            "--output_file",
            "o.jsonl",
            "--output_format",
            "raw",
            "--progress",
            "false",
            "--seed",
            "1",
        ]
        if name.startswith("client"):
            engine = {"base_url": server.url, "retry_base_s": 0.01, "retry_max_s": 0.05}
            args += [
                "--sampler_engine",
                "client",
                "--model",
                "fake",
                "--num_return_sequences",
                "2",
                "--max_concurrency",
                "16",
                "--max_retries",
                "5",
                "--engine_kwargs",
                json.dumps(engine),
            ]
            if name == "client-stream":
                args += ["--stream", "true"]
            startup = 1.5
        else:
            args += [
                "--model",
                model or "demo-tiny",
                "--num_return_sequences",
                "4",
                "--max_new_tokens",
                "32",
                "--num_sampling_batch_size",
                "2",
            ]
            startup = 6.0
        kills = finished_early = 0
        started = time.monotonic()
        step = max(2, 2 * rows // max(1, cycles))  # so that the kills, not the runs, end most cycles
        for cycle in range(cycles):
            before = settled(out)
            proc = winnow(args + (["--resume", "true"] if cycle else []))
            if rng.random() < 0.2:  # killed early: while starting, loading or opening the output to resume
                deadline = time.monotonic() + rng.uniform(0.0, startup)
                target = None
            else:  # killed after a random number of rows more, mid-batch and mid-write alike
                deadline = time.monotonic() + 600
                target = before + rng.randint(1, step)
            while proc.poll() is None and time.monotonic() < deadline and (target is None or settled(out) < target):
                time.sleep(0.005)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                kills += 1
            else:
                finished_early += 1
        final = winnow(args + ["--resume", "true"])
        final.wait()
        server.defaults["chaos"] = 0.0  # the faults stop: the rows logged for a retry get it
        retry = winnow(args + ["--resume", "true"])
        retry.wait()
        counts = check(out, rows, expected)
        return {
            "scenario": name,
            "rows": rows,
            "cycles": cycles,
            "kills": kills,
            "finished_before_kill": finished_early,
            "exit_codes": [final.returncode, retry.returncode],
            **counts,
            "faults_injected": sum(server.faults_hit.values()),
            "wall_s": round(time.monotonic() - started, 1),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=50)
    ap.add_argument("--scenarios", nargs="*", default=["client", "client-stream", "transformers"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="local model for the transformers scenario (default demo-tiny)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    results = []
    for name in args.scenarios:
        with tempfile.TemporaryDirectory(prefix=f"chaos-{name}-") as tmp:
            result = scenario(name, args.cycles, Path(tmp), rng, args.model)
        results.append(result)
        print(json.dumps(result), flush=True)
    bad = sum(r[k] for r in results for k in ("lost", "duplicated", "torn", "fragments", "failed"))
    print(
        f"chaos: {sum(r['kills'] for r in results)} kills over {len(results)} scenarios: "
        + ("all counts 0" if bad == 0 else f"{bad} problems (see above)")
    )
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
