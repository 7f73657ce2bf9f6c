"""Multi-turn throughput: trajectories/s with 1 vs many trajectories in flight, against a latency-bound server.

    python benchmarks/multiturn_concurrency.py                      # 1, 16, 64, 256 in flight
    python benchmarks/multiturn_concurrency.py --concurrency 1 64 --tool python

The server (tests/support/fakeserver.py, its own process) answers every chat request after ``--latency`` seconds
and is scripted as an agent: it calls the request's tool ``--calls`` times, one call per turn, then answers
with the last result, so each trajectory is ``calls + 1`` model turns with a tool run between them
(``calculator`` by default: in-process; ``python``: the sandbox, a fresh interpreter per call). Each
measurement is a fresh child process running ``winnow sample --multi_turn_scheduler tools`` end to end
(the Python API: data, the driver, tools, output files) with ``--max_concurrency`` = the trajectories in
flight and one sample per row.

Trajectories/s is measured by the server, from the first request's arrival to the last answer (start-up
is not counted). Ideal = in flight / ((calls + 1) x latency): every trajectory waits on the server
``calls + 1`` times and nothing else costs time. The goal is a ratio of at least 0.8 at every level.

Where the client and the server together run out of CPU (many in flight at a short latency on a small
machine), no driver reaches the ideal; ``--baseline`` (on by default) also runs single-turn ``winnow
sample`` with the same requests at the same concurrency, the machine's practical ceiling, and reports
the multi-turn request rate against it: what the turn-by-turn driving itself costs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from client_throughput import http, start_server  # noqa: E402 - the same loopback server and health poll

CHILD = r"""
import json, resource, sys, time
url, data, conc, out_dir, tool, calls = sys.argv[1:7]
import winnow.pipeline, winnow.multiturn.driver, winnow.multiturn.tools  # imported before the clock starts
from winnow.pipeline import sample
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
c0, t0 = cpu(), time.perf_counter()
multi = {"multi_turn_scheduler": "tools", "tools": [tool]} if int(calls) >= 0 else {}
summary = sample(model=f"fake?agent={max(0, int(calls))}", sampler_engine="client", dataset=[data],
                 num_return_sequences=1, max_concurrency=int(conc), output_dir=out_dir, override_exist_file=True,
                 progress=False, dataset_shuffle=False, engine_kwargs={"base_url": url}, output_format="raw", **multi)
manifest = json.load(open(summary.output_file.replace(".jsonl", ".manifest.json")))
print("RESULT " + json.dumps({"rows": summary.groups_written, "failed": summary.rows_failed,
                              "compute": manifest["compute"], "cpu_s": cpu() - c0,
                              "wall_s": time.perf_counter() - t0}))
"""


def write_data(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + 1?"}]}) + "\n")
    return path


def run_child(url: str, data: Path, conc: int, out_dir: Path, tool: str, calls: int) -> dict:
    """One measurement in a fresh process; the server's agent script comes with the model name (fake?agent=K)."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, url, str(data), str(conc), str(out_dir), tool, str(calls)],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"the run at {conc} in flight failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the server takes per request")
    parser.add_argument("--calls", type=int, default=2, help="tool calls per trajectory (turns = calls + 1)")
    parser.add_argument("--tool", default="calculator", choices=("calculator", "python"))
    parser.add_argument("--seconds", type=float, default=6.0, help="ideal duration of each measurement")
    parser.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run single-turn sampling with the same requests (the machine's ceiling)",
    )
    args = parser.parse_args()

    server, url = start_server(args.latency)
    base = url.rsplit("/v1", 1)[0]
    turns = args.calls + 1
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for conc in args.concurrency:
                ideal = conc / (turns * args.latency)
                n = max(conc, int(ideal * args.seconds))
                data = write_data(Path(tmp) / f"data{n}.jsonl", n)
                http(base + "/reset", "POST")
                res = run_child(url, data, conc, Path(tmp) / f"out{conc}", args.tool, args.calls)
                stats = http(base + "/stats")
                busy = stats["busy_s"] or res["wall_s"]
                row = {
                    "in_flight": conc,
                    "trajectories": res["rows"],
                    "failed": res["failed"],
                    "requests": stats["chat_requests"],
                    "tps": res["rows"] / busy,
                    "ideal": ideal,
                    "max_in_flight": stats["max_in_flight"],
                    "cpu_ms": 1000 * res["cpu_s"] / max(res["rows"], 1),
                    "engine_calls": res["compute"].get("engine_calls"),
                }
                row["ratio"] = row["tps"] / ideal
                row["rps"] = row["requests"] / busy
                row["baseline_rps"] = None
                if args.baseline:  # the same requests, one turn each
                    single = write_data(Path(tmp) / f"single{n}.jsonl", n * turns)
                    http(base + "/reset", "POST")
                    run_child(url, single, conc, Path(tmp) / f"single{conc}", args.tool, -1)
                    stats = http(base + "/stats")
                    row["baseline_rps"] = stats["chat_requests"] / stats["busy_s"]
                rows.append(row)
                against = (
                    f", {row['rps']:.0f} req/s = {row['rps'] / row['baseline_rps']:.2f} of single-turn's "
                    f"{row['baseline_rps']:.0f}"
                    if row["baseline_rps"]
                    else ""
                )
                print(
                    f"{conc:>4} in flight: {row['trajectories']} trajectories ({row['requests']} requests, "
                    f"{row['failed']} failed), {row['tps']:.1f}/s, ideal {ideal:.1f}/s, ratio {row['ratio']:.2f}"
                    f"{against}, server saw at most {row['max_in_flight']} in flight, CPU {row['cpu_ms']:.2f} "
                    "ms/trajectory",
                    flush=True,
                )
    finally:
        server.terminate()
        server.wait(10)
    print(f"\n{turns} turns per trajectory ({args.calls} {args.tool} calls), latency {args.latency * 1000:.0f} ms\n")
    print(
        "| in flight | trajectories | trajectories/s | ideal | of ideal | req/s | of single-turn req/s | "
        "CPU ms/trajectory |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        base_ratio = f"{r['rps'] / r['baseline_rps']:.2f} ({r['baseline_rps']:.0f})" if r["baseline_rps"] else "-"
        print(
            f"| {r['in_flight']} | {r['trajectories']} | {r['tps']:.1f} | {r['ideal']:.1f} | {r['ratio']:.2f} | "
            f"{r['rps']:.0f} | {base_ratio} | {r['cpu_ms']:.2f} |"
        )
    speedup = rows[-1]["tps"] / rows[0]["tps"] if rows and rows[0]["tps"] else 0.0
    print(
        f"\n{rows[-1]['in_flight']} vs {rows[0]['in_flight']} in flight: {speedup:.1f}x; "
        f"goal >= 0.8 of ideal at every level: {'met' if all(r['ratio'] >= 0.8 for r in rows) else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
