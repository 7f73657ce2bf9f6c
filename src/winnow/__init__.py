"""winnow: sample many completions per prompt, score them, keep the best, write training data.

The public surface::

    from winnow import SampleConfig, sample
    summary = sample(SampleConfig(model="demo-tiny", dataset=["data.jsonl#5"], num_return_sequences=5))

    # swift's names work too
    from winnow import SamplingArguments, sampling_main
    sampling_main(SamplingArguments(model="demo-tiny", dataset="data.jsonl#5", num_return_sequences=5))
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["SampleConfig", "SamplingArguments", "ServeConfig", "RunSummary", "sample", "sampling_main", "__version__"]


def __getattr__(name: str):
    # lazy, so that `import winnow` stays light (no asyncio machinery, no data libraries)
    if name in ("SampleConfig", "ServeConfig", "SamplingArguments"):
        from winnow import config

        return getattr(config, "SampleConfig" if name == "SamplingArguments" else name)
    if name in ("sample", "RunSummary"):
        from winnow import pipeline

        return getattr(pipeline, name)
    if name == "sampling_main":
        from winnow.cli import sampling_main

        return sampling_main
    raise AttributeError(f"module 'winnow' has no attribute {name!r}")
