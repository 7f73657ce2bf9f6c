"""Worker processes (procs.py): a script calling ``sampling_main`` at its top level is not re-run."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.files import read_jsonl


def test_sampling_main_runs_at_a_scripts_top_level(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"problem": "What is 1 + 1?", "answer": "2"}) + "\n")
    (tmp_path / "c.jsonl").write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "What is 1 + 1?"},
                    {"role": "assistant", "content": "\\boxed{2}"},
                ]
            }
        )
        + "\n"
    )
    script = tmp_path / "run.py"  # no `if __name__ == "__main__":` guard, a plain string dataset
    script.write_text(
        "from winnow import SamplingArguments, sampling_main\n"
        "sampling_main(SamplingArguments(sampler_engine='no', cache_files=['c.jsonl'], "
        "dataset='d.jsonl', orm_model='math', num_return_sequences=1, output_file='o.jsonl', "
        "progress=False))\n"
    )
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    [record] = read_jsonl(tmp_path / "sample_output" / "o.jsonl")
    assert record["messages"][-1]["content"] == "\\boxed{2}"
