"""The SGLang engine: SGLang's offline ``sglang.Engine``, driven through ``async_generate``.

The N samples of a prompt are sent as N copies of the prompt: SGLang's RadixAttention caches the
shared prefix, and its own parallel sampling (``n`` > 1) warms each prompt's prefix one request at
a time before sampling, which its tokenizer manager itself warns is slow for large batches.

``sglang.Engine`` keeps its asyncio state (the tokenizer manager's receive loop) on the event loop
it was built under, and, built on the main thread, installs SIGTERM/SIGQUIT handlers on it. So the
engine is built and driven on a private loop thread: winnow's own loop and signal handling stay
untouched, and calls from any loop (``generate_sync``, notebooks) reach the same SGLang loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any

from winnow.engines import _local
from winnow.errors import EngineError, require
from winnow.schema import Completion, SamplingParams


def sampling_params(params: SamplingParams, max_new_tokens: int) -> dict[str, Any]:
    """SGLang's ``sampling_params`` dict for one request (pure: no SGLang needed)."""
    out: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "temperature": 0.0 if _local.is_greedy(params) else params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k and params.top_k > 0 else -1,  # -1: whole vocabulary
        "repetition_penalty": params.repetition_penalty,
    }
    if params.min_p and not _local.is_greedy(params):
        out["min_p"] = params.min_p
    if params.stop:
        out["stop"] = list(params.stop)
    return out


def completion_from_output(out: dict[str, Any], stop: list[str]) -> Completion:
    """A Completion from one SGLang result dict (``text``, ``meta_info.finish_reason``, token counts)."""
    meta = out.get("meta_info") or {}
    reason = meta.get("finish_reason")  # {"type": "stop" | "length" | "abort", "matched": stop string or id}
    kind = reason.get("type") if isinstance(reason, dict) else reason
    error = reason.get("message") if isinstance(reason, dict) and kind == "abort" else None
    output_ids = out.get("output_ids")
    completion_tokens = meta.get("completion_tokens", len(output_ids) if output_ids is not None else 0)
    return _local.make_completion(
        out.get("text"),
        kind,
        int(meta.get("prompt_tokens") or 0),
        int(completion_tokens or 0),
        stop,
        error=error,
        stop_reason=reason.get("matched") if isinstance(reason, dict) else None,
    )


class _LoopThread:
    """A daemon thread running a private asyncio loop; ``build`` runs on it before the loop starts."""

    def __init__(self, build: Callable[[], Any]):
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, args=(build, ready), name="winnow-sglang-loop", daemon=True)
        self.thread.start()
        self.value = ready.result()  # re-raises what ``build`` raised

    def _main(self, build: Callable[[], Any], ready: concurrent.futures.Future) -> None:
        asyncio.set_event_loop(self.loop)  # the engine picks this loop up as its own
        try:
            ready.set_result(build())
        except BaseException as e:
            ready.set_exception(e)
            self.loop.close()
            return
        self.loop.run_forever()
        self.loop.close()

    def run(self, coro) -> Any:
        """Run ``coro`` on the private loop and wait for it (called from worker threads)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


class SGLangEngine(_local.LocalEngine):
    """A local model served by SGLang's offline ``Engine`` on one or more GPUs."""

    name = "sglang"

    def __init__(
        self,
        model: str,
        *,
        torch_dtype: str | None = "auto",
        max_length: int | None = None,
        template: str | None = None,
        seed: int | None = None,
        tp_size: int = 1,
        mem_fraction_static: float | None = None,
        trust_remote_code: bool = False,
        max_prompts_per_call: int = 4096,
        calls_in_flight: int = 2,
        device: str | None = None,  # SGLang places the model itself; accepted so the pipeline's kwargs fit
        **engine_kwargs: Any,
    ):
        sglang = require("sglang", "sglang", "the sglang engine")
        # worker threads block on the private loop; calls in flight at once are batched together by SGLang
        super().__init__(
            model,
            torch_dtype=torch_dtype,
            template=template,
            max_length=max_length,
            trust_remote_code=trust_remote_code,
            max_prompts_per_call=max_prompts_per_call,
            calls_in_flight=calls_in_flight,
            workers=calls_in_flight,
            **_local.prompt_options(engine_kwargs, "context_length"),
        )
        server_args: dict[str, Any] = {
            "model_path": self.model_path,
            "dtype": self.dtype,
            "tp_size": int(tp_size),
            "trust_remote_code": trust_remote_code,
            **({"mem_fraction_static": float(mem_fraction_static)} if mem_fraction_static is not None else {}),
            **({"random_seed": int(seed)} if seed is not None else {}),
            **({"context_length": int(max_length)} if max_length else {}),
            **engine_kwargs,  # anything else is one of SGLang's ServerArgs
        }
        try:
            self._loop = _LoopThread(lambda: sglang.Engine(**server_args))
        except Exception as e:
            raise EngineError(f"SGLang cannot load {model}: {type(e).__name__}: {e}") from e
        self.engine = self._loop.value
        self._args.update(sglang=getattr(sglang, "__version__", "?"), **server_args)

    def call(self, batch: list[_local.Encoded], params: SamplingParams) -> list[list[Completion]]:
        """One ``async_generate`` over the batch, each prompt repeated once per sample."""
        k = _local.samples_per_request(params)
        input_ids = [item.ids for item in batch for _ in range(k)]
        sampling = [sampling_params(params, item.max_new_tokens) for item in batch for _ in range(k)]
        outputs = self._loop.run(self.engine.async_generate(input_ids=input_ids, sampling_params=sampling))
        if isinstance(outputs, dict):  # a batch of one comes back unwrapped
            outputs = [outputs]
        if len(outputs) != len(input_ids):
            raise EngineError(f"SGLang returned {len(outputs)} results for {len(input_ids)} requests")
        return [[completion_from_output(outputs[i * k + j], params.stop) for j in range(k)] for i in range(len(batch))]

    def close(self) -> None:
        try:
            self.engine.shutdown()  # stops SGLang's scheduler and detokenizer processes
        finally:
            self._loop.stop()
