"""The vLLM engine: vLLM's offline ``LLM`` with native multi-sample (``SamplingParams.n``).

Why the offline ``LLM`` and not ``AsyncLLM``: ``LLM.generate`` owns no event loop, so the engine
works the same under ``winnow sample``, ``generate_sync`` (a fresh loop per call) and a reused
engine, while ``AsyncLLM`` binds its output handler to the loop it first ran on. Inside one call
vLLM already schedules continuously; winnow hands it large batches and keeps the next one queued
(``batch_plan``), so the GPU only waits on the tail of a batch.

Prompts are rendered with the model's chat template by winnow and sent as token ids, so vLLM,
SGLang, LMDeploy and transformers all see the same prompt tokens.
"""

from __future__ import annotations

from typing import Any

from winnow.engines import _local
from winnow.errors import EngineError, require
from winnow.schema import Completion, SamplingParams


def sampling_kwargs(params: SamplingParams, max_tokens: int) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments for one prompt (pure: no vLLM needed)."""
    greedy = _local.is_greedy(params)
    kwargs: dict[str, Any] = {
        # vLLM refuses n > 1 with temperature 0; winnow asks once and copies the answer
        "n": _local.samples_per_request(params),
        "max_tokens": max_tokens,
        "temperature": 0.0 if greedy else params.temperature,
        "repetition_penalty": params.repetition_penalty,
    }
    if not greedy:
        kwargs["top_p"] = params.top_p
        # 0 and -1 both mean "off" in current vLLM; -1 is also what versions before 0.8 accept
        kwargs["top_k"] = params.top_k if params.top_k and params.top_k > 0 else -1
        if params.min_p:
            kwargs["min_p"] = params.min_p
    if params.stop:
        kwargs["stop"] = list(params.stop)
    return kwargs


def structured_kwargs(sampling_module: Any, response_format: dict[str, Any] | None) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments for structured output through vLLM's own guided decoding:
    ``structured_outputs`` (vLLM 0.10.2 and later) or ``guided_decoding`` (earlier), from the module
    ``vllm.sampling_params``. Not exercised by winnow's tests (no vLLM on their machines)."""
    from winnow.structured import schema_of

    schema = schema_of(response_format)
    if schema is None:
        return {}
    if hasattr(sampling_module, "StructuredOutputsParams"):
        return {"structured_outputs": sampling_module.StructuredOutputsParams(json=schema)}
    if hasattr(sampling_module, "GuidedDecodingParams"):
        return {"guided_decoding": sampling_module.GuidedDecodingParams(json=schema)}
    raise EngineError("this vLLM has no guided decoding (StructuredOutputsParams or GuidedDecodingParams); "
                      "upgrade vLLM or drop --response_format")


def completions_from_output(output: Any, stop: list[str]) -> list[Completion]:
    """Completions from one vLLM ``RequestOutput`` (read by attribute: ``prompt_token_ids``,
    ``outputs[i].text``, ``.token_ids``, ``.finish_reason``)."""
    prompt_tokens = len(getattr(output, "prompt_token_ids", None) or [])
    return [
        _local.make_completion(o.text, o.finish_reason, prompt_tokens, len(o.token_ids or []), stop)
        for o in output.outputs
    ]


class VLLMEngine(_local.LocalEngine):
    """A local model served by vLLM's offline ``LLM`` on one or more GPUs."""

    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        torch_dtype: str | None = "auto",
        max_length: int | None = None,
        template: str | None = None,
        seed: int | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        trust_remote_code: bool = False,
        max_prompts_per_call: int = 4096,
        device: str | None = None,  # vLLM places the model itself; accepted so the pipeline's kwargs fit
        **engine_kwargs: Any,
    ):
        vllm = require("vllm", "vllm", "the vllm engine")
        self._vllm = vllm
        # LLM.generate blocks and is not re-entrant: one worker thread owns it
        super().__init__(model, torch_dtype=torch_dtype, template=template, max_length=max_length,
                         trust_remote_code=trust_remote_code, max_prompts_per_call=max_prompts_per_call)
        llm_kwargs: dict[str, Any] = {
            "dtype": self.dtype,
            "tensor_parallel_size": int(tensor_parallel_size),
            "gpu_memory_utilization": float(gpu_memory_utilization),
            "trust_remote_code": trust_remote_code,
            **({"seed": int(seed)} if seed is not None else {}),
            **({"max_model_len": int(max_length)} if max_length else {}),
            **engine_kwargs,  # anything else is vLLM's own (enforce_eager, quantization, ...)
        }
        try:
            self.llm = vllm.LLM(model=self.model_path, **llm_kwargs)
        except Exception as e:
            raise EngineError(f"vLLM cannot load {model}: {type(e).__name__}: {e}") from e
        self._args.update(vllm=getattr(vllm, "__version__", "?"), **llm_kwargs)

    def call(self, batch: list[_local.Encoded], params: SamplingParams) -> list[list[Completion]]:
        """One ``LLM.generate`` over the batch, prompts given as token ids."""
        vllm = self._vllm
        budgets = {item.max_new_tokens for item in batch}
        structured = structured_kwargs(vllm.sampling_params, params.response_format) if params.response_format else {}
        if len(budgets) == 1:  # one SamplingParams for the whole call unless --max_length clamps some
            sampling: Any = vllm.SamplingParams(**sampling_kwargs(params, budgets.pop()), **structured)
        else:
            sampling = [vllm.SamplingParams(**sampling_kwargs(params, item.max_new_tokens), **structured)
                        for item in batch]
        inputs = [{"prompt_token_ids": item.ids} for item in batch]
        outputs = self.llm.generate(inputs, sampling, use_tqdm=False)
        return [completions_from_output(out, params.stop) for out in outputs]

    def close(self) -> None:
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(core, "shutdown", None)
        if callable(shutdown):  # vLLM V1 runs the model in a child process: stop it now, not at exit
            shutdown()
