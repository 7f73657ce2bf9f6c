"""The command line (cli.py): help without torch, the Python API against the CLI, ``winnow list``."""

from __future__ import annotations

import subprocess
import sys

import winnow
from tests.support.commands import run_winnow
from tests.support.files import read_jsonl
from winnow.config import SampleConfig


def test_help_does_not_import_torch():
    code = (
        "import sys; from winnow.cli import main\n"
        "try:\n    main(['sample', '--help'])\nexcept SystemExit:\n    pass\n"
        "main(['--help'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'math_verify') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    assert "--num_return_sequences" in out


def test_list_rewards_cli():

    proc = run_winnow("list", "rewards")
    assert proc.returncode == 0, proc.stderr
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    for name in ("math", "format", "react_format", "cosine", "repetition", "soft_overlong", "judge", "code"):
        assert name in names
    assert "(aliases: accuracy)" in proc.stdout


def test_python_api_matches_cli(tmp_path, tiny_model, math_jsonl):
    args = dict(
        model=str(tiny_model),
        dataset=[f"{math_jsonl}#4"],
        num_return_sequences=3,
        max_new_tokens=8,
        temperature=0.0,
        output_dir=str(tmp_path / "api"),
        output_file="o.jsonl",
        progress=False,
    )
    summary = winnow.sample(SampleConfig(**args))
    assert summary.groups_written == 4 and summary.records_written == 12
    run_winnow(
        "sample",
        "--model",
        str(tiny_model),
        "--dataset",
        f"{math_jsonl}#4",
        "--num_return_sequences",
        "3",
        "--max_new_tokens",
        "8",
        "--temperature",
        "0",
        "--output_dir",
        str(tmp_path / "cli"),
        "--output_file",
        "o.jsonl",
        check=True,
    )
    api = read_jsonl(tmp_path / "api" / "o.jsonl")
    cli = read_jsonl(tmp_path / "cli" / "o.jsonl")
    key = lambda r: (r["id"], r["messages"][-1]["content"])  # noqa: E731
    assert sorted(api, key=key) == sorted(cli, key=key)  # greedy: identical records
    # sampling_main takes the swift-shaped entry too
    summary = winnow.sampling_main(
        [
            "--model",
            str(tiny_model),
            "--dataset",
            f"{math_jsonl}#2",
            "--num_return_sequences",
            "2",
            "--max_new_tokens",
            "4",
            "--output_dir",
            str(tmp_path / "main"),
            "--progress",
            "false",
        ]
    )
    assert summary.records_written == 4
