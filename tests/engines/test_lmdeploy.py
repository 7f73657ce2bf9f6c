"""The LMDeploy engine (engines/lmdeploy.py): parameter and result mapping, and its glue against a stand-in
shaped like LMDeploy's documented API (the real library runs in test_engines.py where it is installed).
"""

from __future__ import annotations

import asyncio
import types
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from tests.support.engines import (
    numbered_prompt,
)
from winnow.engines import check_aligned, generate_sync
from winnow.schema import SamplingParams


def _fake_lmdeploy() -> types.ModuleType:
    mod = types.ModuleType("lmdeploy")
    mod.__version__ = "stand-in"

    @dataclass
    class TurbomindEngineConfig:
        dtype: str = "auto"
        tp: int = 1
        session_len: int | None = None
        enable_prefix_caching: bool = False
        cache_max_entry_count: float = 0.8

    @dataclass
    class PytorchEngineConfig(TurbomindEngineConfig):
        device_type: str = "cuda"

    @dataclass
    class GenerationConfig:
        n: int = 1
        max_new_tokens: int = 512
        do_sample: bool = False
        top_p: float = 1.0
        top_k: int = 50
        temperature: float = 0.8
        repetition_penalty: float = 1.0
        random_seed: int | None = None
        stop_words: list = field(default_factory=list)

    class Pipe:
        def __init__(self, model_path, backend_config, **kwargs):
            self.model_path, self.backend_config, self.kwargs = model_path, backend_config, kwargs
            self.calls, self.closed = [], False

        def __call__(self, prompts, gen_config=None, do_preprocess=True, **kwargs):
            assert do_preprocess is False and isinstance(gen_config, list)
            self.calls.append((list(prompts), gen_config))
            out = []
            for text, cfg in zip(prompts, gen_config, strict=True):
                if len(text) > 400:  # the real pipeline answers an over-long prompt with an error response
                    out.append(
                        SimpleNamespace(
                            text="",
                            generate_token_len=0,
                            input_token_len=99,
                            finish_reason="error",
                            error_message="input too long",
                        )
                    )
                    continue
                out.append(
                    SimpleNamespace(
                        text=f"seed={cfg.random_seed}###rest",
                        generate_token_len=3,
                        input_token_len=len(text) // 4,
                        finish_reason="stop",
                        error_message=None,
                    )
                )
            return out

        def close(self):
            self.closed = True

    def pipeline(model_path, backend_config=None, **kwargs):
        mod.last = Pipe(model_path, backend_config, **kwargs)
        return mod.last

    mod.TurbomindEngineConfig, mod.PytorchEngineConfig = TurbomindEngineConfig, PytorchEngineConfig
    mod.GenerationConfig, mod.pipeline = GenerationConfig, pipeline
    return mod


def test_lmdeploy_gen_config_and_response_mapping():
    from winnow.engines.lmdeploy import completion_from_response, gen_config_kwargs

    kw = gen_config_kwargs(SamplingParams(n=4, temperature=0.8, top_p=0.9, seed=10, stop=["###"]), 64, sample=2)
    assert kw == {
        "n": 1,
        "max_new_tokens": 64,
        "do_sample": True,
        "repetition_penalty": 1.0,
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": 0,
        "random_seed": 12,
        "stop_words": ["###"],
    }
    greedy = gen_config_kwargs(SamplingParams(n=4, temperature=0.0, seed=10), 64)
    assert greedy["do_sample"] is False and "random_seed" not in greedy
    resp = SimpleNamespace(
        text="42###junk",
        finish_reason="stop",
        input_token_len=9,
        generate_token_len=4,
        error_message=None,
        error_code=None,
    )
    c = completion_from_response(resp, ["###"])
    assert (c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens) == ("42", "stop", 9, 4)
    err = SimpleNamespace(
        text="",
        finish_reason="error",
        input_token_len=9,
        generate_token_len=0,
        error_message="context length exceeded",
        error_code="INVALID",
    )
    assert completion_from_response(err, []).error == "context length exceeded"


def test_lmdeploy_strip_bos_only_when_the_tokenizer_would_add_it_again():
    from winnow.engines.lmdeploy import strip_bos

    class Tok:
        bos_token, bos_token_id = "<s>", 1

        def __init__(self, adds):
            self.adds = adds

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": ([1] if self.adds and add_special_tokens else []) + [5]}

    assert strip_bos("<s>[INST] hi", Tok(adds=True)) == "[INST] hi"
    assert strip_bos("<s>[INST] hi", Tok(adds=False)) == "<s>[INST] hi"
    assert strip_bos("<|im_start|>user", SimpleNamespace(bos_token=None, bos_token_id=None)) == "<|im_start|>user"


def test_lmdeploy_engine_glue(monkeypatch, tiny_model):
    fake = _fake_lmdeploy()
    monkeypatch.setitem(__import__("sys").modules, "lmdeploy", fake)
    from winnow.engines import get_engine

    engine = get_engine(
        "lmdeploy",
        str(tiny_model),
        torch_dtype="float16",
        max_length=None,
        template=None,
        seed=None,
        device="auto",
        backend="pytorch",
        cache_max_entry_count=0.3,
        log_level="ERROR",
    )
    pipe = fake.last
    assert isinstance(pipe.backend_config, fake.PytorchEngineConfig)
    assert (pipe.backend_config.dtype, pipe.backend_config.cache_max_entry_count) == ("float16", 0.3)
    assert pipe.backend_config.enable_prefix_caching is True  # the N copies of a prompt share its KV cache
    assert pipe.kwargs == {"trust_remote_code": False, "log_level": "ERROR"}  # non-config kwargs go to pipeline()

    prompts = [numbered_prompt(0), numbered_prompt(1, words=120)]
    out = generate_sync(engine, prompts, SamplingParams(n=3, temperature=1.0, seed=7, stop=["###"]))
    check_aligned(engine, prompts, 3, out)
    assert [c.text for c in out[0]] == ["seed=7", "seed=8", "seed=9"]  # one seed per copy; stop word cut
    assert all(c.error == "input too long" for c in out[1])
    texts, configs = pipe.calls[0]
    assert texts[0] == engine.encoder.render(prompts[0]) and len(texts) == 6
    assert all(c.n == 1 and c.do_sample for c in configs)

    greedy = generate_sync(engine, prompts[:1], SamplingParams(n=2, temperature=0.0))
    assert len(pipe.calls[-1][0]) == 1 and [c.text for c in greedy[0]] == ["seed=None###rest"] * 2
    asyncio.run(engine.aclose())
    assert pipe.closed


def test_lmdeploy_engine_rejects_an_unknown_backend(monkeypatch, tiny_model):
    monkeypatch.setitem(__import__("sys").modules, "lmdeploy", _fake_lmdeploy())
    from winnow.engines.lmdeploy import LMDeployEngine
    from winnow.errors import ConfigError

    with pytest.raises(ConfigError, match="turbomind or pytorch"):
        LMDeployEngine(str(tiny_model), backend="tensorrt")
