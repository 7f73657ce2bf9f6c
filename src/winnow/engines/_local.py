"""What the local GPU engines (vLLM, SGLang, LMDeploy) share: prompt encoding and result mapping.

Every local engine renders prompts with the model's chat template through winnow's own tokenizer
(so all backends see the same token ids as the transformers engine), fails prompts that cannot be
rendered or are too long as values, sends the rest to its backend in one call, and, if that call
raises, splits it in half until the prompt that broke it is found. Nothing here imports a backend.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from winnow.engines import hf
from winnow.engines.prompts import Encoded, PromptEncoder, errors
from winnow.errors import ConfigError
from winnow.schema import FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, Completion, Prompt, SamplingParams

# winnow's --torch_dtype names -> the names vLLM, SGLang and LMDeploy all take
_DTYPES: dict[str | None, str] = {None: "auto", "": "auto", "auto": "auto"}
_DTYPES.update(hf.DTYPES.items())  # items(): a dict of str keys does not type as one of optional keys

T = TypeVar("T")
R = TypeVar("R")

# backend finish reasons -> winnow's; anything else (abort, error, cancelled, None) is a failure
_FINISH = {
    "stop": FINISH_STOP,
    "eos": FINISH_STOP,
    "eos_token": FINISH_STOP,
    "stop_str": FINISH_STOP,
    "length": FINISH_LENGTH,
    "max_tokens": FINISH_LENGTH,
    "max_new_tokens": FINISH_LENGTH,
    # vLLM's n-gram repetition detector cut the answer short: not a natural end
    "repetition": FINISH_LENGTH,
}


PROMPT_OPTIONS = ("template_kwargs", "use_chat_template", "truncation_strategy", "response_prefix")


def prompt_options(engine_kwargs: dict[str, Any], context_key: str) -> dict[str, Any]:
    """Take the prompt-making options out of a backend's kwargs (the rest goes to the backend), and the
    backend's own context length (``context_key``) as the prompt limit when --max_length is not set."""
    out = {k: engine_kwargs.pop(k) for k in PROMPT_OPTIONS if k in engine_kwargs}
    if engine_kwargs.get(context_key):
        out["backend_context"] = int(engine_kwargs[context_key])
    return out


def map_finish(raw: Any) -> str:
    """A backend's finish reason as winnow's ``stop``/``length``/``error``."""
    return _FINISH.get(str(raw).lower(), FINISH_ERROR) if raw is not None else FINISH_ERROR


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to its first stop string, and whether one was found.

    vLLM and SGLang already trim stop strings; LMDeploy stops on any *token* containing one, so the
    text may run past it. Cutting here gives every engine the same contract.
    """
    text, found = first_stop(text, stop)
    return text, found is not None


def first_stop(text: str, stop: Sequence[str]) -> tuple[str, str | None]:
    """``text`` up to its first stop string, and that stop string (None when there is none)."""
    hits = [(at, s) for at, s in ((text.find(s), s) for s in stop if s) if at >= 0]
    if not hits:
        return text, None
    at, found = min(hits)
    return text[:at], found


def make_completion(
    text: str | None,
    raw_finish: Any,
    prompt_tokens: int,
    completion_tokens: int,
    stop: Sequence[str] = (),
    error: str | None = None,
    stop_reason: Any = None,
) -> Completion:
    """One Completion from a backend's plain result fields; ``stop_reason`` is the stop string the backend
    says it stopped at and trimmed (vLLM's ``stop_reason``, SGLang's ``matched``), if it says."""
    finish = map_finish(raw_finish)
    if finish == FINISH_ERROR:
        message = error or f"the engine ended this sample with finish reason {raw_finish!r}"
        return Completion(
            text="",
            finish_reason=FINISH_ERROR,
            error=message,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )
    text, found = first_stop(text or "", stop)
    if found is None and isinstance(stop_reason, str) and stop_reason in stop:
        found = stop_reason
    return Completion(
        text=text,
        finish_reason=FINISH_STOP if found is not None else finish,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        stop_string=found,
    )


def with_local_defaults(params: SamplingParams) -> SamplingParams:
    """``params`` with what the run left unset (and the model's generation config did not give) filled with
    the backends' usual defaults: temperature 1, top_p 1, no repetition penalty."""
    import dataclasses

    return dataclasses.replace(
        params,
        temperature=1.0 if params.temperature is None else params.temperature,
        top_p=1.0 if params.top_p is None else params.top_p,
        repetition_penalty=1.0 if params.repetition_penalty is None else params.repetition_penalty,
    )


def is_greedy(params: SamplingParams) -> bool:
    """Temperature 0: every sample would be the same, so engines compute one and copy it."""
    return params.temperature is not None and params.temperature <= 0


def samples_per_request(params: SamplingParams) -> int:
    """How many samples to ask the backend for per prompt (1 when greedy)."""
    return 1 if is_greedy(params) else params.n


def fill(completions: list[Completion], n: int) -> list[Completion]:
    """Exactly ``n`` completions: a greedy answer copied, or a short list padded with errors."""
    if len(completions) == 1 and n > 1:
        only = completions[0]
        return [
            Completion(
                text=only.text,
                finish_reason=only.finish_reason,
                prompt_tokens=only.prompt_tokens,
                completion_tokens=only.completion_tokens,
                error=only.error,
            )
            for _ in range(n)
        ]
    if len(completions) < n:
        prompt_tokens = completions[0].prompt_tokens if completions else 0
        missing = f"the engine returned {len(completions)} of {n} samples"
        return completions + errors(n - len(completions), missing, prompt_tokens)
    return completions[:n]


def run_isolated(items: list[T], call: Callable[[list[T]], list[R]], on_error: Callable[[T, Exception], R]) -> list[R]:
    """``call(items)``, aligned with ``items``; if it raises, halve and retry, so that one bad prompt
    (too long for the model, say) fails alone and the rest of the batch goes on."""
    if not items:
        return []
    try:
        out = call(items)
        if len(out) != len(items):
            raise RuntimeError(f"the engine returned {len(out)} results for {len(items)} prompts")
        return out
    except Exception as e:
        if len(items) == 1:
            return [on_error(items[0], e)]
        mid = len(items) // 2
        return run_isolated(items[:mid], call, on_error) + run_isolated(items[mid:], call, on_error)


def run_encoded(
    work: list[Encoded],
    results: list[list[Completion]],
    params: SamplingParams,
    call: Callable[[list[Encoded], SamplingParams], list[list[Completion]]],
) -> list[list[Completion]]:
    """Run ``call`` on what encoded (isolating failures) and return n completions per prompt: ``results`` (what
    the encoder gave, failed prompts already filled) completed.

    ``call`` gets a batch of encoded prompts and returns, for each, the completions it produced
    (``samples_per_request(params)`` of them, or all ``n``); :func:`fill` makes them exactly ``n``.
    """

    def failed(item: Encoded, e: Exception) -> list[Completion]:
        return errors(params.n, f"{type(e).__name__}: {e}", prompt_tokens=len(item.ids))

    outputs = run_isolated(work, lambda batch: call(batch, params), failed)
    for item, completions in zip(work, outputs, strict=True):
        results[item.slot] = fill(completions, params.n)
    return results


class LocalEngine:
    """What every local engine (transformers, vLLM, SGLang, LMDeploy) shares: prompt encoding, the blocking
    backend call on a worker thread, greedy copies, failures as values, and the protocol methods. Each
    engine builds its backend after ``__init__`` and defines ``call`` (one batch of encoded prompts -> their
    completions) and ``close``."""

    name = "local"
    call: Callable[[list[Encoded], SamplingParams], list[list[Completion]]]
    close: Callable[[], None]

    def __init__(
        self,
        model: str,
        *,
        torch_dtype: str | None,
        template: str | None,
        max_length: int | None,
        trust_remote_code: bool,
        max_prompts_per_call: int,
        calls_in_flight: int = 2,
        workers: int = 1,
        template_kwargs: dict | None = None,
        use_chat_template: bool | None = None,
        truncation_strategy: str | None = None,
        response_prefix: str | None = None,
        backend_context: int | None = None,
        revision: str | None = None,
    ):
        if torch_dtype not in _DTYPES:
            raise ConfigError(f"--torch_dtype {torch_dtype!r}: use one of auto, float32, bfloat16, float16")
        self.dtype = _DTYPES[torch_dtype]
        self.model_path = hf.resolve_model_path(model, revision=revision)
        self.encoder = PromptEncoder(
            self.model_path,
            template=template,
            max_length=max_length or backend_context,
            trust_remote_code=trust_remote_code,
            template_kwargs=template_kwargs,
            use_chat_template=use_chat_template,
            truncation_strategy=truncation_strategy,
            response_prefix=response_prefix,
        )
        self.max_prompts_per_call = int(max_prompts_per_call)
        self.calls_in_flight = max(1, int(calls_in_flight))
        self._args: dict[str, Any] = {"model": model, **({"template": template} if template else {})}
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=f"winnow-{self.name}"
        )

    @property
    def context_length(self) -> int | None:
        """The limit on prompt + answer the engine works within (--max_length, else the model's context)."""
        return self.encoder.max_length

    @property
    def template(self) -> str | None:
        """The chat template prompts are rendered with (None: the tokenizer's own)."""
        return self.encoder.template

    def batch_plan(self, n: int) -> tuple[int, int]:
        # the backends schedule inside a call: give them large batches, keep the next one queued
        return max(1, self.max_prompts_per_call // max(1, n)), self.calls_in_flight

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self._args, **self.encoder.describe()}

    def generation_defaults(self) -> dict[str, Any]:
        """The sampling settings of the model's generation_config.json."""
        return hf.generation_defaults(self.model_path)

    async def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.generate_blocking, prompts, params)

    def generate_blocking(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """The synchronous body of :meth:`generate`."""
        params = with_local_defaults(params)
        return run_encoded(*self.encoder.encode(prompts, params), params, self.call)

    def generate_ids_blocking(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """Like :meth:`generate_blocking` for prompts already tokenized (no chat template applied): the
        server's raw completions and its dynamic batches."""
        params = with_local_defaults(params)
        return run_encoded(*self.encoder.encode_ids(prompts, params), params, self.call)

    async def aclose(self) -> None:
        self._executor.shutdown(wait=True)
        self.close()
