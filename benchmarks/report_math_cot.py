"""``winnow report`` on real samples: Qwen2.5-Math's math_cot_100 (100 MATH problems x 8 completions with
correctness labels and reward-model scores), judged two ways.

    .venv/bin/python benchmarks/report_math_cot.py [--workdir /tmp/report_math_cot]

1. The file as it is (read by the Qwen2.5-Math eval adapter): correct = the file's own labels, votes over its
   extracted answers (``pred``), best-of-k by its reward model (``pred_score``). The file's evaluation
   reports rm@8 = 94, maj@8 = 93, pass@8 = 96.
2. The same completions converted to a raw output with winnow's own view: correct = winnow's math verifier
   against the reference (``--verdict math``), votes over answers winnow extracts from the completion text.

Prints both tables and the wall time of each report (reading, answer grouping, estimators, bootstrap, plots).
Data: ../shared/data/external/qwen25_math_eval/math_cot_100.jsonl (QwenLM/Qwen2.5-Math, MIT evaluation dir).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from winnow import report
from winnow.config import ReportConfig

DATA = Path(__file__).resolve().parents[2] / "shared/data/external/qwen25_math_eval/math_cot_100.jsonl"
PUBLISHED = {"pass@8": ("pass", 96), "maj@8": ("majority", 93), "rm@8": ("best:pred_score", 94)}


def to_raw(src: Path, dst: Path) -> Path:
    """The eval file as a raw output with a manifest; completions keep only their text and scores."""
    with open(dst, "w", encoding="utf-8") as f:
        for _, row in report.read_rows(src):
            record = report.qwen_eval_record(row)
            for c in record["completions"]:
                c.pop("answer")  # winnow extracts the answer from the text itself
            f.write(json.dumps(record) + "\n")
    dst.with_name(dst.stem + ".manifest.json").write_text(
        json.dumps(
            {
                "output_file": dst.name,
                "config": {"model": "Qwen2.5-Math-7B-Instruct", "num_return_sequences": 8},
                "rewards": [{"key": k, "role": role} for k, role in report.QWEN_ROLES.items()],
            }
        ),
        encoding="utf-8",
    )
    return dst


def timed_report(config: ReportConfig) -> tuple[list, float]:
    start = time.perf_counter()
    results = report.report(config)
    return results, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/report_math_cot")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print("== 1. the file's own labels and extracted answers")
    labels, wall_labels = timed_report(ReportConfig(outputs=[str(DATA)], output_dir=str(work / "labels")))
    print(f"wall: {wall_labels:.1f}s\n")
    print("== 2. winnow's math verifier and answer extraction")
    raw = to_raw(DATA, work / "math_cot_100_raw.jsonl")
    verified, wall_math = timed_report(
        ReportConfig(outputs=[str(raw)], verdict="math", output_dir=str(work / "math_verify"))
    )
    print(f"wall: {wall_math:.1f}s\n")
    summary = {}
    for name, results in (("file labels", labels), ("math verifier", verified)):
        run, rows = results[0]
        last = rows[-1]
        summary[name] = {
            title: round(len(run.problems) * last.metrics[key].value, 2) for title, (key, _) in PUBLISHED.items()
        }
    summary["published (file labels)"] = {title: value for title, (_, value) in PUBLISHED.items()}
    summary["wall_s"] = {"file labels": round(wall_labels, 2), "math verifier": round(wall_math, 2)}
    print("problems right of 100 at k = 8:")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
