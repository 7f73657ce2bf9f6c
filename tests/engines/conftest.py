"""The engine tests' fixtures: the GPU-sized tiny model and each real library's probe (one per session:
test_engines.py and test_vllm.py read the same probe)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.support import ROOT
from tests.support.engines import (
    GPU_ENGINES,
    PROBE_KWARGS,
    engine_env,
    engine_python,
)


@pytest.fixture(scope="session")
def gpu_model(tmp_path_factory, tiny_tokenizer_dir):
    """The tiny-model builder at its "small" size: head_dim 64, which every GPU attention kernel
    supports (the "tiny" size has head_dim 16). Built only when a GPU test runs."""
    from winnow.demo.build import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("gpu-models") / "small-qwen2",
        arch="qwen2",
        size="small",
        tokenizer_dir=tiny_tokenizer_dir,
        seed=0,
    )


@pytest.fixture(scope="session", params=GPU_ENGINES)
def probe(request, tmp_path_factory) -> dict:
    """What tests/support/engine_probe.py saw the real engine do (loaded once per engine)."""
    name = request.param
    python = engine_python(name)
    # vLLM: the bundled demo policy (head_dim 32, which vLLM's CPU attention takes; trained, so it
    # writes varied text and ends by itself); the others: a random model with head_dim 64
    model = "demo-policy" if name == "vllm" else str(request.getfixturevalue("gpu_model"))
    out = tmp_path_factory.mktemp(f"probe-{name}") / "probe.json"
    proc = subprocess.run(
        [
            python,
            str(ROOT / "tests" / "support" / "engine_probe.py"),
            name,
            model,
            str(out),
            json.dumps(PROBE_KWARGS[name]),
        ],
        capture_output=True,
        text=True,
        timeout=540,
        env=engine_env(),
    )
    assert proc.returncode == 0, f"engine_probe.py {name} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return {"engine": name, "model": model, **json.loads(out.read_text())}
