"""From a scored group to output records: which samples are kept, and the record formats.

Each output format is one function of a group. Selection never invents data: the dataset's
reference answer is not a candidate unless asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from winnow.schema import Completion, Group


@dataclass
class SelectOptions:
    """The selection settings of a run (a view of SampleConfig)."""

    output_format: str = "swift"
    reasoning_format: str = "separate"
    n_best_to_keep: int | None = None
    scored: bool = False


def assistant_content(c: Completion, reasoning_format: str) -> str:
    """The assistant turn for a completion: with its reasoning in ``<think>`` tags when asked."""
    if c.reasoning and reasoning_format == "think_answer":
        return f"<think>{c.reasoning}</think>\n\n<answer>{c.text}</answer>"
    return c.text


def conversation(group: Group, c: Completion, opts: SelectOptions) -> list[dict[str, Any]]:
    """The prompt's conversation with ``c`` as the last assistant turn."""
    return [*group.prompt.messages, {"role": "assistant", "content": assistant_content(c, opts.reasoning_format)}]


def _extra(group: Group, c: Completion, opts: SelectOptions) -> dict[str, Any]:
    out = dict(group.prompt.columns)
    if c.reasoning and opts.reasoning_format == "separate":
        out["reasoning"] = c.reasoning
    return out


def swift_records(group: Group, kept: list[Completion], opts: SelectOptions) -> list[dict[str, Any]]:
    """swift sample's record: the full conversation and the row id (one line per kept sample)."""
    return [{"messages": conversation(group, c, opts), "id": group.prompt.id, **_extra(group, c, opts)}
            for c in kept]


def raw_record(group: Group, opts: SelectOptions) -> dict[str, Any]:
    """One line per prompt with every sample, its finish reason, tokens and scores."""
    return {
        "id": group.prompt.id,
        "messages": group.prompt.messages,
        **({"reference": group.prompt.reference} if group.prompt.reference is not None else {}),
        "completions": [c.to_dict() for c in group.completions],
        **group.prompt.columns,
    }


def select(group: Group, opts: SelectOptions) -> tuple[list[dict[str, Any]], str | None]:
    """The records a group yields, and why it yields none (None when it yields some)."""
    kept = group.ok
    if not kept:
        errors = {c.error for c in group.completions if c.error}
        return [], "every sample failed: " + "; ".join(sorted(errors))[:500]
    if opts.output_format == "raw":
        return [raw_record(group, opts)], None
    if opts.output_format == "sft":
        return [{"messages": r["messages"], **{k: v for k, v in r.items() if k not in ("messages",)}}
                for r in swift_records(group, kept, opts)], None
    return swift_records(group, kept, opts), None
