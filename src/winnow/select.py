"""From a scored group to output records: which samples are kept, the chosen/rejected pairs, and the formats.

Each output format is one function of a group. Two selection modes:

- ``winnow`` (default): swift's records, with swift's bugs fixed (docs/rewards.md lists each
  difference). Selection never invents data: the dataset's reference answer is not a candidate
  unless asked for (``include_reference``). Kept: the best ``n_best_to_keep`` distinct texts that
  pass the ORM and the PRM threshold. A rejected response is a different text scoring strictly
  below its chosen one (by at least ``min_margin``), an ORM failure when there is one, else the
  lowest scorer below; a kept sample with none is written without ``rejected_response`` (counted),
  or dropped with ``keep_unpaired=False``.
- ``swift``: ms-swift 4.6's algorithm, reproduced line for line (:func:`swift_records`).

An ORM *passes* a sample when its score is > 0 (1/0 rewards such as ``math``; a classifier's logit
sign); a score of None (cannot judge) neither passes nor fails. What selection did beyond the
records (lines without a rejected response, duplicate texts not kept...) is counted in
:attr:`Selection.notes`, which the run summary adds up.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any, cast

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
    prm_threshold: float | None = None  # applies to the PRM's score only, when there is a PRM (as in swift)
    easy_query_threshold: float | None = None
    hard_query_threshold: float | None = None
    num_rejected: int = 1
    min_margin: float = 0.0
    include_reference: bool = False
    keep_unpaired: bool = True
    selection: str = "winnow"  # or "swift": ms-swift 4.6's selection, line for line
    num_return_sequences: int = 1  # N, for swift's easy-query formula

    @classmethod
    def from_config(cls, config: Any, scorer: Any = None) -> SelectOptions:
        """A run's selection settings: the options of the same names, and what the scorer knows."""
        shared = {f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)}
        n = config.num_return_sequences
        return cls(
            **{
                **shared,
                "n_best_to_keep": min(5, n) if config.n_best_to_keep is None else config.n_best_to_keep,
                "scored": scorer is not None,
                "orm_key": getattr(scorer, "orm_key", None),
                "prm_key": getattr(scorer, "prm_key", None),
            }
        )


@dataclass
class Selection:
    """The records a group yields, why it yields none, and what selection did along the way."""

    records: list[dict[str, Any]]
    reason: str | None = None
    notes: Counter = field(default_factory=Counter)


def with_reference(group: Group) -> Group:
    """The group with the dataset's own answer added as a candidate (``--include_reference``)."""
    if group.prompt.response is not None and not any(c.finish_reason == FINISH_REFERENCE for c in group.completions):
        group.completions.append(Completion(text=group.prompt.response, finish_reason=FINISH_REFERENCE))
    return group


def assistant_content(c: Completion, reasoning_format: str) -> str | None:
    """The assistant turn's text for a completion: with its reasoning in ``<think>`` tags when asked
    (``None`` for a turn that is only tool calls, as OpenAI writes it)."""
    if c.reasoning and reasoning_format == "think_answer":
        return f"<think>{c.reasoning}</think>\n\n<answer>{c.text}</answer>"
    if c.reasoning and reasoning_format == "think":
        return f"<think>\n{c.reasoning}\n</think>\n\n{c.text}"
    if not c.text and c.tool_calls:
        return None
    return c.text


def assistant_message(c: Completion, opts: SelectOptions) -> dict[str, Any]:
    """The assistant message of a completion: its text, its tool calls, and its reasoning as
    ``reasoning_content`` (what chat templates read) with ``--reasoning_format message``."""
    message: dict[str, Any] = {"role": "assistant", "content": assistant_content(c, opts.reasoning_format)}
    if c.reasoning and opts.reasoning_format == "message":
        message["reasoning_content"] = c.reasoning
    if c.tool_calls:
        message["tool_calls"] = c.tool_calls
    return message


def response_messages(c: Completion, opts: SelectOptions) -> list[dict[str, Any]]:
    """What ``c`` adds after the prompt: its assistant turn, or every turn of a multi-turn trajectory (assistant
    turns with their tool calls, tool results, observations), the last one written by :func:`assistant_message`."""
    if c.turns:
        return [*c.turns[:-1], assistant_message(c, opts)]
    return [assistant_message(c, opts)]


def conversation(group: Group, c: Completion, opts: SelectOptions) -> list[dict[str, Any]]:
    """The prompt's conversation with ``c`` as the last assistant turn (every turn of a trajectory)."""
    return [*group.prompt.messages, *response_messages(c, opts)]


def _extra(group: Group, c: Completion, opts: SelectOptions) -> dict[str, Any]:
    out = dict(group.prompt.columns)
    if group.prompt.tools is not None:
        out["tools"] = group.prompt.tools
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

    @cached_property  # read for every dedupe and pairing test; a trajectory's is a JSON dump
    def key(self) -> str:
        """What makes two samples the same: the answer's text, or a trajectory's every turn."""
        if self.completion.turns:
            return json.dumps(self.completion.turns, sort_keys=True, ensure_ascii=False, default=str)
        return self.completion.text.strip()


@dataclass
class Choice:
    """What selection made of a group: kept samples with their rejected partners, or why nothing."""

    kept: list[tuple[Candidate, list[Candidate]]]
    reason: str | None = None
    notes: Counter = field(default_factory=Counter)


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
    judged = [
        c.orm for c in _candidates(group, opts) if c.orm is not None and c.completion.finish_reason != FINISH_REFERENCE
    ]
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


def choose(group: Group, opts: SelectOptions, notes: Counter | None = None) -> Choice:
    """The kept samples (best first) and, for each, up to ``num_rejected`` rejected partners."""
    notes = Counter() if notes is None else notes
    cands = _candidates(group, opts)
    scored = [c for c in cands if c.reward is not None]
    if not scored:
        return Choice([], "no sample could be scored")
    # cast: every candidate in `scored` has a reward
    order = sorted(scored, key=lambda c: (-cast(float, c.reward), c.index))
    eligible = order
    if opts.orm_key is not None:
        eligible = [c for c in eligible if c.orm is not None and c.orm > 0]
        if not eligible:
            if all(c.orm is None for c in scored):
                return Choice([], "ORM could not judge: no sample has an ORM verdict")
            return Choice([], "all samples failed the ORM")
    if opts.prm_key is not None and opts.prm_threshold is not None:
        eligible = [c for c in eligible if c.prm is not None and c.prm > opts.prm_threshold]
        if not eligible:
            return Choice([], f"prm threshold: no sample's PRM score is above {opts.prm_threshold:g}")
    kept: list[Candidate] = []
    seen: set[str] = set()
    limit = opts.n_best_to_keep if opts.n_best_to_keep is not None else len(eligible)
    for c in eligible:
        if len(kept) >= limit:
            break
        if c.key in seen:
            notes["duplicate texts not kept"] += 1
            continue
        seen.add(c.key)
        kept.append(c)
    worst_first = sorted(scored, key=lambda c: (c.reward, c.index))
    if opts.orm_key is not None:  # ORM failures first, then the lowest scorers (passed or not judged)
        worst_first = sorted(worst_first, key=lambda c: not (c.orm is not None and c.orm <= 0))  # stable
    pairs = []
    for chosen in kept:
        rejected: list[Candidate] = []
        taken = {chosen.key}
        for c in worst_first:
            if len(rejected) >= max(0, opts.num_rejected):
                break
            gap = cast(float, chosen.reward) - cast(float, c.reward)
            if gap > 0 and gap >= opts.min_margin and c.key not in taken:
                taken.add(c.key)
                rejected.append(c)
        if rejected and opts.orm_key is not None and all(r.orm is not None and r.orm > 0 for r in rejected):
            notes["rejected responses that pass the ORM"] += len(rejected)
        pairs.append((chosen, rejected))
    return Choice(pairs)


def swift_records(group: Group, opts: SelectOptions) -> Selection:
    """ms-swift 4.6's scored selection (``VanillaSampler.do_sample``), reproduced line for line.

    The dataset's answer is a candidate after the samples; ORM and PRM scores (None counted as 0)
    are masked at ``> 0`` and ``> prm_threshold``, min-max normalised over the candidates, and
    combined as ``prm + 10 * orm``; the top ``n_best_to_keep`` by ``numpy.argsort`` (reversed) that
    pass the masks are kept, each paired with the single lowest candidate, which may pass the ORM,
    may be the dataset's answer, and may be the same text. A prompt is dropped as easy when
    ``count(normalised ORM > 0) - 1 >= int(N * easy_query_threshold)``. Records are swift's: the
    preprocessed row (``messages``, ``dataset``), ``rejected_response`` and swift's md5 ``id``.
    """
    import numpy as np

    prompt = group.prompt
    if prompt.response is None:
        return Selection([], "no dataset answer: swift's selection needs the row's own answer")
    texts = [c.text for c in group.completions if not c.failed and c.finish_reason != FINISH_REFERENCE]
    if not texts:
        return Selection([], "every sample failed")
    reference = next((c for c in group.completions if c.finish_reason == FINISH_REFERENCE), None)
    candidates = [c for c in group.completions if not c.failed and c.finish_reason != FINISH_REFERENCE]
    candidates.append(
        reference if reference is not None else Completion(text=prompt.response, finish_reason=FINISH_REFERENCE)
    )
    texts.append(prompt.response)

    def raw(key: str | None, threshold: float) -> tuple[Any, Any]:
        if key is None:
            return np.array([1.0] * len(candidates)), np.array([True] * len(candidates))
        values = np.array(
            [float(v) if key in c.scores and (v := c.scores[key].value) is not None else 0.0 for c in candidates]
        )
        return _swift_normalize(values), np.array([v > threshold for v in values])

    orm, orm_mask = raw(opts.orm_key, 0.0)
    prm, prm_mask = raw(opts.prm_key, opts.prm_threshold if opts.prm_threshold is not None else 0.0)
    mask = orm_mask & prm_mask
    if not any(mask):
        return Selection([], "swift: no candidate passes the ORM and the PRM threshold")
    score = np.array(prm) + np.array(orm * 10)
    order = np.argsort(score)[::-1]
    negative = order[-1]
    positives = [int(i) for i in order[0 : opts.n_best_to_keep or 5] if mask[i] and i != negative]
    if opts.easy_query_threshold is not None and sum([v > 0 for v in orm]) - 1 >= int(
        opts.num_return_sequences * opts.easy_query_threshold
    ):
        return Selection([], "easy: swift's formula count(ORM > 0) - 1 >= int(N * easy_query_threshold)")
    if not positives:
        return Selection([], "swift: no kept candidate besides the lowest one")
    notes: Counter = Counter()
    out = []
    for i in positives:
        if candidates[i].finish_reason == FINISH_REFERENCE:
            notes["dataset answers written as chosen (swift)"] += 1
        out.append(
            {
                "messages": [*prompt.messages, {"role": "assistant", "content": str(texts[i])}],
                "dataset": prompt.dataset,
                "rejected_response": str(texts[negative]),
                "id": prompt.swift_id,
            }
        )
    return Selection(out, None, notes)


def _swift_normalize(arr):
    """ms-swift's ``normalize_rewards``: min-max over a prompt's candidates, a constant when all are equal."""
    import numpy as np

    min_val, max_val = np.min(arr), np.max(arr)
    if min_val == max_val:
        constant = 0.0 if min_val == 0 else min(1.0, min_val)
        return np.full_like(arr, fill_value=constant, dtype=np.float64)
    return (arr - min_val) / (max_val - min_val + 1e-5)


# ----------------------------------------------------------------------------- formats


def swift_records_unscored(group: Group, kept: list[Completion], opts: SelectOptions) -> list[dict[str, Any]]:
    """swift sample's record: the full conversation and the row id (one line per sample); in swift mode,
    swift's exact line (the preprocessed row and its md5 id, other columns dropped)."""
    if opts.selection == "swift":
        return [
            {"messages": conversation(group, c, opts), "dataset": group.prompt.dataset, "id": group.prompt.swift_id}
            for c in kept
        ]
    return [{**_extra(group, c, opts), "messages": conversation(group, c, opts), "id": group.prompt.id} for c in kept]


def swift_pair_records(group: Group, choice: Choice, opts: SelectOptions) -> list[dict[str, Any]]:
    """swift sample's scored record: one line per (kept, rejected) pair, ``rejected_response`` added;
    unpaired kept samples become lines without it only with ``keep_unpaired``."""
    out = []
    for chosen, rejected in choice.kept:
        base = {
            **_extra(group, chosen.completion, opts),
            "messages": conversation(group, chosen.completion, opts),
            "id": group.prompt.id,
        }
        if rejected:
            out += [{**base, **_rejected(group, r.completion, opts)} for r in rejected]
        elif opts.keep_unpaired:
            out.append(base)
    return out


def _rejected(group: Group, c: Completion, opts: SelectOptions) -> dict[str, Any]:
    """The rejected side of a swift record: ``rejected_response`` (the answer's text), or for a trajectory
    ``rejected_messages``, its whole conversation (what ms-swift 4.6 reads for multi-turn preference pairs)."""
    if c.turns:
        return {"rejected_messages": conversation(group, c, opts)}
    return {"rejected_response": assistant_content(c, opts.reasoning_format)}


def _unpaired(choice: Choice) -> int:
    return sum(1 for _, rejected in choice.kept if not rejected)


def dpo_records(group: Group, choice: Choice, opts: SelectOptions) -> list[dict[str, Any]]:
    """TRL's conversational preference format: ``prompt`` messages, ``chosen``/``rejected`` assistant turns."""
    out = []

    def turn(c: Candidate) -> list[dict[str, Any]]:
        return response_messages(c.completion, opts)

    for chosen, rejected in choice.kept:
        for r in rejected:
            out.append(
                {
                    **_extra(group, chosen.completion, opts),
                    "prompt": group.prompt.messages,
                    "chosen": turn(chosen),
                    "rejected": turn(r),
                    "id": group.prompt.id,
                    "score_chosen": chosen.reward,
                    "score_rejected": r.reward,
                }
            )
    return out


def raw_record(group: Group, opts: SelectOptions) -> dict[str, Any]:
    """One line per prompt with every sample, its finish reason, tokens and scores."""
    return {
        **group.prompt.columns,
        "id": group.prompt.id,
        "messages": group.prompt.messages,
        **({"tools": group.prompt.tools} if group.prompt.tools is not None else {}),
        **({"reference": group.prompt.reference} if group.prompt.reference is not None else {}),
        "completions": [c.to_dict() for c in group.completions],
        **({"compute": group.compute} if group.compute is not None else {}),
        **({"search": group.trace} if group.trace is not None else {}),
    }


def grpo_record(group: Group, opts: SelectOptions) -> dict[str, Any]:
    """A prompt a GRPO trainer loads directly: ``prompt`` (TRL) and ``messages`` (ms-swift), the row's
    columns (its reward functions read them), and the group's measured statistics under ``winnow_*``
    names, which no trainer reads as an argument. No samples: the trainer makes its own."""
    rewards = [
        c.reward
        for c in group.completions
        if not c.failed and c.reward is not None and c.finish_reason != FINISH_REFERENCE
    ]
    mean = sum(rewards) / len(rewards) if rewards else None
    std = None
    if mean is not None and len(rewards) > 1:
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1))
    record: dict[str, Any] = {
        **group.prompt.columns,
        "prompt": group.prompt.messages,
        "messages": group.prompt.messages,
        "id": group.prompt.id,
    }
    if group.prompt.tools is not None:
        record["tools"] = group.prompt.tools
    if group.prompt.reference is not None and "solution" not in record and "answer" not in record:
        record["solution"] = group.prompt.reference  # TRL's accuracy_reward reads it
    record.update(
        winnow_samples=len([c for c in group.completions if c.finish_reason != FINISH_REFERENCE]),
        winnow_pass_rate=pass_rate(group, opts) if opts.orm_key else None,
        winnow_reward_mean=mean,
        winnow_reward_std=std,
    )
    return record


def prompt_completion_records(group: Group, kept: list[Completion], opts: SelectOptions) -> list[dict[str, Any]]:
    """TRL's conversational prompt-completion SFT form: the trainer computes the loss on the completion only."""
    return [
        {
            **_extra(group, c, opts),
            "prompt": group.prompt.messages,
            "completion": response_messages(c, opts),
            "id": group.prompt.id,
        }
        for c in kept
    ]


def select(group: Group, opts: SelectOptions) -> Selection:
    """The records a group yields in its output format, why it yields none, and what selection did."""
    from winnow.registry import REGISTRY

    ok = [c for c in group.ok if c.finish_reason != FINISH_REFERENCE]
    if not ok:
        if not group.completions:
            return Selection([], "no samples: the row is not in the cache files")
        errors = {c.error for c in group.completions if c.error}
        return Selection([], "every sample failed: " + "; ".join(sorted(errors))[:500])
    return REGISTRY.resolve("format", opts.output_format)(group, opts)


def _chosen(group: Group, opts: SelectOptions) -> tuple[Choice | None, Selection | None]:
    """The kept samples and their pairs, or the Selection that says why there are none."""
    reason = difficulty_filter(group, opts)
    if reason:
        return None, Selection([], reason)
    notes: Counter = Counter()
    choice = choose(group, opts, notes)
    if choice.reason:
        return None, Selection([], choice.reason, notes)
    choice.notes = notes
    return choice, None


def _ok(group: Group) -> list[Completion]:
    return [c for c in group.ok if c.finish_reason != FINISH_REFERENCE]


def raw_format(group: Group, opts: SelectOptions) -> Selection:
    """One line per prompt: every sample with its finish reason, tokens and scores."""
    reason = difficulty_filter(group, opts) if opts.scored else None
    return Selection([], reason) if reason else Selection([raw_record(group, opts)])


def grpo_format(group: Group, opts: SelectOptions) -> Selection:
    """One prompt a GRPO trainer loads, with the group's statistics (prompts too easy or hard are dropped)."""
    reason = difficulty_filter(group, opts) if opts.scored else None
    return Selection([], reason) if reason else Selection([grpo_record(group, opts)])


def swift_format(group: Group, opts: SelectOptions) -> Selection:
    """swift sample's record: every sample unscored (stage 1), else the kept samples with rejected_response."""
    if not opts.scored:
        return Selection(swift_records_unscored(group, _ok(group), opts))
    if opts.selection == "swift":
        return swift_records(group, opts)
    choice, refused = _chosen(group, opts)
    if choice is None:
        assert refused is not None  # _chosen gives one or the other
        return refused
    notes, unpaired = choice.notes, _unpaired(choice)
    records = swift_pair_records(group, choice, opts)
    if unpaired:
        notes[
            "lines without rejected_response (no sample below the chosen)"
            if opts.keep_unpaired
            else "kept samples dropped: no rejected partner (--keep_unpaired false)"
        ] += unpaired
    if not records:
        return Selection([], "no pair: no sample scores strictly below a kept one", notes)
    return Selection(records, None, notes)


def sft_format(group: Group, opts: SelectOptions) -> Selection:
    """The kept samples (every sample when unscored) as whole conversations."""
    if not opts.scored:
        return Selection(swift_records_unscored(group, _ok(group), opts))
    choice, refused = _chosen(group, opts)
    if choice is None:
        assert refused is not None  # _chosen gives one or the other
        return refused
    return Selection(
        [
            {
                **_extra(group, c.completion, opts),
                "messages": conversation(group, c.completion, opts),
                "id": group.prompt.id,
            }
            for c, _ in choice.kept
        ],
        None,
        choice.notes,
    )


def prompt_completion_format(group: Group, opts: SelectOptions) -> Selection:
    """The kept samples (every sample when unscored) in TRL's prompt/completion form."""
    if not opts.scored:
        return Selection(prompt_completion_records(group, _ok(group), opts))
    choice, refused = _chosen(group, opts)
    if choice is None:
        assert refused is not None  # _chosen gives one or the other
        return refused
    return Selection(prompt_completion_records(group, [c.completion for c, _ in choice.kept], opts), None, choice.notes)


def dpo_format(group: Group, opts: SelectOptions) -> Selection:
    """TRL's preference pairs: each kept sample with each of its rejected partners."""
    if not opts.scored:
        return Selection([], "no pair: the dpo format needs rewards (--orm_model/--prm_model/--reward_funcs)")
    choice, refused = _chosen(group, opts)
    if choice is None:
        assert refused is not None  # _chosen gives one or the other
        return refused
    unpaired = _unpaired(choice)
    if unpaired:
        choice.notes["kept samples with no rejected partner (not in dpo)"] += unpaired
    records = dpo_records(group, choice, opts)
    if not records:
        return Selection([], "no pair: no sample scores strictly below a kept one", choice.notes)
    return Selection(records, None, choice.notes)
