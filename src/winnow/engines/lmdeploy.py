"""The LMDeploy engine: ``lmdeploy.pipeline`` on the TurboMind or PyTorch backend.

LMDeploy's ``GenerationConfig.n`` is documented as "only 1 is supported" (its engine falls back to
1 with a warning), so the N samples of a prompt are N requests, each with its own seed; prefix
caching is on by default so they share the prompt's KV cache. The pipeline returns failed requests
as responses with ``finish_reason="error"``, which become error completions.

Prompts are rendered by winnow (the model's chat template) and passed with
``do_preprocess=False``, so LMDeploy applies no template of its own.
"""

from __future__ import annotations

from typing import Any

from winnow.engines import _local
from winnow.errors import ConfigError, EngineError, require
from winnow.schema import Completion, SamplingParams


def gen_config_kwargs(params: SamplingParams, max_new_tokens: int, sample: int = 0) -> dict[str, Any]:
    """``lmdeploy.GenerationConfig`` keyword arguments for sample number ``sample`` of a prompt
    (pure: no LMDeploy needed)."""
    greedy = _local.is_greedy(params)
    kwargs: dict[str, Any] = {
        "n": 1,
        "max_new_tokens": max_new_tokens,
        "do_sample": not greedy,  # LMDeploy's default is greedy
        "repetition_penalty": params.repetition_penalty,
    }
    if not greedy:
        # LMDeploy's top_k default is 50; 0 turns it off
        kwargs.update(
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k and params.top_k > 0 else 0,
        )
        if params.seed is not None:  # one seed per sample, or the N copies of a prompt would be equal
            kwargs["random_seed"] = params.seed + sample
    if params.stop:
        kwargs["stop_words"] = list(params.stop)
    return kwargs


def completion_from_response(resp: Any, stop: list[str]) -> Completion:
    """A Completion from one LMDeploy ``Response`` (``text``, ``finish_reason``, token lengths)."""
    error = getattr(resp, "error_message", None) or getattr(resp, "error_code", None)
    return _local.make_completion(
        resp.text,
        resp.finish_reason,
        int(resp.input_token_len or 0),
        int(resp.generate_token_len or 0),
        stop,
        error=error and str(error),
    )


def strip_bos(text: str, tokenizer: Any) -> str:
    """``text`` without a leading BOS token when tokenizing it would add one again.

    LMDeploy tokenizes a text prompt with special tokens; a chat template that already writes the
    BOS (Llama, Mistral) would otherwise start the prompt with two.
    """
    bos = getattr(tokenizer, "bos_token", None)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None or not text.startswith(bos):
        return text
    added = tokenizer("x", add_special_tokens=True)["input_ids"]
    return text[len(bos) :] if added[:1] == [bos_id] else text


class LMDeployEngine(_local.LocalEngine):
    """A local model served by LMDeploy's ``pipeline`` (TurboMind or PyTorch backend)."""

    name = "lmdeploy"

    def __init__(
        self,
        model: str,
        *,
        torch_dtype: str | None = "auto",
        max_length: int | None = None,
        template: str | None = None,
        seed: int | None = None,
        backend: str = "turbomind",
        tp: int = 1,
        trust_remote_code: bool = False,
        max_prompts_per_call: int = 2048,
        device: str | None = None,  # LMDeploy places the model itself; accepted so the pipeline's kwargs fit
        **engine_kwargs: Any,
    ):
        lmdeploy = require("lmdeploy", "lmdeploy", "the lmdeploy engine")
        if backend not in ("turbomind", "pytorch"):
            raise ConfigError(f"lmdeploy backend {backend!r}: use turbomind or pytorch")
        # the pipeline call blocks its caller; one call at a time, LMDeploy batches inside it
        super().__init__(
            model,
            torch_dtype=torch_dtype,
            template=template,
            max_length=max_length,
            trust_remote_code=trust_remote_code,
            max_prompts_per_call=max_prompts_per_call,
            **_local.prompt_options(engine_kwargs, "session_len"),
        )
        config_cls = lmdeploy.TurbomindEngineConfig if backend == "turbomind" else lmdeploy.PytorchEngineConfig
        config_kwargs, pipeline_kwargs = _split_config_kwargs(config_cls, engine_kwargs)
        config_kwargs = {
            "dtype": self.dtype,
            "tp": int(tp),
            "enable_prefix_caching": True,
            **({"session_len": int(max_length)} if max_length else {}),
            **config_kwargs,
        }
        try:
            self.pipe = lmdeploy.pipeline(
                self.model_path,
                backend_config=config_cls(**config_kwargs),
                trust_remote_code=trust_remote_code,
                **pipeline_kwargs,
            )
        except Exception as e:
            raise EngineError(f"LMDeploy cannot load {model}: {type(e).__name__}: {e}") from e
        self._gen_config = lmdeploy.GenerationConfig
        self._args.update(
            lmdeploy=getattr(lmdeploy, "__version__", "?"), backend=backend, **config_kwargs, **pipeline_kwargs
        )

    def call(self, batch: list[_local.Encoded], params: SamplingParams) -> list[list[Completion]]:
        """One pipeline call over the batch, each prompt repeated once per sample with its own seed."""
        k = _local.samples_per_request(params)
        tokenizer = self.encoder.tokenizer
        texts, configs = [], []
        for item in batch:
            text = strip_bos(item.text, tokenizer)
            for j in range(k):
                texts.append(text)
                configs.append(self._gen_config(**gen_config_kwargs(params, item.max_new_tokens, j)))
        # ``pipe(...)`` rather than ``pipe.infer``: the same call on LMDeploy releases before 0.12
        responses = self.pipe(texts, gen_config=configs, do_preprocess=False)
        if not isinstance(responses, list):
            responses = [responses]
        return [
            [completion_from_response(responses[i * k + j], params.stop) for j in range(k)] for i in range(len(batch))
        ]

    def close(self) -> None:
        close = getattr(self.pipe, "close", None)
        if callable(close):
            close()


def _split_config_kwargs(config_cls: type, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """engine_kwargs that are fields of the backend config, and the rest (for ``lmdeploy.pipeline``)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    return ({k: v for k, v in kwargs.items() if k in names}, {k: v for k, v in kwargs.items() if k not in names})
