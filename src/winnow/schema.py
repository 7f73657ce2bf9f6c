"""The data contract: what flows between data loading, engines, rewards, selection and the store.

One prompt and its completions travel together as a :class:`Group`; each :class:`Completion`
carries its own scores, so nothing downstream keeps parallel lists in sync by index.
This module imports nothing of winnow and nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ERROR = "error"
FINISH_CONTENT_FILTER = "content_filter"


@dataclass
class Prompt:
    """One dataset row, ready to be sampled.

    ``messages`` is the conversation up to (not including) the turn to generate. ``response`` is
    the dataset's own last assistant turn, if it had one; ``reference`` is the answer rewards check
    against (a math ``answer``/``solution`` field, else ``response``).
    """

    id: str
    messages: list[Message]
    response: str | None = None
    reference: str | None = None
    columns: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # "file:line" of the row, for error messages
    position: int = 0  # position in this run's row order; the resume index is keyed on it
    dataset: str = ""  # the --dataset name the row came from, as typed (swift's records carry it)
    swift_id: str = ""  # ms-swift's id of the row (the md5 of its preprocessed form), for its cache files
    # a chat row (TRL passes its prompts and completions as message lists) or a plain-text prompt/completion row
    conversational: bool = True
    tools: list[dict[str, Any]] | None = None  # the functions the model may call (OpenAI's tools shape)
    # the answer so far, which the engine continues (search strategies ask for a next step this way);
    # the completions an engine returns hold only the continuation
    prefix: str | None = None


@dataclass
class Score:
    """What one reward said about one completion. ``value`` None means "cannot judge"."""

    value: float | None
    steps: list[float] | None = None
    info: dict[str, Any] | None = None
    tokens: int | None = None  # the tokens a reward model read to judge (the server's usage; not in records)


@dataclass
class Completion:
    """One sampled answer to a prompt, with the scores rewards gave it."""

    text: str
    finish_reason: str = FINISH_STOP
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning: str | None = None
    error: str | None = None
    scores: dict[str, Score] = field(default_factory=dict)
    # The combined score used for ranking (weighted reward sum); None when not scored.
    reward: float | None = None
    # the answer's token ids, when the engine has them (TRL rewards get them as completion_ids); not written
    token_ids: list[int] | None = None
    # the functions the answer calls, in OpenAI's shape ({"id", "type": "function", "function": {...}})
    tool_calls: list[dict[str, Any]] | None = None
    # a multi-turn trajectory: every message after the prompt (assistant turns, tool results, observations);
    # the last assistant turn is also ``text``
    turns: list[Message] | None = None
    # how a search strategy reached this answer (its steps and their scores), written in raw output
    trace: dict[str, Any] | None = None
    # the stop string the engine stopped at (cut from ``text``); None when the answer ended otherwise (EOS,
    # the token limit) or the server did not say. Search strategies tell a step (it ended at the step
    # separator) from a whole answer with it. Not written.
    stop_string: str | None = None

    @property
    def failed(self) -> bool:
        """Not usable: an error, or an answer its engine flagged (``error`` set: truncated, filtered)."""
        return self.finish_reason == FINISH_ERROR or self.error is not None

    def to_dict(self) -> dict[str, Any]:
        """The completion as a plain JSON-able dict (the stage-1 cache and raw formats use it)."""
        out: dict[str, Any] = {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }
        if self.reasoning is not None:
            out["reasoning"] = self.reasoning
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.turns is not None:
            out["turns"] = self.turns
        if self.trace is not None:
            out["trace"] = self.trace
        if self.error is not None:
            out["error"] = self.error
        if self.scores:
            out["scores"] = {
                name: {
                    "value": s.value,
                    **({"steps": s.steps} if s.steps is not None else {}),
                    **({"info": s.info} if s.info else {}),
                }
                for name, s in self.scores.items()
            }
        if self.reward is not None:
            out["reward"] = self.reward
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Completion:
        scores = {
            name: Score(value=s.get("value"), steps=s.get("steps")) for name, s in (d.get("scores") or {}).items()
        }
        return cls(
            text=d.get("text", ""),
            finish_reason=d.get("finish_reason", FINISH_STOP),
            prompt_tokens=int(d.get("prompt_tokens") or 0),
            completion_tokens=int(d.get("completion_tokens") or 0),
            reasoning=d.get("reasoning"),
            error=d.get("error"),
            tool_calls=d.get("tool_calls"),
            turns=d.get("turns"),
            trace=d.get("trace"),
            scores=scores,
            reward=d.get("reward"),
        )


@dataclass
class Group:
    """A prompt and its completions: the unit every stage after generation works on."""

    prompt: Prompt
    completions: list[Completion]
    # what a search strategy spent on the whole group (generated and prompt tokens of every branch, engine
    # calls, PRM evaluations), beside the completions' own counts; written in raw output and summed in the run
    compute: dict[str, int] | None = None
    # the search behind the group (its tree or beams, with step scores), written in raw output
    trace: dict[str, Any] | None = None

    @property
    def ok(self) -> list[Completion]:
        """The completions that did not fail."""
        return [c for c in self.completions if not c.failed]


@dataclass
class SamplingParams:
    """Sampling settings one engine call uses; the same for every prompt of the call.

    ``None`` means "not set": local engines use the rest of the context for ``max_new_tokens`` and
    their defaults (1.0, 1.0, off, 1.0, off) for the others; the client engine does not send them, so
    the server's defaults apply. A run fills them from the model's generation_config.json first.
    """

    n: int = 1
    max_new_tokens: int | None = 64
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = None
    repetition_penalty: float | None = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    min_p: float | None = None
    num_beams: int = 1
    # structured output in OpenAI's shape ({"type": "json_schema", "json_schema": {...}}); see winnow.structured
    response_format: dict[str, Any] | None = None


@dataclass
class BadRow:
    """A dataset row that cannot be sampled, with where it came from and why."""

    source: str
    reason: str
    id: str | None = None
    position: int = 0
