"""Client engine throughput: requests/s against a loopback server with a fixed latency, vs the ideal.

    python benchmarks/client_throughput.py                       # 1,000 requests at 1, 16, 64, 256 in flight
    python benchmarks/client_throughput.py --requests-at-1 200   # a shorter run at concurrency 1 (50 s -> 10 s)
    python benchmarks/client_throughput.py --swift ~/.cache/winnow-peers/ms-swift/venv/bin/swift

The server (tests/support/fakeserver.py) runs in its own process and answers every chat request after
``--latency`` seconds. Each measurement runs in a fresh child process:

- ``winnow``: ``winnow sample --sampler_engine client`` end to end (the Python API, the whole
  pipeline: data, engine, output files), ``--num_return_sequences 1``, one request per row;
- ``engine``: ``OpenAIEngine.generate`` alone over the same prompts, to show the pipeline's share;
- ``swift`` (with ``--swift``): ms-swift's distill path, ``swift sample --sampler_type distill
  --sampler_engine client``, which sends one request at a time.

Requests/s is measured by the server, from the first request's arrival to the last answer (so
start-up time is not counted); ideal = concurrency / latency. CPU is the client process's
user+system time per request, imports excluded for winnow (the first connection and the run's setup
are included) and everything included for swift (it has no in-process hook).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import asyncio, json, resource, sys, time
mode, url, data, conc, out_dir, stream = sys.argv[1:7]
conc, stream = int(conc), stream == "1"
import openai, winnow.engines.openai, winnow.pipeline  # imported before the clock starts
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
if mode == "winnow":
    from winnow.pipeline import sample
    c0, t0 = cpu(), time.perf_counter()
    summary = sample(model="fake", sampler_engine="client", dataset=[data], num_return_sequences=1,
                     max_concurrency=conc, stream=stream, output_dir=out_dir, override_exist_file=True,
                     progress=False, dataset_shuffle=False, engine_kwargs={"base_url": url})
    result = {"rows": summary.groups_written, "failed": summary.rows_failed}
else:
    from winnow.engines.openai import OpenAIEngine
    from winnow.schema import Prompt, SamplingParams
    prompts = [Prompt(id=str(i), messages=[json.loads(l)["messages"][0]]) for i, l in enumerate(open(data))]
    async def go():
        eng = OpenAIEngine("fake", base_url=url, max_concurrency=conc, stream=stream)
        out = await asyncio.gather(*(eng.generate([p], SamplingParams(max_new_tokens=64)) for p in prompts))
        await eng.aclose()
        return out
    c0, t0 = cpu(), time.perf_counter()
    out = asyncio.run(go())
    result = {"rows": sum(1 for o in out if not o[0][0].failed), "failed": sum(1 for o in out if o[0][0].failed)}
result.update(cpu_s=cpu() - c0, wall_s=time.perf_counter() - t0)
print("RESULT " + json.dumps(result))
"""


def http(url: str, method: str = "GET") -> dict:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "support" / "fakeserver.py"), "--latency", str(latency)],
        stdout=subprocess.PIPE,
        text=True,
    )
    url = proc.stdout.readline().strip()
    base = url.rsplit("/v1", 1)[0]
    deadline = time.monotonic() + 10
    while True:  # poll the health route
        try:
            http(base + "/health")
            return proc, url
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def write_data(path: Path, n: int) -> Path:
    with open(path, "w") as f:  # an assistant turn too: swift's distill path asserts one
        for i in range(n):
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"What is {i} + 1?"},
                            {"role": "assistant", "content": str(i + 1)},
                        ]
                    }
                )
                + "\n"
            )
    return path


def run_child(mode: str, url: str, data: Path, conc: int, out_dir: Path, stream: bool) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, url, str(data), str(conc), str(out_dir), "1" if stream else "0"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{mode} at {conc} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])


def run_swift(swift: str, url: str, data: Path, n: int, out_dir: Path, stream: bool) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    cmd = [
        swift,
        "sample",
        "--sampler_type",
        "distill",
        "--sampler_engine",
        "client",
        "--model",
        "fake",
        "--stream",
        "true" if stream else "false",
        "--dataset",
        f"{data}#{n}",
        "--dataset_shuffle",
        "false",
        "--num_return_sequences",
        "1",
        "--engine_kwargs",
        json.dumps({"base_url": url}),
        "--output_dir",
        str(out_dir),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=3600, env={**os.environ, "OPENAI_API_KEY": "EMPTY"}
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"swift failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"cpu_s": cpu, "wall_s": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument(
        "--requests-at-1", type=int, default=None, help="requests at concurrency 1 (default: --requests)"
    )
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--modes", nargs="+", default=["winnow", "engine"], choices=("winnow", "engine"))
    parser.add_argument("--stream", action="store_true", help="stream the answers (SSE)")
    parser.add_argument("--swift", help="path of ms-swift's swift command, for the side-by-side run")
    parser.add_argument("--swift-requests", type=int, default=None, help="requests for swift (default: --requests)")
    args = parser.parse_args()

    server, url = start_server(args.latency)
    base = url.rsplit("/v1", 1)[0]
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = write_data(Path(tmp) / "data.jsonl", args.requests)
            for conc in args.concurrency:
                n = args.requests_at_1 if conc == 1 and args.requests_at_1 else args.requests
                part = write_data(Path(tmp) / f"data{n}.jsonl", n)
                for mode in args.modes:
                    http(base + "/reset", "POST")
                    res = run_child(mode, url, part, conc, Path(tmp) / f"out-{mode}-{conc}", args.stream)
                    stats = http(base + "/stats")
                    rows.append(_row(mode, conc, stats, res, args.latency))
                    print(_fmt(rows[-1]), flush=True)
            if args.swift:
                n = args.swift_requests or args.requests
                http(base + "/reset", "POST")
                res = run_swift(args.swift, url, data, n, Path(tmp) / "out-swift", args.stream)
                stats = http(base + "/stats")
                rows.append(_row("swift", 1, stats, res, args.latency))
                print(_fmt(rows[-1]) + f"  (swift wall incl. start-up {res['wall_s']:.1f}s)", flush=True)
    finally:
        server.terminate()
        server.wait(10)
    print("\n| client | in flight | requests | req/s | ideal | ratio | CPU ms/request |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {r['rps']:.1f} | {r['ideal']:.0f} | "
            f"{r['ratio']:.2f} | {r['cpu_ms']:.2f} |"
        )


def _row(mode: str, conc: int, stats: dict, res: dict, latency: float) -> dict:
    requests = stats["chat_requests"]
    busy = stats["busy_s"] or res["wall_s"]
    rps = requests / busy if busy else 0.0
    ideal = min(conc, requests) / latency
    return {
        "mode": mode,
        "concurrency": conc,
        "requests": requests,
        "rps": rps,
        "ideal": ideal,
        "ratio": rps / ideal if ideal else 0.0,
        "cpu_ms": 1000 * res["cpu_s"] / max(requests, 1),
        "max_in_flight": stats["max_in_flight"],
        "wall_s": res["wall_s"],
    }


def _fmt(r: dict) -> str:
    return (
        f"{r['mode']:<7} in flight {r['concurrency']:>4}: {r['requests']} requests, {r['rps']:.1f} req/s, "
        f"ideal {r['ideal']:.0f}, ratio {r['ratio']:.2f}, CPU {r['cpu_ms']:.2f} ms/request, "
        f"server saw at most {r['max_in_flight']} in flight"
    )


if __name__ == "__main__":
    main()
