#!/usr/bin/env python
"""winnow's sampling throughput against a plain batched ``model.generate`` loop, in one run.

Workload (issue 2): a ~30M-parameter Qwen2-architecture model with random weights, 32 prompts x 8
samples x 64 new tokens, temperature 1, top-k 50. The baseline renders the same chat prompts,
left-pads them and makes one ``generate`` call for all 256 sequences (the fastest plain loop);
winnow runs its whole pipeline (data loading, engine, writing JSONL) at its defaults on the same
loaded model. Runs alternate to share the machine's noise; medians are printed.

    .venv/bin/python benchmarks/engine_overhead.py [--repeats 3] [--model DIR]

Goal: winnow tokens/s / baseline tokens/s >= 0.95.

A second case (issue 14), long prompts: 4 prompts of ~1,024 tokens x N=16 x 32 new tokens. Plain
``generate`` with ``num_return_sequences`` prefills every copy of a prompt; winnow prefills each prompt
once and decodes its N samples from the shared KV cache. Printed: winnow's wall time / plain generate's
(goal <= 0.35: about one prefill plus the decodes).

    .venv/bin/python benchmarks/engine_overhead.py --case long
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def make_dataset(path: Path, n: int = 32) -> Path:
    import random

    rng = random.Random(42)
    with open(path, "w") as f:
        for i in range(n):
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            op = "+-*"[i % 3]
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"What is {a}{op}{b}?"},
                            {"role": "assistant", "content": str(eval(f"{a}{op}{b}"))},
                        ]
                    }
                )
                + "\n"
            )
    return path


def plain_generate(engine, rows: list[dict], n: int, max_new: int) -> tuple[int, float]:
    """One generate() call for every prompt x n samples: (generated tokens, seconds)."""
    import torch

    tok, model = engine.tokenizer, engine.model
    texts = [
        tok.apply_chat_template(
            [m for m in r["messages"] if m["role"] != "assistant"], tokenize=False, add_generation_prompt=True
        )
        for r in rows
    ]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=1.0,
            top_k=50,
            top_p=1.0,
            max_new_tokens=max_new,
            num_return_sequences=n,
            pad_token_id=tok.pad_token_id,
            eos_token_id=engine.eos_ids,
        )
    seconds = time.perf_counter() - t
    new = out[:, enc["input_ids"].shape[1] :]
    tokens = 0
    eos = set(engine.eos_ids)
    for row in new.tolist():  # count up to and including the first eos, like winnow does
        for k, t_id in enumerate(row):
            if t_id in eos:
                tokens += k + 1
                break
        else:
            tokens += len(row)
    return tokens, seconds


def workload_parser(doc: str) -> argparse.ArgumentParser:
    """The workload's options (model, repeats, prompts, n, max_new_tokens), shared with vllm_cpu.py."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model dir (default: build a ~30M-param random Qwen2 model once)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--case", choices=("short", "long", "both"), default="both")
    return ap


def bench_model(model: str | None) -> str:
    """``model``, or the ~30M-parameter random Qwen2 model, built once in winnow's cache."""
    if model is not None:
        return model
    from winnow.demo import cache_dir
    from winnow.demo.build import build_tiny_model

    target = cache_dir() / "bench-small-qwen2"
    if not (target / "config.json").exists():
        build_tiny_model(target, arch="qwen2", size="small", seed=1234, vocab_size=4096)
    return str(target)


def long_prompt_case(
    engine, model: str, work: Path, repeats: int, prompts: int = 4, n: int = 16, max_new: int = 32, length: int = 1024
) -> dict:
    """Wall time of winnow's engine vs plain generate on long prompts with many samples each."""
    import torch

    import winnow
    from winnow.config import SampleConfig

    tok = engine.tokenizer
    words = "the quick brown fox jumps over the lazy dog while counting stones by the river".split()
    rows = []
    for i in range(prompts):
        text = f"Story {i}: " + " ".join(words[(i + j) % len(words)] for j in range(length))
        while len(tok(text, add_special_tokens=False)["input_ids"]) > length:  # about `length` tokens
            text = text[: int(len(text) * 0.95)]
        rows.append({"messages": [{"role": "user", "content": text}]})
    data = work / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain_s, ours_s = [], []
    for r in range(repeats):
        texts = [tok.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True) for row in rows]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        t = time.perf_counter()
        with torch.inference_mode():
            engine.model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_k=50,
                max_new_tokens=max_new,
                min_new_tokens=max_new,
                num_return_sequences=n,
                pad_token_id=tok.pad_token_id,
            )
        plain_s.append(time.perf_counter() - t)
        config = SampleConfig(
            model=model,
            dataset=[str(data)],
            num_return_sequences=n,
            max_new_tokens=max_new,
            temperature=1.0,
            top_k=50,
            output_dir=str(work),
            output_file=f"long{r}.jsonl",
            progress=False,
            dataset_shuffle=False,
        )
        summary = winnow.sample(config, engine=engine)
        ours_s.append(summary.wall_s)
        print(f"long prompts, repeat {r}: plain generate {plain_s[-1]:.2f}s | winnow {ours_s[-1]:.2f}s", flush=True)
    ratio = statistics.median(ours_s) / statistics.median(plain_s)
    return {
        "benchmark": "engine_overhead_long_prompts",
        "prompts": prompts,
        "prompt_tokens": length,
        "n": n,
        "max_new_tokens": max_new,
        "plain_s": round(statistics.median(plain_s), 2),
        "winnow_s": round(statistics.median(ours_s), 2),
        "ratio": round(ratio, 3),
        "goal": 0.35,
    }


def main() -> int:
    args = workload_parser(__doc__).parse_args()

    import torch

    import winnow
    from winnow.config import SampleConfig
    from winnow.engines.transformers import TransformersEngine

    model = bench_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="winnow-bench-"))
    data = make_dataset(work / "math.jsonl", args.prompts)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    engine = TransformersEngine(model, seed=0)
    n_params = sum(p.numel() for p in engine.model.parameters())
    print(f"model {model}: {n_params / 1e6:.1f}M params, torch threads {torch.get_num_threads()}", flush=True)

    plain_generate(engine, rows[:2], 2, 8)  # warm-up
    if args.case in ("short", "both"):
        base, ours = [], []
        for r in range(args.repeats):
            tokens, seconds = plain_generate(engine, rows, args.n, args.max_new_tokens)
            base.append(tokens / seconds)
            config = SampleConfig(
                model=model,
                dataset=[str(data)],
                num_return_sequences=args.n,
                max_new_tokens=args.max_new_tokens,
                temperature=1.0,
                top_k=50,
                top_p=1.0,
                output_dir=str(work),
                output_file=f"run{r}.jsonl",
                progress=False,
            )
            summary = winnow.sample(config, engine=engine)
            ours.append(summary.completion_tokens / summary.wall_s)
            print(
                f"repeat {r}: plain generate {tokens} tok in {seconds:.2f}s = {base[-1]:.0f} tok/s | winnow "
                f"{summary.completion_tokens} tok in {summary.wall_s:.2f}s = {ours[-1]:.0f} tok/s "
                f"({summary.records_written} lines)",
                flush=True,
            )
        ratio = statistics.median(ours) / statistics.median(base)
        print(
            json.dumps(
                {
                    "benchmark": "engine_overhead",
                    "prompts": args.prompts,
                    "n": args.n,
                    "max_new_tokens": args.max_new_tokens,
                    "params_m": round(n_params / 1e6, 1),
                    "plain_tok_s": round(statistics.median(base), 1),
                    "winnow_tok_s": round(statistics.median(ours), 1),
                    "ratio": round(ratio, 3),
                    "goal": 0.95,
                }
            ),
            flush=True,
        )
    if args.case in ("long", "both"):
        print(json.dumps(long_prompt_case(engine, model, work, args.repeats)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
