"""Client path memory: peak RSS of a 100k-row run vs a 1k-row run (goal: within 1.2x).

    python benchmarks/client_memory.py                  # 1,000 and 100,000 rows
    python benchmarks/client_memory.py --rows 1000 20000

Each run is ``winnow sample --sampler_engine client`` (the Python API, whole pipeline, output files)
in a fresh child process against tests/support/fakeserver.py with no added latency; the child reports its
own peak RSS (``ru_maxrss``) after the run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from client_throughput import start_server

CHILD = r"""
import json, resource, sys, time
url, data, out_dir, conc = sys.argv[1:5]
from winnow.pipeline import sample
t0 = time.perf_counter()
s = sample(model="fake", sampler_engine="client", dataset=[data], num_return_sequences=1,
           max_concurrency=int(conc), output_dir=out_dir, override_exist_file=True, progress=False,
           engine_kwargs={"base_url": url})
print("RESULT " + json.dumps({"rows": s.groups_written, "failed": s.rows_failed,
                              "wall_s": time.perf_counter() - t0,
                              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    server, url = start_server(0.0)
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for n in args.rows:
                data = Path(tmp) / f"rows{n}.jsonl"
                with open(data, "w") as f:
                    for i in range(n):
                        f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + 7?"}]}) + "\n")
                t0 = time.perf_counter()
                proc = subprocess.run(
                    [sys.executable, "-c", CHILD, url, str(data), str(Path(tmp) / f"out{n}"), str(args.concurrency)],
                    capture_output=True,
                    text=True,
                    timeout=7200,
                )
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    raise RuntimeError(f"run of {n} rows failed:\n{proc.stderr[-3000:]}")
                res = json.loads(line[7:])
                results.append((n, res))
                print(
                    f"{n} rows: {res['rows']} written, {res['failed']} failed, {res['wall_s']:.1f}s "
                    f"({time.perf_counter() - t0:.1f}s with start-up), peak RSS {res['peak_rss_mb']:.1f} MB",
                    flush=True,
                )
    finally:
        server.terminate()
        server.wait(10)
    base = results[0][1]["peak_rss_mb"]
    for n, res in results[1:]:
        print(f"peak RSS {n} rows / {results[0][0]} rows = {res['peak_rss_mb'] / base:.3f}")


if __name__ == "__main__":
    main()
