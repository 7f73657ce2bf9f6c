#!/usr/bin/env python
"""vLLM's CPU build against the transformers engine, on the same workload, through ``winnow.sample``.

Workload (that of engine_overhead.py): a ~30M-parameter Qwen2-architecture model with random weights
(the test models' "small" size: head_dim 64, which vLLM's CPU attention takes), 32 prompts x 8 samples
x 64 new tokens, temperature 1, top-k 50. Each engine is loaded once, warmed up, then runs the whole
pipeline (data, engine, JSONL) ``--repeats`` times; medians are printed, with vLLM's load time.
Runs in the vLLM virtualenv (which also has transformers):

    bash scripts/setup_vllm_cpu.sh
    .venv-vllm/bin/python benchmarks/vllm_cpu.py [--repeats 3] [--model DIR] [--engine_kwargs JSON]

vLLM's own settings come from its environment, e.g. ``VLLM_CPU_OMP_THREADS_BIND=0-1`` (threads for the
model worker; vLLM's default, ``auto``, keeps one core for its scheduler process).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_overhead import bench_model, make_dataset, workload_parser  # noqa: E402  (the same workload)


def run(engine, model: str, data: Path, work: Path, args, tag: str) -> list[float]:
    """tokens/s of ``--repeats`` whole-pipeline runs on a loaded engine (after one warm-up run)."""
    import winnow
    from winnow.config import SampleConfig

    def sample(out: str, n: int, max_new: int):
        config = SampleConfig(
            model=model,
            dataset=[str(data)],
            num_return_sequences=n,
            max_new_tokens=max_new,
            temperature=1.0,
            top_k=50,
            top_p=1.0,
            output_dir=str(work),
            output_file=out,
            progress=False,
        )
        return winnow.sample(config, engine=engine)

    sample(f"{tag}-warmup.jsonl", 2, 8)
    speeds = []
    for r in range(args.repeats):
        summary = sample(f"{tag}{r}.jsonl", args.n, args.max_new_tokens)
        speeds.append(summary.completion_tokens / summary.wall_s)
        print(
            f"{tag} repeat {r}: {summary.completion_tokens} tok in {summary.wall_s:.2f}s = {speeds[-1]:.0f} tok/s",
            flush=True,
        )
    return speeds


def main() -> int:
    ap = workload_parser(__doc__)
    ap.add_argument("--engine_kwargs", default="{}", help="vLLM engine kwargs as JSON (enforce_eager, ...)")
    ap.add_argument("--engines", default="transformers,vllm", help="which to run, comma-separated")
    ap.add_argument(
        "--torch_dtype",
        default="auto",
        help="both engines' dtype (auto: float32 for transformers on CPU, bfloat16 for vLLM)",
    )
    args = ap.parse_args()

    import asyncio

    import torch

    from winnow.engines.transformers import TransformersEngine

    model = bench_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="winnow-bench-vllm-"))
    data = make_dataset(work / "math.jsonl", args.prompts)
    result: dict = {
        "benchmark": "vllm_cpu",
        "prompts": args.prompts,
        "n": args.n,
        "max_new_tokens": args.max_new_tokens,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
    }

    engines = args.engines.split(",")
    if "transformers" in engines:
        engine = TransformersEngine(model, seed=0, torch_dtype=args.torch_dtype)
        print(f"transformers: torch threads {torch.get_num_threads()}, dtype {engine.model.dtype}", flush=True)
        result["transformers_tok_s"] = round(statistics.median(run(engine, model, data, work, args, "transformers")), 1)
        asyncio.run(engine.aclose())

    if "vllm" in engines:
        from winnow.engines.vllm import VLLMEngine

        started = time.monotonic()
        engine = VLLMEngine(model, seed=0, torch_dtype=args.torch_dtype, **json.loads(args.engine_kwargs))
        result["vllm_load_s"] = round(time.monotonic() - started, 1)
        used = engine.describe()
        result["vllm"] = {k: used.get(k) for k in ("vllm", "platform", "dtype", "kv_cache_space_gb", "enforce_eager")}
        result["vllm_tok_s"] = round(statistics.median(run(engine, model, data, work, args, "vllm")), 1)
        asyncio.run(engine.aclose())
    if "transformers_tok_s" in result and "vllm_tok_s" in result:
        result["ratio"] = round(result["vllm_tok_s"] / result["transformers_tok_s"], 2)
    print(json.dumps(result))
    return 0


# vLLM starts its engine in spawned processes, which import this file again: only run under __main__
if __name__ == "__main__":
    sys.exit(main())
