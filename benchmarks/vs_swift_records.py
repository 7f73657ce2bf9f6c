"""Side by side with ms-swift 4.6: the records `swift sample` and `winnow sample` write from the same scored samples.

    .venv/bin/python benchmarks/vs_swift_records.py [--swift ~/.cache/winnow-peers/ms-swift/venv/bin/swift]

Installs nothing: it uses the peer's virtualenv made by ../shared/peers/ms-swift/run_peer_bench.sh (or
--swift). Both tools run stage 2 (``--sampler_engine no``) on one stage-1 cache file of 20 prompts x 5
samples, with rewards from one plugin file both load (a deterministic boxed-answer ORM, an ORM that
passes everything, a seed-style PRM), so every sample has the same scores in both. For each case it
prints the line counts of swift, winnow's default selection and ``--selection swift``, and checks that
``--selection swift`` writes exactly swift's records (the same multiset of lines).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SWIFT = Path.home() / ".cache/winnow-peers/ms-swift/venv/bin/swift"
MODEL = ROOT / "src/winnow/demo/assets/demo-policy"  # swift loads a processor even for --sampler_engine no

PLUGIN = '''
try:  # ms-swift 4.x
    from swift.rewards import orms, prms
except ImportError:  # older ms-swift, or winnow's shim
    from swift.plugin import orms, prms
import re

def boxed(text):
    found = re.findall(r"\\\\boxed\\{([^{}]*)\\}", text or "")
    return found[-1].strip() if found else None

class BoxedEq:
    """1.0 when the last boxed answer equals the reference's, else 0.0."""
    def __call__(self, infer_requests, ground_truths=None, **kwargs):
        out = []
        for req, ref in zip(infer_requests, ground_truths):
            messages = req.messages if hasattr(req, "messages") else req["messages"]
            answer = boxed(messages[-1]["content"])
            out.append(1.0 if answer is not None and answer == (boxed(ref) or str(ref).strip()) else 0.0)
        return out

class PassAll:
    """1.0 for every sample."""
    def __call__(self, infer_requests, ground_truths=None, **kwargs):
        return [1.0] * len(infer_requests)

class LengthPRM:
    """Step scores from the answer: shorter steps score higher (deterministic, in (0, 1))."""
    def __call__(self, infer_requests, ground_truths=None, **kwargs):
        out = []
        for req in infer_requests:
            messages = req.messages if hasattr(req, "messages") else req["messages"]
            steps = [s for s in messages[-1]["content"].split("\\n") if s.strip()] or [""]
            out.append([round(1.0 / (1.0 + len(s) / 10.0), 6) for s in steps])
        return out

orms["boxed_eq"] = BoxedEq
orms["pass_all"] = PassAll
prms["length_prm"] = LengthPRM
'''

CASES = {  # name -> extra flags (both tools)
    "orm n_best=2": ["--orm_model", "boxed_eq", "--n_best_to_keep", "2"],
    "orm + prm n_best=2": ["--orm_model", "boxed_eq", "--prm_model", "length_prm", "--n_best_to_keep", "2"],
    "seed prm + orm passes all": ["--orm_model", "pass_all", "--prm_model", "length_prm", "--n_best_to_keep", "2"],
    "orm + prm, prm_threshold 0.45": [
        "--orm_model",
        "boxed_eq",
        "--prm_model",
        "length_prm",
        "--n_best_to_keep",
        "3",
        "--prm_threshold",
        "0.45",
    ],
    "orm, easy_query_threshold 0.5": [
        "--orm_model",
        "boxed_eq",
        "--n_best_to_keep",
        "2",
        "--easy_query_threshold",
        "0.5",
    ],
}


def make_inputs(work: Path, prompts: int = 20, samples: int = 5, seed: int = 0) -> tuple[Path, Path]:
    """The dataset and a stage-1 cache in swift's shape (lines carry swift's md5 id of the row)."""
    sys.path.insert(0, str(ROOT / "src"))
    from winnow.data import swift_row_id

    rng = random.Random(seed)
    rows, cache = [], []
    for _ in range(prompts):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        conversation = [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}\n\\boxed{{{a + b}}}"},
        ]
        rows.append({"messages": conversation})
        uid = swift_row_id(conversation, "data.jsonl")
        for _ in range(samples):
            shape = rng.random()
            answer = a + b if shape < 0.55 else a + b + rng.choice([-10, -1, 1, 2])
            text = rng.choice(
                [
                    f"{a} + {b} = {answer}\n\\boxed{{{answer}}}",
                    f"\\boxed{{{answer}}}",
                    f"First {a}.\nThen add {b}.\nSo {answer}.\n\\boxed{{{answer}}}",
                ]
            )
            if shape > 0.95:
                text = f"I think it is {answer}."  # no boxed answer
            cache.append(
                {
                    "messages": [conversation[0], {"role": "assistant", "content": text}],
                    "dataset": "data.jsonl",
                    "id": uid,
                }
            )
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stage1 = work / "stage1.jsonl"
    stage1.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in cache))
    (work / "plugin.py").write_text(PLUGIN)
    return data, stage1


def run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0 and "the output has no lines" not in proc.stderr:  # an empty output is a result here
        raise SystemExit(f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def lines(path: Path) -> list[str]:
    return (
        [
            json.dumps(json.loads(x), sort_keys=True, ensure_ascii=False)
            for x in path.read_text(encoding="utf-8").splitlines()
            if x.strip()
        ]
        if path.exists()
        else []
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--swift", default=str(DEFAULT_SWIFT))
    args = ap.parse_args()
    if not Path(args.swift).exists():
        raise SystemExit(
            f"{args.swift} not found: install the peer with bash "
            "../shared/peers/ms-swift/run_peer_bench.sh (or point --swift at a `swift` command)"
        )
    work = Path(tempfile.mkdtemp(prefix="vs-swift-records-"))
    data, stage1 = make_inputs(work)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = [
        "--sampler_engine",
        "no",
        "--cache_files",
        stage1.name,
        "--dataset",
        data.name,
        "--num_return_sequences",
        "5",
        "--external_plugins",
        "plugin.py",
        "--override_exist_file",
        "true",
    ]
    print(f"{'case':<32} {'swift':>6} {'winnow':>7} {'winnow --selection swift':>24}  compat identical")
    all_identical = True
    for name, flags in CASES.items():
        tag = name.replace(" ", "_").replace(",", "").replace("+", "and").replace("=", "")
        run(
            [
                args.swift,
                "sample",
                "--model",
                str(MODEL),
                "--model_type",
                "qwen2",
                "--template",
                "qwen",
                *common,
                *flags,
                "--output_dir",
                "swift_out",
                "--output_file",
                f"{tag}.jsonl",
            ],
            work,
            env,
        )
        winnow = [
            sys.executable,
            "-m",
            "winnow",
            "sample",
            *common,
            *flags,
            "--progress",
            "false",
            "--output_dir",
            "winnow",
        ]
        default = run([*winnow, "--output_file", f"{tag}.jsonl"], work, env)
        run([*winnow, "--selection", "swift", "--output_file", f"{tag}.compat.jsonl"], work, env)
        swift_lines = lines(work / "swift_out" / f"{tag}.jsonl")
        ours = lines(work / "winnow" / f"{tag}.jsonl")
        compat = lines(work / "winnow" / f"{tag}.compat.jsonl")
        identical = Counter(compat) == Counter(swift_lines)
        all_identical &= identical
        print(f"{name:<32} {len(swift_lines):>6} {len(ours):>7} {len(compat):>24}  {identical}")
        summary = [line for line in default.stderr.splitlines() if line.startswith("winnow sample finished")]
        print("    winnow: " + (summary[0].split(" tok/s), ", 1)[-1].rsplit(" -> ", 1)[0] if summary else ""))
    print(f"outputs in {work}")
    sys.exit(0 if all_identical else 1)


if __name__ == "__main__":
    main()
