"""From a scored group to output records: which samples are kept, the chosen/rejected pairs, and the formats.

Each output format is one function of a group. Selection never invents data: the dataset's
reference answer is not a candidate unless asked for (``include_reference``); a rejected response
scores strictly below its chosen one (by at least ``min_margin``) and, when an ORM is set, fails
it. Ties are broken by sample order; a text is never emitted twice as a kept sample.

An ORM *passes* a sample when its score is > 0 (1/0 rewards such as ``math``; a classifier's logit
sign); a score of None (cannot judge) neither passes nor fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from winnow.schema import Completion, Group

FINISH_REFERENCE = "reference"


@dataclass
class SelectOptions:
    """The selection settings of a run (a view of SampleConfig)."""

    output_format: str = "swift"
    reasoning_format: str = "separate"
    n_best_to_keep: int | None = None
    scored: bool = False
    orm_key: str | None = None
    prm_key: str | None = None
    prm_threshold: float | None = None
    easy_query_threshold: float | None = None
    hard_query_threshold: float | None = None
    num_rejected: int = 1
    min_margin: float = 0.0
    include_reference: bool = False
    keep_unpaired: bool = False


def with_reference(group: Group) -> Group:
    """The group with the dataset's own answer added as a candidate (``--include_reference``)."""
    if group.prompt.response is not None and not any(c.finish_reason == FINISH_REFERENCE for c in group.completions):
        group.completions.append(Completion(text=group.prompt.response, finish_reason=FINISH_REFERENCE))
    return group


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


# ----------------------------------------------------------------------------- choosing

@dataclass
class Candidate:
    """A sample in the running: its place in the group (the tie break) and its verdicts."""

    index: int
    completion: Completion
    orm: float | None
    prm: float | None

    @property
    def reward(self) -> float | None:
        return self.completion.reward

    @property
    def key(self) -> str:
        return self.completion.text.strip()


@dataclass
class Choice:
    """What selection made of a group: kept samples with their rejected partners, or why nothing."""

    kept: list[tuple[Candidate, list[Candidate]]]
    reason: str | None = None


def _candidates(group: Group, opts: SelectOptions) -> list[Candidate]:
    out = []
    for i, c in enumerate(group.completions):
        if c.failed or (c.finish_reason == FINISH_REFERENCE and not opts.include_reference):
            continue
        orm = c.scores[opts.orm_key].value if opts.orm_key and opts.orm_key in c.scores else None
        prm = c.scores[opts.prm_key].value if opts.prm_key and opts.prm_key in c.scores else None
        out.append(Candidate(i, c, orm, prm))
    return out


def pass_rate(group: Group, opts: SelectOptions) -> float | None:
    """The share of judged samples (the reference excluded) that pass the ORM; None if none was judged."""
    judged = [c.orm for c in _candidates(group, opts)
              if c.orm is not None and c.completion.finish_reason != FINISH_REFERENCE]
    return sum(1 for v in judged if v > 0) / len(judged) if judged else None


def difficulty_filter(group: Group, opts: SelectOptions) -> str | None:
    """Why a prompt is too easy or too hard for the run (None when it is neither)."""
    if opts.orm_key is None or (opts.easy_query_threshold is None and opts.hard_query_threshold is None):
        return None
    rate = pass_rate(group, opts)
    if rate is None:
        return "ORM could not judge: no sample has an ORM verdict"
    if opts.easy_query_threshold is not None and rate > opts.easy_query_threshold:
        return f"easy: ORM pass rate {rate:.2f} > {opts.easy_query_threshold}"
    if opts.hard_query_threshold is not None and rate < opts.hard_query_threshold:
        return f"hard: ORM pass rate {rate:.2f} < {opts.hard_query_threshold}"
    return None


def choose(group: Group, opts: SelectOptions) -> Choice:
    """The kept samples (best first) and, for each, up to ``num_rejected`` rejected partners."""
    cands = _candidates(group, opts)
    scored = [c for c in cands if c.reward is not None]
    if not scored:
        return Choice([], "no sample could be scored")
    order = sorted(scored, key=lambda c: (-c.reward, c.index))
    eligible = order
    if opts.orm_key is not None:
        eligible = [c for c in eligible if c.orm is not None and c.orm > 0]
        if not eligible:
            if all(c.orm is None for c in scored):
                return Choice([], "ORM could not judge: no sample has an ORM verdict")
            return Choice([], "all samples failed the ORM")
    if opts.prm_threshold is not None:
        eligible = [c for c in eligible if c.prm is not None and c.prm > opts.prm_threshold]
        if not eligible:
            return Choice([], f"prm threshold: no sample scores above {opts.prm_threshold}")
    kept: list[Candidate] = []
    seen: set[str] = set()
    limit = opts.n_best_to_keep if opts.n_best_to_keep is not None else len(eligible)
    for c in eligible:
        if len(kept) >= limit:
            break
        if c.key in seen:
            continue
        seen.add(c.key)
        kept.append(c)
    losers = sorted(scored, key=lambda c: (c.reward, c.index))  # worst first, as swift pairs them
    if opts.orm_key is not None:
        losers = [c for c in losers if c.orm is not None and c.orm <= 0]
    pairs = []
    for chosen in kept:
        rejected: list[Candidate] = []
        taken = {chosen.key}
        for c in losers:
            if len(rejected) >= max(0, opts.num_rejected):
                break
            gap = chosen.reward - c.reward
            if gap > 0 and gap >= opts.min_margin and c.key not in taken:
                taken.add(c.key)
                rejected.append(c)
        pairs.append((chosen, rejected))
    return Choice(pairs)


# ----------------------------------------------------------------------------- formats

def swift_records(group: Group, kept: list[Completion], opts: SelectOptions) -> list[dict[str, Any]]:
    """swift sample's record: the full conversation and the row id (one line per kept sample)."""
    return [{**_extra(group, c, opts), "messages": conversation(group, c, opts), "id": group.prompt.id}
            for c in kept]


def swift_pair_records(group: Group, choice: Choice, opts: SelectOptions) -> list[dict[str, Any]]:
    """swift sample's scored record: one line per (kept, rejected) pair, ``rejected_response`` added;
    unpaired kept samples become lines without it only with ``keep_unpaired``."""
    out = []
    for chosen, rejected in choice.kept:
        base = {**_extra(group, chosen.completion, opts), "messages": conversation(group, chosen.completion, opts),
                "id": group.prompt.id}
        if rejected:
            out += [{**base, "rejected_response": assistant_content(r.completion, opts.reasoning_format)}
                    for r in rejected]
        elif opts.keep_unpaired:
            out.append(base)
    return out


def dpo_records(group: Group, choice: Choice, opts: SelectOptions) -> list[dict[str, Any]]:
    """TRL's conversational preference format: ``prompt`` messages, ``chosen``/``rejected`` assistant turns."""
    out = []
    def turn(c: Candidate) -> list[dict[str, Any]]:
        return [{"role": "assistant", "content": assistant_content(c.completion, opts.reasoning_format)}]

    for chosen, rejected in choice.kept:
        for r in rejected:
            out.append({
                **group.prompt.columns,
                "prompt": group.prompt.messages,
                "chosen": turn(chosen),
                "rejected": turn(r),
                "id": group.prompt.id,
                "score_chosen": chosen.reward,
                "score_rejected": r.reward,
            })
    return out


def raw_record(group: Group, opts: SelectOptions) -> dict[str, Any]:
    """One line per prompt with every sample, its finish reason, tokens and scores."""
    return {
        **group.prompt.columns,
        "id": group.prompt.id,
        "messages": group.prompt.messages,
        **({"reference": group.prompt.reference} if group.prompt.reference is not None else {}),
        "completions": [c.to_dict() for c in group.completions],
    }


def grpo_record(group: Group, opts: SelectOptions) -> dict[str, Any]:
    """The raw record plus the group's reward mean and std and each sample's advantage (r - mean) / (std + 1e-4)."""
    record = raw_record(group, opts)
    rewards = [c.reward for c in group.completions if not c.failed and c.reward is not None]
    mean = sum(rewards) / len(rewards) if rewards else None
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1)) if len(rewards) > 1 else 0.0
    for out, c in zip(record["completions"], group.completions, strict=True):
        out["advantage"] = None if c.failed or c.reward is None or mean is None else (c.reward - mean) / (std + 1e-4)
    record.update(reward_mean=mean, reward_std=std if rewards else None)
    return record


def select(group: Group, opts: SelectOptions) -> tuple[list[dict[str, Any]], str | None]:
    """The records a group yields, and why it yields none (None when it yields some)."""
    ok = [c for c in group.ok if c.finish_reason != FINISH_REFERENCE]
    if not ok:
        if not group.completions:
            return [], "no samples: the row is not in the cache files"
        errors = {c.error for c in group.completions if c.error}
        return [], "every sample failed: " + "; ".join(sorted(errors))[:500]
    if opts.output_format in ("raw", "grpo"):
        reason = difficulty_filter(group, opts) if opts.scored else None
        if reason:
            return [], reason
        return [raw_record(group, opts) if opts.output_format == "raw" else grpo_record(group, opts)], None
    if not opts.scored:
        if opts.output_format == "dpo":
            return [], "no pair: the dpo format needs rewards (--orm_model/--prm_model/--reward_funcs)"
        return swift_records(group, ok, opts), None  # stage 1: every sample, for a later scoring pass
    reason = difficulty_filter(group, opts)
    if reason:
        return [], reason
    choice = choose(group, opts)
    if choice.reason:
        return [], choice.reason
    if opts.output_format == "sft":
        return [{**_extra(group, c.completion, opts), "messages": conversation(group, c.completion, opts),
                 "id": group.prompt.id} for c, _ in choice.kept], None
    records = dpo_records(group, choice, opts) if opts.output_format == "dpo" else \
        swift_pair_records(group, choice, opts)
    if not records:
        return [], "no pair: no sample scores strictly below a kept one" + \
            (" and fails the ORM" if opts.orm_key else "")
    return records, None
