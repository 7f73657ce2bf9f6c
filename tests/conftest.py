"""Fixtures every test directory uses: tiny real models built offline, small datasets, the fake server and
reward-model servers. Helpers that are not fixtures live in tests/support."""

from __future__ import annotations

import os
import signal

import pytest

from tests.support.fakeserver import FakeServer
from tests.support.files import write_jsonl
from tests.support.serve import serve_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests' models are tiny and several processes (a server, a client, pytest) share 2 cores: one
# torch thread each avoids OpenMP threads spinning against each other (seen: 20x slower runs).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def winnow_cache(tmp_path_factory):
    """Demo models built during tests go to a private cache, never the user's."""
    path = tmp_path_factory.mktemp("winnow-cache")
    os.environ["WINNOW_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from winnow.demo.build import build_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path, vocab_size=1024, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny random-weight Qwen2-architecture chat model (ChatML template, eos and pad set)."""
    from winnow.demo.build import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-qwen2", arch="qwen2", tokenizer_dir=tiny_tokenizer_dir, seed=0
    )


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_tokenizer_dir):
    """The same, in the Llama architecture."""
    from winnow.demo.build import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama", tokenizer_dir=tiny_tokenizer_dir, seed=1
    )


@pytest.fixture
def math_jsonl(tmp_path):
    """Eight messages-format arithmetic rows."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} + {i + 1}?"},
                {"role": "assistant", "content": str(2 * i + 1)},
            ]
        }
        for i in range(8)
    ]
    return write_jsonl(tmp_path / "math.jsonl", rows)


# --- reward models (rewards issue)


@pytest.fixture(scope="session")
def tiny_classifier_rm(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny one-label sequence-classification reward model (random weights)."""
    from tests.support.rm_builders import build_tiny_classifier_rm

    return build_tiny_classifier_rm(tmp_path_factory.mktemp("rms") / "classifier", tiny_tokenizer_dir, seed=3)


@pytest.fixture(scope="session")
def tiny_prm(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny Math-Shepherd-style PRM: causal LM, ``<step>`` tag token, '+'/'-' labels, config hint."""
    from tests.support.rm_builders import build_tiny_prm

    return build_tiny_prm(
        tmp_path_factory.mktemp("rms") / "prm-shepherd", tiny_tokenizer_dir, style="math_shepherd", seed=4
    )


@pytest.fixture(scope="session")
def tiny_qwen_prm(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny PRM in the Qwen2.5-Math-PRM checkpoint layout (``<extra_0>``, 2-class ``score`` head)."""
    from tests.support.rm_builders import build_tiny_prm

    return build_tiny_prm(tmp_path_factory.mktemp("rms") / "prm-qwen", tiny_tokenizer_dir, style="qwen_prm", seed=5)


@pytest.fixture(scope="session")
def tiny_token_prm(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny token-classification PRM (2 labels, read at each step's last token)."""
    from tests.support.rm_builders import build_tiny_prm

    return build_tiny_prm(
        tmp_path_factory.mktemp("rms") / "prm-token", tiny_tokenizer_dir, style="token_classification", seed=6
    )


@pytest.fixture
def fake_server():
    """The fault-injecting OpenAI-compatible server (tests/support/fakeserver.py) on loopback."""
    with FakeServer().running() as server:
        yield server


@pytest.fixture
def sums_jsonl(tmp_path):
    """Four messages-format sums (``What is i + i?``) with their answers."""
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": str(2 * i)}]}
        for i in range(4)
    ]
    return write_jsonl(tmp_path / "d.jsonl", rows)


@pytest.fixture(scope="module")
def classifier_server(tiny_classifier_rm, tmp_path_factory):
    """``winnow serve`` of the tiny classifier reward model."""
    srv = serve_model(tmp_path_factory, tiny_classifier_rm, "classifier")
    yield srv
    assert srv.stop(signal.SIGTERM) == 0
