#!/usr/bin/env python
"""winnow sample on Ray: throughput with 1 and 2 engine replicas, and the Ray path's cost against the
plain single-process path at one replica (issue 17).

Two workloads, each run as ``plain`` (one process, the engine in it), ``ray x1`` and ``ray x2``
(``--ray true --num_workers 1|2`` on a local Ray started here, each replica one CPU):

- ``transformers``: the ``small`` random Qwen2 model (~30M parameters, built once into winnow's cache),
  ``--prompts`` prompts x ``--n`` samples x ``--max_new_tokens`` tokens, ``--batch`` prompts per engine
  call, one torch thread in every process (``OMP_NUM_THREADS=1``, as Ray gives a one-CPU replica);
- ``client``: the client engine against a latency-bound loopback server (``tests/support/fakeserver.py`` in its
  own process, ``--latency`` seconds per answer), ``--client_prompts`` prompts, ``--concurrency``
  requests in flight per replica (ideal: replicas x concurrency / latency requests/s).

The engine is built, and every replica is up, before the clock starts: the figures are steady-state
throughput (the whole pipeline: data, engine calls, output files); start-up is printed apart. Runs
alternate (plain, x1, x2) to share the machine's noise; medians are printed, then one JSON line.

On a shared machine other processes take cores too: before and after the transformers runs the
script measures what the machine gives two processes (``machine x2``: two one-thread torch matmul
loops run together against one alone), the ceiling any two-replica speed-up meets; every run prints
the cores its working processes (the replicas, or the one plain process) got, and the load average.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ray_scaling.py [--repeats 3] [--only transformers]

Goals: ray x2 / ray x1 >= 1.7; ray x1 / plain >= 0.9 (within 10%).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")


def make_dataset(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"query": f"What is {i} + {i + 1}?"}) + "\n")
    return path


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "support" / "fakeserver.py"), "--latency", str(latency)],
        stdout=subprocess.PIPE,
        text=True,
    )
    url = proc.stdout.readline().strip()
    deadline = time.monotonic() + 10
    while True:  # its health route, not a sleep
        try:
            with urllib.request.urlopen(url.rsplit("/v1", 1)[0] + "/health", timeout=2):
                return proc, url
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


MATMUL = """
import sys, time, torch
torch.set_num_threads(1)
a, b = torch.randn(512, 1536), torch.randn(1536, 512)
t, n = time.perf_counter(), 0
while time.perf_counter() - t < float(sys.argv[1]):
    for _ in range(20):
        a @ b
    n += 20
print(n / (time.perf_counter() - t))
"""


def machine_ceiling(seconds: float = 5.0) -> float:
    """Matmul throughput of two one-thread processes together over one alone, now."""

    def run(k: int) -> float:
        procs = [
            subprocess.Popen([sys.executable, "-c", MATMUL, str(seconds)], stdout=subprocess.PIPE, text=True)
            for _ in range(k)
        ]
        return sum(float(p.communicate()[0]) for p in procs)

    return run(2) / run(1)


def build_engine(config):
    """The run's engine, and (on Ray) every replica up; the seconds that took, and the processes
    that do the work (the replicas, else this one)."""
    import ray

    from winnow.pipeline import build_engine as build

    t = time.perf_counter()
    engine = build(config)
    pids = [os.getpid()]
    if config.ray:
        pids = [info["pid"] for info in ray.get([r.handle.info.remote() for r in engine.pool.replicas])]
    return engine, time.perf_counter() - t, pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(config, engine, pids: list[int]) -> dict:
    """One run on an engine already built: samples/s and tokens/s of the whole pipeline, and the
    cores the working processes got meanwhile (what the shared machine granted)."""
    import winnow

    before = [cpu_seconds(p) for p in pids]
    summary = winnow.sample(config, engine=engine)
    cores = sum(cpu_seconds(p) - b for p, b in zip(pids, before, strict=True)) / summary.wall_s
    assert summary.status == "finished" and summary.rows_failed == 0, summary.line()
    return {
        "samples_s": summary.samples / summary.wall_s,
        "tok_s": summary.completion_tokens / summary.wall_s,
        "wall_s": summary.wall_s,
        "cores": cores,
    }


def run_workload(name: str, base: dict, repeats: int, work: Path) -> dict:
    import asyncio

    from winnow.config import SampleConfig

    modes = {"plain": {}, "ray x1": {"ray": True, "num_workers": 1}, "ray x2": {"ray": True, "num_workers": 2}}
    results: dict[str, list[dict]] = {m: [] for m in modes}
    starts: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(repeats):
        for mode, extra in modes.items():
            config = SampleConfig(
                **base, **extra, output_dir=str(work / name), output_file=f"{mode[-2:]}-{r}.jsonl", progress=False
            )
            engine, start_s, pids = build_engine(config)
            try:
                results[mode].append(measure(config, engine, pids))
            finally:
                asyncio.run(engine.aclose())
            starts[mode].append(start_s)
            last = results[mode][-1]
            print(
                f"{name} repeat {r} {mode:>6}: {last['samples_s']:8.1f} samples/s {last['tok_s']:9.0f} tok/s "
                f"({last['wall_s']:.1f}s; start-up {start_s:.1f}s; {last['cores']:.2f} cores; "
                f"load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    med = {m: {k: statistics.median(x[k] for x in results[m]) for k in ("samples_s", "tok_s", "cores")} for m in modes}
    out = {
        "workload": name,
        **{f"{m.replace(' ', '')}_samples_s": round(med[m]["samples_s"], 1) for m in modes},
        **{f"{m.replace(' ', '')}_startup_s": round(statistics.median(starts[m]), 1) for m in modes},
        **{f"{m.replace(' ', '')}_cores": round(med[m]["cores"], 2) for m in modes},
        "speedup_2_vs_1": round(med["ray x2"]["samples_s"] / med["ray x1"]["samples_s"], 3),
        "ray1_vs_plain": round(med["ray x1"]["samples_s"] / med["plain"]["samples_s"], 3),
        # samples per core granted: how well two replicas use what the machine gives them
        "per_core_2_vs_1": round(
            statistics.median(x["samples_s"] / x["cores"] for x in results["ray x2"])
            / statistics.median(x["samples_s"] / x["cores"] for x in results["ray x1"]),
            3,
        ),
    }
    print(
        f"{name}: ray x2 / ray x1 = {out['speedup_2_vs_1']:.2f} (goal >= 1.7) with {med['ray x2']['cores']:.2f} "
        f"against {med['ray x1']['cores']:.2f} cores granted, {out['per_core_2_vs_1']:.2f} per core; ray x1 / "
        f"plain = {out['ray1_vs_plain']:.3f} (goal >= 0.9)",
        flush=True,
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=("transformers", "client"))
    ap.add_argument("--model", help="model dir (default: build the ~30M-parameter 'small' Qwen2 model once)")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4, help="prompts per transformers engine call")
    ap.add_argument("--client_prompts", type=int, default=3000)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="winnow-ray-bench-"))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    print(f"ray {ray.__version__}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}", flush=True)
    report = []
    try:
        if args.only in (None, "transformers"):
            model = args.model
            if model is None:
                from winnow.demo import cache_dir
                from winnow.demo.build import build_tiny_model

                target = cache_dir() / "bench-small-qwen2"
                if not (target / "config.json").exists():
                    build_tiny_model(target, arch="qwen2", size="small", seed=1234, vocab_size=4096)
                model = str(target)
            data = make_dataset(work / "math.jsonl", args.prompts)
            ceiling = machine_ceiling()
            print(f"machine x2 now: {ceiling:.2f} (two one-thread matmul loops together / one alone)", flush=True)
            base = dict(
                model=model,
                dataset=[str(data)],
                num_return_sequences=args.n,
                max_new_tokens=args.max_new_tokens,
                num_sampling_batch_size=args.batch,
                top_k=50,
            )
            out = run_workload("transformers", base, args.repeats, work)
            out["machine_x2_before"] = round(ceiling, 2)
            out["machine_x2_after"] = round(machine_ceiling(), 2)
            report.append(out)
        if args.only in (None, "client"):
            server, url = start_server(args.latency)
            try:
                data = make_dataset(work / "sums.jsonl", args.client_prompts)
                base = dict(
                    model="fake",
                    sampler_engine="client",
                    dataset=[str(data)],
                    num_return_sequences=1,
                    max_concurrency=args.concurrency,
                    engine_kwargs={"base_url": url},
                )
                out = run_workload("client", base, args.repeats, work)
                out["ideal_x1_samples_s"] = round(args.concurrency / args.latency, 1)
                report.append(out)
            finally:
                server.kill()
                server.wait()
    finally:
        ray.shutdown()
    for line in report:
        print(json.dumps({"benchmark": "ray_scaling", **line}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
