"""Stage 2 on real samples: Qwen2.5-Math's math_cot_100 (100 MATH problems x 8 completions) as a stage-1 cache,
scored by ``winnow sample --sampler_engine no --orm_model math``.

    .venv/bin/python benchmarks/stage2_math_cot.py [--workdir /tmp/stage2_math_cot]

Checks that a correct sample is kept for every problem that has one (by the file's own labels), and reports
pass@8, majority@8 (answers clustered by math-verify equivalence) and best-of-8 by the file's reward-model
scores (pred_score), all judged by winnow's verifier, beside the file's own labels.
Data: ../shared/data/external/qwen25_math_eval/math_cot_100.jsonl (QwenLM/Qwen2.5-Math, MIT evaluation dir).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from winnow import data
from winnow.rewards.mathverify import answer_text, verify_answer

DATA = Path(__file__).resolve().parents[2] / "shared/data/external/qwen25_math_eval/math_cot_100.jsonl"


def same_answer(a: str, b: str) -> bool:
    """Whether two completions' final answers are equivalent (math-verify, b as the gold)."""
    value, _ = verify_answer(a, answer_text(b))
    return value == 1.0


def majority(texts: list[str]) -> str:
    clusters: list[list[str]] = []
    for t in texts:
        for c in clusters:
            if same_answer(t, c[0]):
                c.append(t)
                break
        else:
            clusters.append([t])
    return max(clusters, key=len)[0]  # ties: the cluster seen first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/stage2_math_cot")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    dataset = work / "math_cot_100_problems.jsonl"
    dataset.write_text(
        "".join(json.dumps({"id": r["idx"], "problem": r["question"], "answer": r["gt"]}) + "\n" for r in rows),
        encoding="utf-8",
    )
    plan = data.build_plan([str(dataset)], seed=42)
    ids = {}
    for pos in range(len(plan)):
        p = plan.read(pos)
        ids[p.messages[-1]["content"]] = (p.id, p.messages)
    cache = work / "stage1.jsonl"
    with open(cache, "w", encoding="utf-8") as f:
        for r in rows:
            row_id, messages = ids[r["question"]]
            for text in r["code"]:
                line = {"messages": [*messages, {"role": "assistant", "content": text}], "id": row_id}
                f.write(json.dumps(line) + "\n")
    out_dir = work / "out"
    start = time.perf_counter()
    base = [
        sys.executable,
        "-m",
        "winnow",
        "sample",
        "--sampler_engine",
        "no",
        "--cache_files",
        str(cache),
        "--dataset",
        str(dataset),
        "--orm_model",
        "math",
        "--num_return_sequences",
        "8",
        "--n_best_to_keep",
        "1",
        "--output_dir",
        str(out_dir),
        "--override_exist_file",
        "true",
        "--progress",
        "false",
    ]
    cmd = [*base, "--output_format", "raw", "--output_file", "raw.jsonl"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(proc.stderr)
    cmd_sft = [*base, "--output_format", "sft", "--output_file", "sft.jsonl"]
    proc2 = subprocess.run(cmd_sft, capture_output=True, text=True)
    if proc2.returncode != 0:
        sys.exit(proc2.stderr)
    by_question = {r["question"]: r for r in rows}
    raw = [json.loads(line) for line in (out_dir / "raw.jsonl").read_text().splitlines()]
    kept = {json.loads(line)["id"]: json.loads(line) for line in (out_dir / "sft.jsonl").read_text().splitlines()}
    has_correct = kept_correct = agree = total = pass8 = maj8 = rm8 = 0
    missed = []
    for rec in raw:
        src = by_question[rec["messages"][-1]["content"]]
        labels = src["score"]
        verdicts = [c["scores"]["math"]["value"] for c in rec["completions"]]
        texts = [c["text"] for c in rec["completions"]]
        total += len(labels)
        agree += sum((v == 1.0) == bool(y) for v, y in zip(verdicts, labels, strict=True))
        pass8 += any(v == 1.0 for v in verdicts)
        maj8 += verify_answer(majority(texts), src["gt"])[0] == 1.0
        best = max(range(len(texts)), key=lambda i: (src["pred_score"][i], -i))
        rm8 += verify_answer(texts[best], src["gt"])[0] == 1.0
        if any(labels):
            has_correct += 1
            k = kept.get(rec["id"])
            if k is not None and labels[texts.index(k["messages"][-1]["content"])]:
                kept_correct += 1
            else:
                missed.append(src["idx"])
    print(
        json.dumps(
            {
                "problems": len(raw),
                "samples": total,
                "stage2_wall_s": round(wall, 1),
                "sample_label_agreement": round(agree / total, 4),
                "problems_with_a_correct_sample (file labels)": has_correct,
                "kept_a_correct_sample": kept_correct,
                "missed": missed,
                "pass@8": pass8 / len(raw),
                "majority@8": maj8 / len(raw),
                "best_of_8_by_pred_score": rm8 / len(raw),
                "file_reported": {"rm@8": 0.94, "maj@8": 0.93, "pass@8": 0.96},
                "summary_line": proc.stderr.strip().splitlines()[-1],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
