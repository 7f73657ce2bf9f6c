"""Wire models of the server: OpenAI's request and response shapes, plus winnow's ``/v1/rewards``.

Requests accept (and ignore) fields this server has no use for, as OpenAI-compatible servers do;
fields that would change the answer but are not supported are refused by ``serving.py`` with a
400 that names them. Responses carry exactly OpenAI's fields, so the official SDK parses them.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt

# a lone UTF-16 surrogate: JSON can spell one ("\ud800"), UTF-8 cannot encode it
_SURROGATE = re.compile(r"[\ud800-\udfff]")
SURROGATE_MESSAGE = r"holds a lone UTF-16 surrogate (an unpaired \ud800-\udfff escape); send valid Unicode text"


def _valid_text(value: str) -> str:
    if _SURROGATE.search(value):
        raise ValueError(SURROGATE_MESSAGE)
    return value


def _valid_json_text(value: Any) -> Any:
    """``value`` when every string in it (dict keys too) is valid Unicode."""
    todo = [value]
    while todo:  # a loop, not recursion: the nesting depth is the client's choice
        item = todo.pop()
        if isinstance(item, str):
            _valid_text(item)
        elif isinstance(item, dict):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return value


# text that reaches the tokenizer or an answer: it must encode to UTF-8
Text = Annotated[str, AfterValidator(_valid_text)]
# torch.manual_seed takes any 64-bit value, signed or not
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def new_id(prefix: str) -> str:
    """An OpenAI-style object id (``chatcmpl-...``, ``cmpl-...``)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


# ----------------------------------------------------------------------------- errors


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorInfo


# ----------------------------------------------------------------------------- models


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "winnow"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----------------------------------------------------------------------------- shared pieces


class StreamOptions(_Request):
    include_usage: bool = False


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class _SamplingFields(_Request):
    """The sampling fields chat and completions requests share (``top_k`` and
    ``repetition_penalty`` are the usual extensions, sent with the SDK's ``extra_body``)."""

    model: Text | None = None
    n: int = Field(1, ge=1, le=256)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # far outside this, the penalised logits overflow and sampling fails (seen with 1e-308)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None


# ----------------------------------------------------------------------------- chat


class ContentPart(_Request):
    type: str
    text: Text | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    # template variables, e.g. {"enable_thinking": false} for Qwen3 (vLLM's name for the field)
    chat_template_kwargs: Annotated[dict[str, Any], AfterValidator(_valid_json_text)] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None
    # vLLM's field: the stop string the answer stopped at (trimmed from it), None when it ended otherwise
    stop_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# ----------------------------------------------------------------------------- completions


class CompletionRequest(_SamplingFields):
    # tried in order, strictly: a long token list is read once as ints (never tried as strings,
    # which would put one error per element in memory), and "123" stays text
    prompt: Text | list[StrictInt] | list[Text] | list[list[StrictInt]] = Field(union_mode="left_to_right")
    echo: bool | None = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None
    stop_reason: str | None = None  # as in ChatChoice


class CompletionResponse(BaseModel):
    """Also the shape of each streamed completions chunk (OpenAI uses one object type for both)."""

    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# ----------------------------------------------------------------------------- rewards (winnow's own)


class RewardRequest(_Request):
    """``POST /v1/rewards``: score whole conversations (each ends with the assistant turn to judge)."""

    model: Text | None = None
    messages: list[list[ChatMessage]] = Field(min_length=1)


class RewardData(BaseModel):
    index: int
    score: float | None
    step_scores: list[float] | None = None


class RewardResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("rwd"))
    object: Literal["list"] = "list"
    created: int = Field(default_factory=now)
    model: str
    kind: str
    data: list[RewardData]
    usage: Usage = Field(default_factory=Usage)
