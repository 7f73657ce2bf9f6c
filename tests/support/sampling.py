"""One in-process run of a tiny model (the raw records and the summary)."""

from __future__ import annotations

import winnow
from tests.support.files import read_jsonl


def tiny_run(tmp_path, tiny_model, sums_jsonl, **options):
    options = {
        "model": str(tiny_model),
        "dataset": [str(sums_jsonl)],
        "num_return_sequences": 2,
        "max_new_tokens": 4,
        "output_dir": str(tmp_path / "out"),
        "output_file": "o.jsonl",
        "override_exist_file": True,
        "progress": False,
        "output_format": "raw",
        **options,
    }
    summary = winnow.sample(**options)
    return summary, read_jsonl(tmp_path / "out" / "o.jsonl")
