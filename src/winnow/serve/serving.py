"""The server's engine side, free of any web framework: validation, dynamic batching, responses.

A :class:`Batcher` gathers concurrent requests into engine calls. :class:`PolicyServing` answers
chat and completions requests with a causal LM; :class:`RewardServing` answers them with a reward
model's score (swift's convention) and scores conversation lists for ``/v1/rewards``. Errors are
:class:`ServingError` values carrying OpenAI's error shape; ``app.py`` only turns them into
responses.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from winnow.schema import FINISH_ERROR, Completion, SamplingParams, Score
from winnow.serve import protocol as p

if TYPE_CHECKING:
    from winnow.engines import AcceptsTokenIds, Engine, Reseedable, StreamsTokens
    from winnow.engines.hf import TokenChars

    class _ServedEngine(Engine, AcceptsTokenIds, Protocol):
        """What the policy server needs of its engine: a local engine that runs token ids."""

        model_path: str


log = logging.getLogger("winnow.serve")


# ----------------------------------------------------------------------------- errors


class ServingError(Exception):
    """A request that cannot be answered, as an HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        info = p.ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return p.ErrorResponse(error=info).model_dump()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ServingError:
    return ServingError(400, message, param=param, code=code)


def context_too_long(
    context_length: int, prompt_tokens: int, wanted: int, param: str, *, at_least: bool = False
) -> ServingError:
    """OpenAI's ``context_length_exceeded`` 400; ``at_least`` when the prompt was judged from its
    length in characters, without tokenizing it."""
    bound = "at least " if at_least else ""
    asked = (
        f"{bound}{prompt_tokens + wanted} tokens ({bound}{prompt_tokens} in the {param}, {wanted} in the completion)"
    )
    return bad_request(
        f"This model's maximum context length is {context_length} tokens. However, you requested {asked}. "
        f"Please reduce the length of the {param} or completion.",
        param,
        code="context_length_exceeded",
    )


def overloaded(message: str) -> ServingError:
    return ServingError(503, message, type="server_overloaded", code="server_overloaded", headers={"Retry-After": "1"})


# ----------------------------------------------------------------------------- batching


@dataclass
class _Job:
    key: Hashable
    item: Any
    future: asyncio.Future


class Batcher:
    """Turns concurrent requests into few engine calls.

    The first waiting request opens a batch; the batch takes whatever else is waiting and keeps
    filling for at most ``max_wait_ms`` or until it holds ``max_batch_size`` requests. Requests
    whose keys differ (sampling settings) cannot share a call, so a batch makes one call per key.
    One call runs at a time on one worker thread that owns the model; requests arriving meanwhile
    wait for the next batch. More than ``max_queue`` waiting requests is an overload (503).
    Without ``dynamic_batching`` every request is a call of its own.
    """

    # run_group's key is whatever its owner passes to submit (each owner has its own key type)
    def __init__(
        self,
        run_group: Callable[[Any, list[Any]], list[Any]],
        *,
        max_batch_size: int = 64,
        max_wait_ms: float = 10.0,
        max_queue: int = 256,
        dynamic_batching: bool = True,
    ):
        self.run_group = run_group
        self.max_batch_size = max(1, int(max_batch_size)) if dynamic_batching else 1
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0 if dynamic_batching else 0.0
        self.max_queue = max(1, int(max_queue))
        # one thread owns the model, so engine calls never interleave
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="winnow-serve")
        self.requests = 0  # requests batched, and engine calls made (for /health and the benchmark)
        self.calls = 0
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self._closed = False

    async def submit(self, key: Hashable, item: Any) -> Any:
        """The engine's result for ``item``, once a batch holding it has run."""
        if self._closed:
            raise overloaded("the server is shutting down")
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._queue.qsize() >= self.max_queue:
            raise overloaded(f"the server is busy ({self._queue.qsize()} requests queued); retry shortly")
        self.requests += 1
        job = _Job(key, item, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work(), name="winnow-batcher")
        return await job.future

    async def aclose(self) -> None:
        """Stop taking requests; waiting ones get a 503."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(overloaded("the server is shutting down"))
        self.executor.shutdown(wait=True)

    async def _work(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch_size:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            groups: dict[Hashable, list[_Job]] = {}
            for job in batch:
                if not job.future.done():  # a client that went away while waiting
                    groups.setdefault(job.key, []).append(job)
            for key, jobs in groups.items():
                await self._run(loop, key, jobs)

    async def _run(self, loop: asyncio.AbstractEventLoop, key: Hashable, jobs: list[_Job]) -> None:
        self.calls += 1
        try:
            results = await loop.run_in_executor(self.executor, self.run_group, key, [j.item for j in jobs])
            if len(results) != len(jobs):
                raise RuntimeError(f"the engine returned {len(results)} results for {len(jobs)} requests")
        except Exception as e:
            log.exception("engine call failed")
            error = ServingError(500, f"the engine failed: {type(e).__name__}: {e}", type="server_error")
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        for job, result in zip(jobs, results, strict=True):
            if not job.future.done():
                job.future.set_result(result)


# ----------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class Limits:
    """How much one request may ask for (``winnow serve`` flags of the same names; docs/serve.md, "Limits")."""

    max_messages: int = 2048
    max_prompts: int = 256
    max_stop: int = 16
    max_stop_chars: int = 256

    @classmethod
    def from_config(cls, config: Any) -> Limits:
        """The limits set in a ServeConfig."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    def check_sizes(self, route: str, data: Any) -> None:
        """400 naming the first list or stop string in a raw JSON body (``route``: chat, completions or
        rewards) that is over its limit. Run on the parsed JSON before it becomes request objects,
        which for a long list cost far more memory and time than the JSON itself."""
        if not isinstance(data, dict):
            return  # validation says what is wrong
        messages = data.get("messages")
        if route == "rewards":
            self._cap(messages, self.max_prompts, "messages", "conversations", "max_prompts")
            for i, conversation in enumerate(messages if isinstance(messages, list) else []):
                self._check_messages(conversation, f"messages[{i}]")
        elif route == "chat":
            self._check_messages(messages, "messages")
        else:
            prompt = data.get("prompt")
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
                self._cap(prompt, self.max_prompts, "prompt", "prompts", "max_prompts")
        stop = data.get("stop")
        if route != "rewards" and stop is not None:
            self._cap(stop, self.max_stop, "stop", "strings", "max_stop")
            for i, s in enumerate([stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []):
                if isinstance(s, str) and len(s) > self.max_stop_chars:
                    param = "stop" if isinstance(stop, str) else f"stop[{i}]"
                    raise bad_request(
                        f"{param} is {len(s)} characters long; this server takes stop strings of at "
                        f"most {self.max_stop_chars} (--max_stop_chars)",
                        param,
                        code="string_above_max_length",
                    )

    def _check_messages(self, messages: Any, param: str) -> None:
        self._cap(messages, self.max_messages, param, "messages", "max_messages")
        for i, m in enumerate(messages if isinstance(messages, list) else []):
            if isinstance(m, dict):
                self._cap(m.get("content"), self.max_messages, f"{param}[{i}].content", "content parts", "max_messages")

    @staticmethod
    def _cap(items: Any, most: int, param: str, what: str, flag: str) -> None:
        if isinstance(items, list) and len(items) > most:
            raise bad_request(
                f"{param} holds {len(items)} {what}; this server takes at most {most} (--{flag})",
                param,
                code="array_above_max_length",
            )


# ----------------------------------------------------------------------------- request helpers


def _messages(messages: list[p.ChatMessage], param: str = "messages") -> list[dict[str, Any]]:
    """Chat messages as plain dicts with text content; images and other parts are refused."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text":
                    raise bad_request(
                        f"content part type {part.type!r} is not supported; send text",
                        f"{param}[{i}].content[{j}].type",
                    )
                if part.text is None:
                    raise bad_request("a text part needs its 'text'", f"{param}[{i}].content[{j}].text")
                texts.append(part.text)
            content = "".join(texts)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    return out


def _refuse(req: Any, checks: dict[str, bool]) -> None:
    """400 for the first field whose value asks for something this server does not do."""
    for field, unsupported in checks.items():
        if unsupported:
            raise bad_request(f"{field}={getattr(req, field)!r} is not supported by this server", field)


# Fields that OpenAI, vLLM or transformers clients send and that would change the answer, with the
# values that change nothing: any other value is refused (400) rather than silently ignored.
# Fields not listed here (store, metadata, user, service_tier, prediction, ...) are ignored.
_UNSUPPORTED_EXTRAS: dict[str, tuple] = {
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
    "min_tokens": (None, 0),
    "ignore_eos": (None, False),
    "stop_token_ids": (None, []),
    "bad_words": (None, []),
    "allowed_token_ids": (None,),
    "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True),
    "include_stop_str_in_output": (None, False),
    "use_beam_search": (None, False),
    "num_beams": (None, 1),
    "length_penalty": (None, 1),
    "typical_p": (None, 1),
    "epsilon_cutoff": (None, 0),
    "eta_cutoff": (None, 0),
    "no_repeat_ngram_size": (None, 0),
    "truncate_prompt_tokens": (None,),
    "prompt_logprobs": (None,),
    "logits_processors": (None, []),
    "structured_outputs": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "return_tokens_as_token_ids": (None, False),
}
# add_generation_prompt and continue_final_message are checked together (``_continued``)
_CHAT_EXTRAS = {
    **_UNSUPPORTED_EXTRAS,
    "echo": (None, False),
    "add_special_tokens": (None, False),
    "chat_template": (None,),
    "documents": (None, []),
}
_COMPLETION_EXTRAS = {**_UNSUPPORTED_EXTRAS, "add_special_tokens": (None, True)}

# apply_chat_template's own arguments: a template variable of the same name would clash with them
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "sanitize_control_tokens",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)


def _refuse_extras(req: Any, table: dict[str, tuple]) -> None:
    """400 for the first unknown field that would change the answer (see ``_UNSUPPORTED_EXTRAS``)."""
    for field, value in (req.model_extra or {}).items():
        if field in table and value not in table[field]:
            raise bad_request(f"{field}={value!r} is not supported by this server", field)


def _continued(req: Any, messages: list[dict]) -> tuple[list[dict], str | None]:
    """vLLM's ``continue_final_message``: the messages before the final assistant one, and that message's
    text, which the answer continues (rendered after the generation prompt exactly as winnow's local engines
    render a partial answer); else the messages as they are and None."""
    extra = req.model_extra or {}
    cont, generation_prompt = extra.get("continue_final_message"), extra.get("add_generation_prompt")
    if cont not in (None, False, True):
        raise bad_request(f"continue_final_message={cont!r}: expected true or false", "continue_final_message")
    if not cont:
        if generation_prompt not in (None, True):
            raise bad_request(
                f"add_generation_prompt={generation_prompt!r} is only supported with continue_final_message=true",
                "add_generation_prompt",
            )
        return messages, None
    if generation_prompt not in (None, False):
        raise bad_request(
            "continue_final_message and add_generation_prompt cannot both be true", "add_generation_prompt"
        )
    if not messages or messages[-1]["role"] != "assistant":
        raise bad_request(
            "continue_final_message needs the last message to be the assistant's partial answer", "messages"
        )
    return messages[:-1], str(messages[-1].get("content") or "")


def _template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``chat_template_kwargs`` as template variables; names that are apply_chat_template's own are refused."""
    for name in kwargs or {}:
        if name in _RESERVED_TEMPLATE_KWARGS:
            raise bad_request(
                f"chat_template_kwargs may not set {name!r} (the server sets it)", f"chat_template_kwargs.{name}"
            )
    return dict(kwargs or {})


def _response_format(value: dict[str, Any] | None) -> str | None:
    """A request's ``response_format`` as canonical JSON for constrained decoding (None: free text);
    400 naming the field when it is not one this server decodes."""
    if not value or value.get("type") == "text":
        return None
    from winnow.errors import ConfigError
    from winnow.structured import load_response_format

    if value.get("type") not in ("json_object", "json_schema"):
        raise bad_request(
            f"response_format.type {value.get('type')!r} is not supported; use text, json_object or json_schema",
            "response_format.type",
        )
    try:
        normalised = load_response_format(value)
    except ConfigError as e:
        raise bad_request(str(e).replace("--response_format", "response_format"), "response_format") from None
    return json.dumps(normalised, sort_keys=True)


def _stop(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [s for s in ([stop] if isinstance(stop, str) else stop) if s]


_WHITESPACE = re.compile(r"\s+")


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"

# temperatures below this are greedy (as in vLLM): dividing logits by less overflows to inf and
# sampling from the result fails
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class _Key:
    """What requests must share to share one ``generate`` call."""

    temperature: float
    top_p: float
    top_k: int | None
    min_p: float | None
    max_new_tokens: int
    stop: tuple[str, ...]
    repetition_penalty: float
    seed: int | None
    solo: object = None  # a seeded or streamed request gets a call of its own (see docs/serve.md, "seed")
    streaming: bool = False  # one answer streamed token by token as it is generated
    response_format: str | None = None  # structured output, as canonical JSON (one grammar per call)


@dataclass
class _GenItem:
    ids: list[int]
    n: int
    on_text: Any = None  # streaming: called (from the model thread) with each new piece of text


# ----------------------------------------------------------------------------- served models


class _Served:
    """The model name checks every served model shares."""

    name: str
    kind: str
    batcher: Batcher
    limits: Limits

    def check_model(self, model: str | None) -> None:
        """404 in OpenAI's shape when a request names a model this server does not serve."""
        if model and model != self.name:
            raise ServingError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.name}'",
                param="model",
                code="model_not_found",
            )

    def check_sizes(self, route: str, data: Any) -> None:
        """400 for a raw JSON body (before it becomes request objects) that asks for too much."""
        self.limits.check_sizes(route, data)

    def models(self) -> p.ModelList:
        return p.ModelList(data=[p.ModelCard(id=self.name)])

    def info(self) -> dict[str, Any]:
        """The health route's body: what is served and how busy the batcher has been."""
        return {
            "status": "ok",
            "model": self.name,
            "kind": self.kind,
            "requests": self.batcher.requests,
            "engine_calls": self.batcher.calls,
        }


class PolicyServing(_Served):
    """Chat and completions from a causal LM engine, batched dynamically."""

    kind = "policy"

    def __init__(
        self,
        engine: Any,
        *,
        name: str,
        default_max_tokens: int | None = None,
        limits: Limits | None = None,
        **batching: Any,
    ):
        from winnow.engines import AcceptsTokenIds, Reseedable, StreamsTokens, hf

        if not isinstance(engine, AcceptsTokenIds):
            from winnow.errors import ConfigError

            raise ConfigError(
                f"engine {engine.name!r} cannot be served: it does not run tokenized prompts "
                "(serve a local engine: transformers, vllm, sglang, lmdeploy)"
            )
        self.engine = cast("_ServedEngine", engine)
        self.reseedable = isinstance(engine, Reseedable)
        self.streams = isinstance(engine, StreamsTokens)
        self.name = name
        # the server's own tokenizer: the engine's is busy on the model thread, and a fast tokenizer
        # must not be used from two threads at once
        self.tokenizer = hf.load_tokenizer(self.engine.model_path)
        self.template = getattr(engine, "template", None)
        self.context_length: int | None = getattr(engine, "context_length", None)
        self.vocab_size = len(self.tokenizer)
        self.token_chars = hf.longest_token_chars(self.tokenizer)
        self.default_max_tokens = default_max_tokens
        self.limits = limits or Limits()
        self.batcher = Batcher(self._run_group, **batching)
        # rendering and tokenizing a long prompt takes a while: on a thread of its own (one, as the
        # tokenizer is not shared between threads) the event loop keeps answering meanwhile
        self._tokenizing = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="winnow-tokenize")

    async def aclose(self) -> None:
        await self.batcher.aclose()
        await self.engine.aclose()
        self._tokenizing.shutdown(wait=True)

    # ------------------------------------------------------------------ engine side (model thread)

    def _run_group(self, key: _Key, items: list[_GenItem]) -> list[list[Completion]]:
        """One ``generate`` call for requests sharing ``key``: every request's n samples are rows."""
        params = SamplingParams(
            n=1,
            max_new_tokens=key.max_new_tokens,
            temperature=key.temperature,
            top_p=key.top_p,
            top_k=key.top_k,
            min_p=key.min_p,
            repetition_penalty=key.repetition_penalty,
            stop=list(key.stop),
            seed=key.seed,
            response_format=json.loads(key.response_format) if key.response_format else None,
        )
        if key.seed is not None and self.reseedable:
            cast("Reseedable", self.engine).reseed(key.seed)
        if key.streaming:
            (item,) = items
            return [[cast("StreamsTokens", self.engine).stream_ids_blocking(item.ids, params, item.on_text)]]
        if key.temperature == 0:  # greedy: the n answers of a request are one answer, computed once
            answers = [c[0] for c in self.engine.generate_ids_blocking([item.ids for item in items], params)]
            return [[dataclasses.replace(a) for _ in range(item.n)] for a, item in zip(answers, items, strict=True)]
        rows = [item.ids for item in items for _ in range(item.n)]
        flat = [c[0] for c in self.engine.generate_ids_blocking(rows, params)]
        return _split(flat, [item.n for item in items])

    # ------------------------------------------------------------------ request side (event loop)

    def check_sizes(self, route: str, data: Any) -> None:
        """The limits' checks, and a token-id prompt longer than the context refused while it is
        still JSON (its length is its token count; as request objects it would cost far more)."""
        super().check_sizes(route, data)
        prompt = data.get("prompt") if route == "completions" and isinstance(data, dict) else None
        if self.context_length is None or not isinstance(prompt, list) or not prompt:
            return
        token_lists = [prompt] if isinstance(prompt[0], int) else prompt
        wanted = data.get("max_tokens")
        if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 1:
            wanted = self.default_max_tokens or 1
        for i, ids in enumerate(token_lists):
            if isinstance(ids, list) and len(ids) + wanted > self.context_length:
                param = f"prompt[{i}]" if len(token_lists) > 1 else "prompt"
                raise context_too_long(self.context_length, len(ids), wanted, param)

    def _max_tokens(self, req: p._SamplingFields) -> int | None:
        return getattr(req, "max_completion_tokens", None) or req.max_tokens or self.default_max_tokens

    def _prompt_budget(self, req: p._SamplingFields) -> int | None:
        """The most prompt tokens that leave room for the completion (None: no known context)."""
        if self.context_length is None:
            return None
        return self.context_length - (self._max_tokens(req) or 1)

    def _key(
        self,
        req: p._SamplingFields,
        prompt_tokens: int,
        param: str,
        streamable: bool = False,
        response_format: str | None = None,
    ) -> _Key:
        max_tokens = self._max_tokens(req)
        if self.context_length is not None:
            room = self.context_length - prompt_tokens
            wanted = max_tokens or 1
            if room < wanted:
                raise context_too_long(self.context_length, prompt_tokens, wanted, param)
            max_tokens = max_tokens or room
        temperature = 1.0 if req.temperature is None else req.temperature
        if temperature < GREEDY_BELOW:
            temperature = 0.0
        top_k = req.top_k if req.top_k and req.top_k > 0 else None
        if req.seed is not None and not self.reseedable:
            raise bad_request(f"seed is not supported by the {self.engine.name} engine this server runs", "seed")
        streaming = streamable and bool(req.stream) and req.n == 1 and self.streams
        return _Key(
            temperature=temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=top_k,
            min_p=req.min_p or None,
            max_new_tokens=int(max_tokens or 16),
            stop=tuple(_stop(req.stop)),
            repetition_penalty=req.repetition_penalty or 1.0,
            seed=req.seed,
            solo=object() if req.seed is not None or streaming else None,
            streaming=streaming,
            response_format=response_format,
        )

    def _encode(self, text: str, budget: int | None, param: str, add_special_tokens: bool) -> list[int]:
        """Token ids of ``text``; a text surely longer than ``budget`` tokens is refused untokenized."""
        from winnow.engines import hf

        if budget is not None and hf.certainly_too_long(text, budget, self.token_chars):
            assert self.context_length is not None and self.token_chars is not None
            at_least = -(-len(text) // self.token_chars.of(text))
            raise context_too_long(self.context_length, at_least, self.context_length - budget, param, at_least=True)
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def _encode_chat(
        self, messages: list[dict], template_kwargs: dict[str, Any], budget: int | None, prefix: str | None = None
    ) -> list[int]:
        from winnow.engines import hf

        try:
            text = hf.render_chat(
                self.tokenizer, messages, self.template, template_kwargs=template_kwargs, response_prefix=prefix
            )
        except Exception as e:
            raise bad_request(f"cannot apply the chat template to these messages: {e}", "messages") from None
        return self._encode(text, budget, "messages", add_special_tokens=False)

    async def _tokenize(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, fn, *args)

    def _refuse_common(self, req: p._SamplingFields, extras: dict[str, tuple]) -> None:
        _refuse(
            req,
            {
                "presence_penalty": bool(req.presence_penalty),
                "frequency_penalty": bool(req.frequency_penalty),
                "logit_bias": bool(req.logit_bias),
            },
        )
        _refuse_extras(req, extras)

    async def _generate(self, key: _Key, ids: list[int], n: int) -> list[Completion]:
        completions = await self.batcher.submit(key, _GenItem(ids, n))
        failed = [c for c in completions if c.finish_reason == FINISH_ERROR]
        if failed:
            raise ServingError(500, f"generation failed: {failed[0].error}", type="server_error")
        return completions

    async def chat(self, req: p.ChatCompletionRequest) -> p.ChatCompletionResponse | AsyncIterator[str]:
        """A chat completion, or (``stream``) its server-sent events."""
        self.check_model(req.model)
        self._refuse_common(req, _CHAT_EXTRAS)
        _refuse(
            req,
            {
                "logprobs": bool(req.logprobs),
                "top_logprobs": bool(req.top_logprobs),
                "tools": bool(req.tools),
                "tool_choice": req.tool_choice not in (None, "none", "auto"),
            },
        )
        response_format = _response_format(req.response_format)
        template_kwargs = _template_kwargs(req.chat_template_kwargs)
        messages, prefix = _continued(req, _messages(req.messages))
        ids = await self._tokenize(self._encode_chat, messages, template_kwargs, self._prompt_budget(req), prefix)
        key = self._key(req, len(ids), "messages", streamable=True, response_format=response_format)
        if key.streaming:
            return self._stream_chat(key, ids, bool(req.stream_options and req.stream_options.include_usage))
        completions = await self._generate(key, ids, req.n)
        usage = _usage(len(ids), completions)
        response = p.ChatCompletionResponse(
            model=self.name,
            usage=usage,
            choices=[
                p.ChatChoice(
                    index=i,
                    message=p.AssistantMessage(content=c.text),
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_string,
                )
                for i, c in enumerate(completions)
            ],
        )
        if req.stream:
            return chat_stream(response, bool(req.stream_options and req.stream_options.include_usage))
        return response

    async def _stream_chat(self, key: _Key, ids: list[int], include_usage: bool) -> AsyncIterator[str]:
        """A chat answer streamed as it is generated: each piece of text is a chunk the moment the model
        thread produces it; an error after the first chunk ends the stream without a finish reason."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()
        item = _GenItem(ids, 1, on_text=lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text))
        done = asyncio.ensure_future(self.batcher.submit(key, item))
        base = _chunk_base(p.new_id("chatcmpl"), "chat.completion.chunk", p.now(), self.name, include_usage)

        def chunk(delta: dict, finish: str | None = None) -> str:
            return _sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        try:
            yield chunk({"role": "assistant", "content": ""})
            while not done.done() or not pieces.empty():
                getter = asyncio.ensure_future(pieces.get())
                await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield chunk({"content": getter.result()})
                else:
                    getter.cancel()
            try:
                [completion] = done.result()
            except ServingError as e:
                yield _sse(e.body())
                return
            if completion.finish_reason == FINISH_ERROR:
                yield _sse(ServingError(500, f"generation failed: {completion.error}", type="server_error").body())
                return
            yield chunk({}, completion.finish_reason)
            if include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(len(ids), [completion]).model_dump()})
            yield SSE_DONE
        finally:
            if not done.done():  # the client went away: the answer still finishes on the model thread
                done.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def completions(self, req: p.CompletionRequest) -> p.CompletionResponse | AsyncIterator[str]:
        """A text completion of raw prompts (no chat template), or its server-sent events."""
        self.check_model(req.model)
        self._refuse_common(req, _COMPLETION_EXTRAS)
        _refuse(
            req,
            {
                "echo": bool(req.echo),
                "suffix": bool(req.suffix),
                "logprobs": req.logprobs is not None,
                "best_of": req.best_of is not None and req.best_of != req.n,
            },
        )
        prompts = await self._tokenize(self._prompt_ids, req.prompt, self._prompt_budget(req))
        keys = [self._key(req, len(ids), "prompt") for ids in prompts]
        results = await asyncio.gather(*(self._generate(k, ids, req.n) for k, ids in zip(keys, prompts, strict=True)))
        flat = [c for completions in results for c in completions]
        usage = p.Usage(
            prompt_tokens=sum(len(ids) for ids in prompts), completion_tokens=sum(c.completion_tokens for c in flat)
        )
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        response = p.CompletionResponse(
            model=self.name,
            usage=usage,
            choices=[
                p.CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason, stop_reason=c.stop_string)
                for i, c in enumerate(flat)
            ],
        )
        if req.stream:
            return completion_stream(response, bool(req.stream_options and req.stream_options.include_usage))
        return response

    def _prompt_ids(self, prompt: str | list, budget: int | None) -> list[list[int]]:
        """Token ids of each prompt: text is tokenized as is; token arrays are checked. A prompt
        longer than ``budget`` tokens is refused before it is tokenized or checked."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        if all(isinstance(x, int) for x in prompt):
            prompt = [prompt]
        out = []
        for i, item in enumerate(prompt):
            param = f"prompt[{i}]" if len(prompt) > 1 else "prompt"
            if isinstance(item, str):
                ids = self._encode(item, budget, param, add_special_tokens=True)
            else:
                if budget is not None and len(item) > budget:
                    assert self.context_length is not None
                    raise context_too_long(self.context_length, len(item), self.context_length - budget, param)
                ids = list(item)
                bad = [t for t in ids if not 0 <= t < self.vocab_size]
                if bad:
                    raise bad_request(
                        f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})", f"prompt[{i}]"
                    )
            if not ids:
                raise bad_request("prompt must not be empty", param)
            out.append(ids)
        return out

    async def rewards(self, req: p.RewardRequest) -> p.RewardResponse:
        self.check_model(req.model)
        raise bad_request(f"'{self.name}' is not a reward model; /v1/rewards needs a server started with one", "model")


def _split(flat: list[Any], sizes: list[int]) -> list[list[Any]]:
    """``flat`` cut back into consecutive runs of the given sizes (one per request of a batch)."""
    out, at = [], 0
    for size in sizes:
        out.append(flat[at : at + size])
        at += size
    return out


def _usage(prompt_tokens: int, completions: list[Completion]) -> p.Usage:
    completion_tokens = sum(c.completion_tokens for c in completions)
    return p.Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


def _read_usage(scores: list[Score]) -> p.Usage:
    """A reward model's usage: the tokens it read (its input is the prompt; it writes nothing)."""
    read = sum(s.tokens or 0 for s in scores)
    return p.Usage(prompt_tokens=read, total_tokens=read)


def _chunk_base(stream_id: str, kind: str, created: int, model: str, include_usage: bool) -> dict[str, Any]:
    """The fields every chunk of a stream repeats (``usage`` null in each, with ``include_usage``, but the last)."""
    return {
        "id": stream_id,
        "object": kind,
        "created": created,
        "model": model,
        "system_fingerprint": None,
        **({"usage": None} if include_usage else {}),
    }


async def chat_stream(response: p.ChatCompletionResponse, include_usage: bool) -> AsyncIterator[str]:
    """A finished chat completion as OpenAI's chunk stream: per choice a role chunk, a content
    chunk and a finish chunk; then a usage chunk (with ``include_usage``); then ``[DONE]``."""
    base = _chunk_base(response.id, "chat.completion.chunk", response.created, response.model, include_usage)
    for choice in response.choices:
        text = choice.message.content or ""
        for delta, finish in (
            ({"role": "assistant", "content": ""}, None),
            ({"content": text}, None),
            ({}, choice.finish_reason),
        ):
            if delta.get("content") == "" and "role" not in delta:
                continue
            yield _sse(
                {
                    **base,
                    "choices": [
                        {
                            "index": choice.index,
                            "delta": delta,
                            "logprobs": None,
                            "finish_reason": finish,
                            **({"stop_reason": choice.stop_reason} if finish else {}),
                        }
                    ],
                }
            )
    if include_usage:
        yield _sse({**base, "choices": [], "usage": response.usage.model_dump()})
    yield SSE_DONE


async def completion_stream(response: p.CompletionResponse, include_usage: bool) -> AsyncIterator[str]:
    """A finished text completion as OpenAI's chunk stream (same object type as the response)."""
    base = _chunk_base(response.id, "text_completion", response.created, response.model, include_usage)
    for choice in response.choices:
        for text, finish in ((choice.text, None), ("", choice.finish_reason)):
            if text == "" and finish is None:
                continue
            yield _sse(
                {
                    **base,
                    "choices": [
                        {
                            "index": choice.index,
                            "text": text,
                            "logprobs": None,
                            "finish_reason": finish,
                            **({"stop_reason": choice.stop_reason} if finish else {}),
                        }
                    ],
                }
            )
    if include_usage and response.usage is not None:
        yield _sse({**base, "choices": [], "usage": response.usage.model_dump()})
    yield SSE_DONE


# ----------------------------------------------------------------------------- reward models


class RewardServing(_Served):
    """A classifier reward model or PRM: scores conversations, batched like generation."""

    def __init__(
        self,
        model: Any,
        *,
        name: str,
        limits: Limits | None = None,
        max_input_tokens: int | None = None,
        token_chars: TokenChars | None = None,
        **batching: Any,
    ):
        self.model = model
        self.kind = model.kind
        self.name = name
        self.limits = limits or Limits()
        # the most tokens the model takes (None: it truncates longer input itself, or no limit is known)
        self.max_input_tokens = max_input_tokens
        self.token_chars = token_chars
        self.batcher = Batcher(self._run_group, **batching)

    async def aclose(self) -> None:
        await self.batcher.aclose()

    def _run_group(self, key: Hashable, items: list[list[list[dict]]]) -> list[list[Score]]:
        """One ``score_conversations`` call for every conversation of every request in the batch."""
        flat = [conv for convs in items for conv in convs]
        scores = list(self.model.score_conversations(flat))
        if len(scores) != len(flat):
            raise RuntimeError(f"the reward model returned {len(scores)} scores for {len(flat)} conversations")
        return _split(scores, [len(convs) for convs in items])

    async def score(self, conversations: list[list[dict]], param: str = "messages") -> list[Score]:
        """Scores of ``conversations``; one that is surely longer than the model takes is a 400 first
        (``param``, or ``param[i]`` for several), so it cannot fail the batch it would share."""
        from winnow.engines import hf

        if self.max_input_tokens is not None:
            for i, conv in enumerate(conversations):
                # the judged answer is always in the model's input (its whitespace between steps may not be)
                judged = _WHITESPACE.sub("", str(conv[-1].get("content") or "")) if conv else ""
                if hf.certainly_too_long(judged, self.max_input_tokens, self.token_chars):
                    assert self.token_chars is not None
                    where = f"{param}[{i}]" if len(conversations) > 1 else param
                    raise bad_request(
                        f"This model's maximum context length is {self.max_input_tokens} tokens. However, the "
                        f"last message of {where} alone is at least "
                        f"{-(-len(judged) // self.token_chars.of(judged))} "
                        "tokens. Please shorten it.",
                        where,
                        code="context_length_exceeded",
                    )
        return await self.batcher.submit(None, conversations)

    def content(self, score: Score) -> str:
        """The chat answer of a reward model: the score as text (``float(content)`` reads it); a PRM's
        is its step scores as a JSON list."""
        if self.kind == "prm":
            return json.dumps(score.steps if score.steps is not None else [])
        return "" if score.value is None else repr(float(score.value))

    async def chat(self, req: p.ChatCompletionRequest) -> p.ChatCompletionResponse | AsyncIterator[str]:
        """swift's convention: the reward of the conversation (ending with the answer to judge) is
        the message content."""
        self.check_model(req.model)
        _refuse(req, {"chat_template_kwargs": bool(req.chat_template_kwargs)})
        (score,) = await self.score([_messages(req.messages)])
        content = self.content(score)
        response = p.ChatCompletionResponse(
            model=self.name,
            usage=_read_usage([score]),
            choices=[
                p.ChatChoice(index=i, message=p.AssistantMessage(content=content), finish_reason="stop")
                for i in range(req.n)
            ],
        )
        if req.stream:
            return chat_stream(response, bool(req.stream_options and req.stream_options.include_usage))
        return response

    async def completions(self, req: p.CompletionRequest) -> p.CompletionResponse:
        self.check_model(req.model)
        raise bad_request(f"'{self.name}' is a reward model; use /v1/rewards or /v1/chat/completions", "model")

    async def rewards(self, req: p.RewardRequest) -> p.RewardResponse:
        """Scores of each conversation (and per-step scores for a PRM), in order."""
        self.check_model(req.model)
        conversations = [_messages(conv, f"messages[{i}]") for i, conv in enumerate(req.messages)]
        for i, conv in enumerate(conversations):
            if not conv:
                raise bad_request("a conversation must hold at least one message", f"messages[{i}]")
        scores = await self.score(conversations, "messages")
        data = [p.RewardData(index=i, score=s.value, step_scores=s.steps) for i, s in enumerate(scores)]
        return p.RewardResponse(model=self.name, kind=self.kind, data=data, usage=_read_usage(scores))


# ----------------------------------------------------------------------------- loading


def detect_reward_kind(path: str) -> str | None:
    """``classifier`` or ``prm`` for a reward model directory, None for anything else."""
    try:
        from winnow.rewards.models import detect_reward_model
    except ImportError:
        return None
    return detect_reward_model(path)


def load_serving(config: Any) -> PolicyServing | RewardServing:
    """The served model for ``winnow serve`` options: a reward model when the directory holds one,
    else a policy engine."""
    from winnow import hub
    from winnow.engines import get_engine, hf

    hub.configure(config.use_hf, config.hub_token)
    path = hf.resolve_model_path(config.model, revision=config.model_revision)
    name = config.served_model_name or Path(str(config.model).rstrip("/")).name
    batching = dict(
        max_batch_size=config.max_batch_size,
        max_wait_ms=config.max_wait_ms,
        max_queue=config.max_queue,
        dynamic_batching=config.dynamic_batching,
    )
    limits = Limits.from_config(config)
    kind = detect_reward_kind(path)
    if kind is not None:
        from winnow.rewards.models import load_reward_model, read_model_config

        kwargs = {
            "torch_dtype": config.torch_dtype,
            "device": config.device,
            "template": config.template,
            **config.engine_kwargs,
        }
        model = load_reward_model(path, **kwargs)
        # a model that truncates (max_length) takes any length; else its positions are the limit
        limit = None if kwargs.get("max_length") else read_model_config(path).get("max_position_embeddings")
        return RewardServing(
            model,
            name=name,
            limits=limits,
            max_input_tokens=limit,
            token_chars=hf.longest_token_chars(hf.load_tokenizer(path)),
            **batching,
        )
    kwargs = {
        "torch_dtype": config.torch_dtype,
        "device": config.device,
        "template": config.template,
        "seed": config.seed,
        **config.engine_kwargs,
    }
    engine = get_engine(config.engine, path, **kwargs)
    return PolicyServing(
        engine, name=name, default_max_tokens=getattr(config, "max_new_tokens", None), limits=limits, **batching
    )
