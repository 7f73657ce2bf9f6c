"""Test-time scaling metrics from outputs: pass@k, majority@k, reward-weighted majority@k and best-of-k for
k = 1, 2, 4, ... N from one run, and accuracy against generated tokens across runs; a table, a PNG and an
HTML page.

Every estimator works on one problem's usable samples (each with a verdict, an answer class, reward values
and its tokens) and is averaged over problems; the intervals are a percentile bootstrap over problems.
docs/report.md gives the formulas.
"""

from __future__ import annotations

import base64
import html
import json
import math
import random
import re
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, cast

from winnow.config import ReportConfig
from winnow.errors import ConfigError, DataError, MissingDependency, require

TIES = ("first", "average")
QWEN_ROLES = {"label": "orm", "pred_score": "rm"}  # the score keys the Qwen2.5-Math eval adapter writes


# ----------------------------------------------------------------------------- what the estimators see


@dataclass(frozen=True)
class Sample:
    """One usable completion as the estimators see it."""

    correct: bool
    answer: Hashable | None = None  # its final answer's class within the problem; None: nothing to vote for
    rewards: Mapping[str, float | None] = field(default_factory=dict)
    tokens: int | None = None


@dataclass
class Problem:
    """One prompt's usable samples, in the order they were generated."""

    id: str
    samples: list[Sample]
    tokens: float | None = None  # generated tokens of the whole group, when the output counts them (search)

    def tokens_at(self, k: int) -> float | None:
        """Generated tokens for k of its samples: the group's total (or its samples' sum) times k / n."""
        n = len(self.samples)
        total = self.tokens
        if total is None:
            counts = [s.tokens for s in self.samples if s.tokens is not None]
            if len(counts) < n:  # a sample without a token count
                return None
            total = float(sum(counts))
        if not total:  # outputs scored from caches count no tokens (0): unknown, not free
            return None
        return total * min(k, n) / n


@dataclass
class Run:
    """One output read for the report: its problems and where each figure comes from."""

    label: str
    path: str
    problems: list[Problem]
    verdict: str  # where correctness comes from, in words
    rewards: list[str]  # keys ranked by best-of-k
    vote_rewards: list[str]  # keys that weight votes (those never below 0)
    answers: str  # how answers were grouped, in words
    notes: list[str] = field(default_factory=list)  # what was left out and why, one line each
    # whether a problem's samples are independent draws, so that k of them estimate a run of k (best-of-N, DVTS's
    # subtrees); a search's group is one result (beam search, MCTS): reported at k = its size only
    independent: bool = True
    # the line the plot draws this run on: its --label, else its own, and one for a search's runs at several N
    series: str = ""

    @property
    def samples(self) -> int:
        """The most samples a problem has (N)."""
        return max((len(p.samples) for p in self.problems), default=0)


# ----------------------------------------------------------------------------- estimators of one problem


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of a problem with c right samples of n (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= c <= n, got n={n} c={c} k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def best_of_k(samples: Sequence[Sample], key: str, k: int, ties: str = "first") -> float:
    """Exact expected correctness of the sample ``key`` scores highest among k drawn without replacement.

    Samples are ranked by score (unscored ones last: never picked, a subset of only those scores 0). The
    sample at rank r is the pick of C(n-1-r, k-1) of the C(n, k) subsets. With ``ties="first"`` equal scores
    rank in sample order; with ``"average"`` a tied group shares its chance equally (the mean of its verdicts).
    """
    n = len(samples)
    k = min(k, n)
    values = [s.rewards.get(key) for s in samples]
    # cast: only scored samples are ranked
    ranked = sorted((i for i in range(n) if values[i] is not None), key=lambda i: (-cast(float, values[i]), i))
    total = math.comb(n, k)
    if ties == "first":
        return sum(math.comb(n - 1 - r, k - 1) for r, i in enumerate(ranked) if samples[i].correct) / total
    expected, start = 0.0, 0
    while start < len(ranked):
        end = start
        while end < len(ranked) and values[ranked[end]] == values[ranked[start]]:
            end += 1
        chance = (math.comb(n - start, k) - math.comb(n - end, k)) / total  # no higher score drawn, one of these
        expected += chance * sum(samples[i].correct for i in ranked[start:end]) / (end - start)
        start = end
    return expected


def vote(samples: Sequence[Sample], weight: str | None = None, ties: str = "first") -> float:
    """Correctness of the answer elected by these samples' vote (each counts 1, or its ``weight`` score).

    Samples with no answer (or no ``weight`` score) do not vote; no votes scores 0. The answer's verdict is its
    first voter's (``ties="first"``, which also breaks a tied vote by the answer seen first) or the mean of its
    voters' verdicts, averaged over the tied answers (``"average"``).
    """
    totals: dict[Hashable, float] = {}
    verdicts: dict[Hashable, list[bool]] = {}
    for s in samples:
        w = 1.0 if weight is None else s.rewards.get(weight)
        if s.answer is None or w is None:
            continue
        totals[s.answer] = totals.get(s.answer, 0.0) + w
        verdicts.setdefault(s.answer, []).append(s.correct)
    if not totals:
        return 0.0
    top = max(totals.values())
    winners = [a for a, t in totals.items() if t == top]  # in order of first vote
    if ties == "first":
        return float(verdicts[winners[0]][0])
    return sum(sum(verdicts[a]) / len(verdicts[a]) for a in winners) / len(winners)


def subsets(n: int, k: int, draws: int, rng: random.Random) -> Iterator[tuple[int, ...]]:
    """Every k-subset of range(n) when there are at most ``draws``, else ``draws`` random ones (indices sorted)."""
    if math.comb(n, k) <= draws:
        yield from combinations(range(n), k)
        return
    for _ in range(draws):
        yield tuple(sorted(rng.sample(range(n), k)))


def votes_at_k(
    samples: Sequence[Sample],
    k: int,
    weights: Sequence[str | None],
    ties: str = "first",
    draws: int = 1000,
    rng: random.Random | None = None,
) -> dict[str | None, float]:
    """Expected vote correctness over k-subsets for plain majority (None) and each weight key, on shared subsets."""
    k = min(k, len(samples))
    totals = dict.fromkeys(weights, 0.0)
    count = 0
    for idx in subsets(len(samples), k, draws, rng or random.Random(0)):
        chosen = [samples[i] for i in idx]
        for w in weights:
            totals[w] += vote(chosen, w, ties)
        count += 1
    return {w: t / count for w, t in totals.items()}


def problem_scores(
    problem: Problem,
    k: int,
    rewards: Sequence[str] = (),
    vote_rewards: Sequence[str] = (),
    ties: str = "first",
    draws: int = 1000,
    rng: random.Random | None = None,
) -> dict[str, float]:
    """Every metric of one problem at k samples (k capped at the samples it has), keyed as in :func:`metric_title`."""
    samples = problem.samples
    n = len(samples)
    k = min(k, n)
    votes = votes_at_k(samples, k, [None, *vote_rewards], ties, draws, rng)
    out = {"pass": pass_at_k(n, sum(s.correct for s in samples), k), "majority": votes[None]}
    out.update({f"best:{key}": best_of_k(samples, key, k, ties) for key in rewards})
    out.update({f"vote:{key}": votes[key] for key in vote_rewards})
    return out


class RunQuality:
    """What a run's samples are worth, tallied group by group as they are written (the run summary's
    ``quality``): pass@1, pass@N, majority@N (the same final answer text) and best-of-N by each reward,
    judged by the ORM, over the prompts the ORM could judge. ``winnow report`` gives the full curve.

    A search strategy's group (beam search's N best beams, MCTS's answers) is not N independent draws: the
    mean over it is no single sample's accuracy, so such a run (``independent=False``) has no pass@1, only
    the figures at N, as ``winnow report`` draws it (one point at k = N)."""

    def __init__(self, orm_key: str, reward_keys: Sequence[str], independent: bool = True):
        self.orm_key = orm_key
        self.reward_keys = [k for k in reward_keys if k != orm_key]
        self.independent = independent
        self.prompts = 0
        self.n = 0
        self.sums: dict[str, float] = {}

    def add(self, group: Any) -> None:
        """One scored group (a :class:`winnow.schema.Group`)."""
        samples = []
        for c in group.completions:
            if c.failed or c.finish_reason == "reference":
                continue
            verdict = c.scores.get(self.orm_key)
            if verdict is None or verdict.value is None:
                continue
            answer = answer_source({"text": c.text})
            samples.append(
                Sample(
                    correct=verdict.value > 0,
                    answer=None if answer is None else re.sub(r"\s+", "", answer),
                    rewards={k: c.scores[k].value for k in self.reward_keys if k in c.scores},
                )
            )
        if not samples:
            return
        n = len(samples)
        self.prompts += 1
        self.n = max(self.n, n)
        right = sum(s.correct for s in samples)
        tally = {"pass@1": right / n} if self.independent else {}
        tally.update({"pass@N": float(right > 0), "majority@N": vote(samples)})
        tally.update({f"best-of-N by {k}": best_of_k(samples, k, n) for k in self.reward_keys})
        for name, value in tally.items():
            self.sums[name] = self.sums.get(name, 0.0) + value

    def summary(self) -> dict[str, float]:
        """Each metric's mean over the judged prompts, N written out (``pass@8``); empty when none was judged."""
        if not self.prompts:
            return {}
        return {
            name.replace("@N", f"@{self.n}").replace("-N ", f"-{self.n} "): round(total / self.prompts, 4)
            for name, total in self.sums.items()
        } | {"prompts judged": self.prompts}


def metric_title(name: str) -> str:
    """The column title of a metric key (``pass``, ``majority``, ``best:KEY``, ``vote:KEY``)."""
    kind, _, key = name.partition(":")
    return {"pass": "pass@k", "majority": "majority@k", "best": f"best-of-k {key}", "vote": f"{key}-weighted vote@k"}[
        kind
    ]


# ----------------------------------------------------------------------------- across problems


@dataclass(frozen=True)
class Estimate:
    """A mean over problems with its 95% bootstrap interval (None without resamples)."""

    value: float
    low: float | None = None
    high: float | None = None


@dataclass
class Row:
    """A run's metrics at one k."""

    k: int
    tokens: float | None  # mean generated tokens per problem for k samples; None when the output has no counts
    metrics: dict[str, Estimate]


def ks_for(n: int, max_k: int | None = None) -> list[int]:
    """k = 1, 2, 4, ... up to n (or max_k), plus that last value when it is not a power of two."""
    top = min(n, max_k) if max_k else n
    ks = [1 << i for i in range(top.bit_length()) if 1 << i <= top]
    return ks + ([top] if top and ks[-1] != top else [])


def _quantile(ordered: list[float], q: float) -> float:
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def estimate(values: Sequence[float], resamples: Sequence[Sequence[int]] = ()) -> Estimate:
    """The mean of per-problem values and its 2.5-97.5 percentile interval over the bootstrap ``resamples``."""
    mean = math.fsum(values) / len(values)
    if not resamples:
        return Estimate(mean)
    means = sorted(math.fsum(map(values.__getitem__, idx)) / len(idx) for idx in resamples)
    return Estimate(mean, _quantile(means, 0.025), _quantile(means, 0.975))


def scaling(
    run: Run, ks: Sequence[int], ties: str = "first", draws: int = 1000, bootstrap: int = 1000, seed: int = 0
) -> list[Row]:
    """The run's metrics at each k, averaged over problems, with bootstrap intervals shared by every cell."""
    if not run.problems:
        return []
    rng = random.Random(seed)
    size = len(run.problems)
    resamples = [[rng.randrange(size) for _ in range(size)] for _ in range(bootstrap)]
    rows = []
    for k in ks:
        per = [
            problem_scores(p, k, run.rewards, run.vote_rewards, ties, draws, random.Random(f"{seed}/{k}/{i}"))
            for i, p in enumerate(run.problems)
        ]
        tokens = [t for p in run.problems if (t := p.tokens_at(k)) is not None]
        mean_tokens = math.fsum(tokens) / size if len(tokens) == size else None
        rows.append(Row(k, mean_tokens, {name: estimate([d[name] for d in per], resamples) for name in per[0]}))
    return rows


# ----------------------------------------------------------------------------- reading outputs


def read_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) of a JSONL or Parquet output; a bad line is a DataError naming it."""
    if path.suffix == ".parquet":
        pq = require("pyarrow.parquet", "hf", "reading Parquet outputs")
        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield i, row
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{i}: not a JSON line ({e.msg}); a raw output has one JSON object a line"
                ) from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            yield i, row


def is_qwen_eval(row: Mapping[str, Any]) -> bool:
    """Whether a record is a Qwen2.5-Math evaluation line (``code`` completions with ``score`` labels)."""
    return "completions" not in row and isinstance(row.get("code"), list) and isinstance(row.get("score"), list)


def qwen_eval_record(row: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """A Qwen2.5-Math evaluation line as a raw record: its labels as the ``label`` ORM score, ``pred_score`` as an
    RM score and ``pred`` as each completion's extracted answer."""
    if not is_qwen_eval(row):
        raise DataError(f"{where}: not a Qwen2.5-Math eval line (it needs 'code' and 'score' lists)")
    texts, labels = row["code"], row["score"]
    preds = row.get("pred") or [None] * len(texts)
    rm = row.get("pred_score") or [None] * len(texts)
    if not len(texts) == len(labels) == len(preds) == len(rm):
        raise DataError(f"{where}: code, score, pred and pred_score must have one entry per completion")
    completions = []
    for text, label, pred, value in zip(texts, labels, preds, rm, strict=True):
        if isinstance(value, list):  # the file stores each score as a one-element list
            value = value[0] if value else None
        completions.append(
            {
                "text": text,
                "finish_reason": "stop",
                "prompt_tokens": None,
                "completion_tokens": None,
                "answer": pred,
                "scores": {"label": {"value": 1.0 if label else 0.0}, "pred_score": {"value": value}},
            }
        )
    question = row.get("question") or row.get("query") or ""
    return {
        "id": str(row.get("idx", where)),
        "messages": [{"role": "user", "content": question}],
        "reference": None if row.get("gt") is None else str(row["gt"]),
        "completions": completions,
    }


def score_values(completion: Mapping[str, Any]) -> dict[str, float | None]:
    """A completion's score values by key; scores as ``{key: {"value": v}}``, ``{key: v}`` or a list of
    ``{"name", "value"}`` (Parquet); the combined ``reward`` as key ``reward`` unless a score has that name."""
    scores = completion.get("scores") or {}
    if isinstance(scores, list):
        scores = {s["name"]: s for s in scores if isinstance(s, Mapping) and "name" in s}
    out = {}
    for key, s in scores.items():
        value = s.get("value") if isinstance(s, Mapping) else s
        out[key] = None if value is None else float(value)
    if completion.get("reward") is not None:
        out.setdefault("reward", float(completion["reward"]))
    return out


def group_tokens(record: Mapping[str, Any]) -> float | None:
    """Generated tokens of a whole group when the output counts them (a ``compute`` or ``search`` block)."""
    for block_name in ("compute", "search"):
        block = record.get(block_name)
        if isinstance(block, Mapping):
            for name in ("completion_tokens", "generated_tokens", "tokens"):
                value = block.get(name)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    return float(value)
    return None


def answer_source(completion: Mapping[str, Any]) -> str | None:
    """The text to read a completion's final answer from: its extracted ``answer`` (boxed), else its last
    ``\\boxed{}`` or ``<answer>`` block, else all its text; None when it has neither."""
    from winnow.rewards.mathverify import answer_text

    answer = completion.get("answer")
    if answer is not None:
        return f"\\boxed{{{answer}}}" if str(answer).strip() else None
    text = completion.get("text") or ""
    return answer_text(text) if text.strip() else None


def answer_keys(completions: Sequence[Mapping[str, Any]], match: str = "math") -> Sequence[Hashable | None]:
    """Each completion's answer class: math-verify equivalence (``math``) or the same answer text (``exact``)."""
    sources = [answer_source(c) for c in completions]
    if match == "exact":
        return [None if s is None else re.sub(r"\s+", "", s) for s in sources]
    from winnow.rewards.mathverify import answer_classes

    require("math_verify", "math", "grouping answers for majority votes (or use --answer_match exact)")
    return answer_classes(sources)


def load_manifest(path: Path) -> dict[str, Any] | None:
    """The run manifest written beside an output (``<stem>.manifest.json``), or None."""
    manifest = path.with_name(path.stem + ".manifest.json")
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{manifest}: not valid JSON ({e.msg})") from None


def manifest_label(manifest: Mapping[str, Any] | None, path: Path, with_n: bool = True) -> str:
    """A run's label: its model, strategy and N (unless ``with_n`` is false) from the manifest, else the file name."""
    config = (manifest or {}).get("config") or {}
    if not config:
        return path.stem
    strategy = config.get("search") if isinstance(config.get("search"), str) else config.get("sampler_type")
    parts = [
        Path(str(config["model"])).name if config.get("model") else None,
        strategy,
        f"N={config['num_return_sequences']}" if config.get("num_return_sequences") and with_n else None,
    ]
    return " ".join(p for p in parts if p) or path.stem


def independent_samples(manifest: Mapping[str, Any] | None) -> bool:
    """Whether a run's samples of a problem are independent draws, as its strategy says in the manifest
    (``independent_samples``; outputs that do not say, such as best-of-N runs, are)."""
    strategy = (manifest or {}).get("strategy")
    return not isinstance(strategy, Mapping) or strategy.get("independent_samples", True) is not False


def _math_verdicts(completions: Sequence[Mapping[str, Any]], reference: Any, where: str) -> list[float | None]:
    from winnow.rewards.mathverify import verify_answer

    if reference is None or not str(reference).strip():
        raise DataError(f"{where}: no reference answer; --verdict math judges against each record's reference")
    return [verify_answer(c.get("text") or "", str(reference))[0] for c in completions]


def _score_keys(
    path: Path, rows: list[tuple[int, dict]], roles: dict[str, str], config: ReportConfig
) -> tuple[str | None, list[str]]:
    """(the verdict's score key, the reward keys) of an output, each checked against the scores it holds."""
    found: dict[str, None] = dict.fromkeys(roles)  # ordered: the manifest's keys, then any others seen
    for i, record in rows:
        completions = record.get("completions")
        if not isinstance(completions, list):
            raise DataError(
                f"{path}:{i}: no 'completions' list; report reads raw outputs "
                "(winnow sample --output_format raw) or Qwen2.5-Math eval files"
            )
        for c in completions:
            found.update(dict.fromkeys(score_values(c)))
    known = f"scores found: {', '.join(found) or 'none'}"
    orm = config.orm or next((k for k, role in roles.items() if role == "orm"), None)
    if config.verdict == "orm":
        if orm is None:
            raise ConfigError(
                f"{path}: no manifest names an ORM; name the correctness score with --orm KEY "
                f"({known}) or judge with --verdict math"
            )
        if orm not in found:
            raise ConfigError(
                f"{path}: no completion has a score {orm!r} ({known}); name the correctness score with --orm KEY"
            )
    rewards = list(config.rewards) or [k for k in found if k != orm and roles.get(k) != "orm" and k != "reward"]
    unknown = [k for k in rewards if k not in found]
    if unknown:
        raise ConfigError(f"{path}: no completion has a score {', '.join(map(repr, unknown))} ({known})")
    return orm, rewards


def _problem(
    record: dict, where: str, orm: str | None, rewards: list[str], config: ReportConfig
) -> tuple[Problem, int]:
    """One record's usable samples (failed ones left out) with their verdicts, answer classes and rewards; and
    how many of them the verdict could not judge."""
    usable = [c for c in record["completions"] if c.get("finish_reason") != "error"]
    values = [score_values(c) for c in usable]
    if config.verdict == "math":
        verdicts = _math_verdicts(usable, record.get("reference"), where) if usable else []
    else:
        verdicts = [v.get(orm) for v in values] if orm is not None else [None] * len(values)
    answers = answer_keys(usable, config.answer_match)
    samples = [
        Sample(
            correct=verdict is not None and verdict > 0,
            answer=answer,
            rewards={k: v.get(k) for k in rewards},
            tokens=c.get("completion_tokens"),
        )
        for c, v, verdict, answer in zip(usable, values, verdicts, answers, strict=True)
    ]
    return Problem(str(record.get("id", where)), samples, group_tokens(record)), sum(v is None for v in verdicts)


def load_run(path: str | Path, config: ReportConfig, label: str | None = None) -> Run:
    """Read one output (raw or Qwen2.5-Math eval) into problems with verdicts, answer classes and rewards."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = list(read_rows(path))
    if not rows:
        raise DataError(f"{path}: no records")
    qwen = config.input_format == "qwen_eval" or (config.input_format == "auto" and is_qwen_eval(rows[0][1]))
    if qwen:
        rows = [(i, qwen_eval_record(r, f"{path}:{i}")) for i, r in rows]
        manifest, roles = None, dict(QWEN_ROLES)
    else:
        manifest = load_manifest(path)
        roles = {r["key"]: r.get("role", "") for r in (manifest or {}).get("rewards") or [] if "key" in r}
    orm, rewards = _score_keys(path, rows, roles, config)

    problems: list[Problem] = []
    failed = empty = unjudged = 0
    for i, record in rows:
        problem, problem_unjudged = _problem(record, f"{path}:{i}", orm, rewards, config)
        failed += len(record["completions"]) - len(problem.samples)
        unjudged += problem_unjudged
        if problem.samples:
            problems.append(problem)
        else:
            empty += 1

    vote_rewards = [k for k in rewards if all((s.rewards[k] or 0) >= 0 for p in problems for s in p.samples)]
    most = max((len(p.samples) for p in problems), default=0)
    independent = independent_samples(manifest)
    notes = [
        f"{failed} failed samples left out" if failed else "",
        f"{empty} problems with no usable sample left out" if empty else "",
        f"{unjudged} samples the verdict could not judge count as wrong" if unjudged else "",
    ]
    short = sum(len(p.samples) < most for p in problems)
    if not independent:
        notes.append(
            "a search's answers to a problem are one result, not independent samples: reported for the "
            "whole group only (k = the group's size" + (f", {short} groups smaller than {most}" if short else "") + ")"
        )
    elif short:
        notes.append(f"{short} problems have fewer samples than N: k is capped at what they have")
    notes += [f"no {k}-weighted vote: its scores go below 0" for k in rewards if k not in vote_rewards]
    if config.verdict == "math":
        verdict = "winnow's math verifier against the reference"
    elif qwen and orm == "label":
        verdict = "the file's own labels (score)"
    else:
        verdict = f"ORM score {orm!r} > 0"
    answers = "math-verify equivalence" if config.answer_match == "math" else "the same answer text"
    if qwen:
        answers += " of the file's extracted answers (pred)"
    name = label or (f"{path.stem} (Qwen2.5-Math eval)" if qwen else manifest_label(manifest, path))
    return Run(
        name,
        str(path),
        problems,
        verdict,
        rewards,
        vote_rewards,
        answers,
        [n for n in notes if n],
        independent,
        series=label or (name if qwen or independent else manifest_label(manifest, path, False)),
    )


# ----------------------------------------------------------------------------- table, plots, page


def _cell(e: Estimate) -> str:
    if e.low is None or e.high is None:  # both or neither
        return f"{100 * e.value:.1f}"
    return f"{100 * e.value:.1f} [{100 * e.low:.1f}, {100 * e.high:.1f}]"


def table_rows(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    """(headers, cells) of a run's scaling table: k, tokens per problem, then each metric in %."""
    names = list(rows[0].metrics) if rows else []
    headers = ["k", "tokens/problem", *(metric_title(n) for n in names)]
    cells = [
        [str(r.k), "-" if r.tokens is None else f"{r.tokens:,.0f}", *(_cell(r.metrics[n]) for n in names)] for r in rows
    ]
    return headers, cells


def describe(run: Run, config: ReportConfig) -> list[str]:
    """The lines that say what a run's table is: size, verdict, answer grouping, ties, intervals, notes."""
    intervals = (
        f"95% bootstrap intervals over problems ({config.bootstrap} resamples)" if config.bootstrap else "no intervals"
    )
    return [
        f"{run.label}  ({run.path})",
        f"{len(run.problems)} problems, up to {run.samples} samples each; correct = {run.verdict}; "
        f"votes group answers by {run.answers}; ties: {config.ties}; {intervals}",
        *(f"note: {n}" for n in run.notes),
    ]


def format_table(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """Plain text with aligned columns (numbers right-aligned)."""
    widths = [max(len(h), *(len(row[j]) for row in cells)) if cells else len(h) for j, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def plot(results: Sequence[tuple[Run, Sequence[Row]]], path: Path) -> None:
    """Accuracy against k (each run's subsampling, with its intervals) and against generated tokens, as a PNG;
    runs of one series (a strategy at several N) are one line."""
    require("matplotlib", "report", "the report's plots")
    from matplotlib.figure import Figure  # a Figure without pyplot: no global state, no GUI backend
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    with_tokens = any(r.tokens for _, rows in results for r in rows)
    fig = Figure(figsize=(13 if with_tokens else 7.5, 5.2), layout="constrained")
    axes = fig.subplots(1, 2 if with_tokens else 1, squeeze=False)[0]
    by_k, by_tokens = axes[0], (axes[1] if with_tokens else None)
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    names = list(dict.fromkeys(n for _, rows in results for r in rows for n in r.metrics))
    colors = {n: f"C{i % 10}" for i, n in enumerate(names)}
    series: dict[str, list[Row]] = {}
    for run, rows in results:
        series.setdefault(run.series or run.label, []).extend(rows)
    for r_i, (line, rows) in enumerate(series.items()):
        if not rows:
            continue
        rows = sorted(rows, key=lambda r: (r.k, r.tokens or 0.0))
        style, marker = styles[r_i % len(styles)], markers[r_i % len(markers)]
        for name in [n for n in rows[0].metrics if all(n in r.metrics for r in rows)]:
            label = metric_title(name) if len(series) == 1 else f"{line}: {metric_title(name)}"
            ks = [r.k for r in rows]
            ys = [100 * r.metrics[name].value for r in rows]
            by_k.plot(ks, ys, style, marker=marker, color=colors[name], label=label)
            if all(r.metrics[name].low is not None for r in rows):  # and so high (both or neither)
                by_k.fill_between(
                    ks,
                    [100 * cast(float, r.metrics[name].low) for r in rows],
                    [100 * cast(float, r.metrics[name].high) for r in rows],
                    color=colors[name],
                    alpha=0.08,
                )
            pts = sorted((r.tokens, 100 * r.metrics[name].value) for r in rows if r.tokens)
            if pts and by_tokens is not None:
                by_tokens.plot(*zip(*pts, strict=True), style, marker=marker, color=colors[name], label=label)
    by_k.set_xscale("log", base=2)
    ks_all = sorted({r.k for _, rows in results for r in rows})
    by_k.set_xticks(ks_all, [str(k) for k in ks_all])
    by_k.set(xlabel="k (samples per problem)", ylabel="accuracy (%)", title="accuracy vs k (shaded: 95% interval)")
    by_k.grid(alpha=0.3)
    if by_tokens is not None:
        by_tokens.set(
            xlabel="mean generated tokens per problem",
            ylabel="accuracy (%)",
            xscale="log",
            title="accuracy vs generated tokens",
        )
        by_tokens.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        by_tokens.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))  # 200, not 2x10^2
        by_tokens.xaxis.set_minor_formatter(NullFormatter())
        by_tokens.grid(alpha=0.3)
    handles, labels = by_k.get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="outside lower center",
        ncol=min(len(labels), 3 if len(series) > 1 else 5),
        fontsize=8,
        frameon=False,
    )
    fig.savefig(path, dpi=110)


def html_page(results: Sequence[tuple[Run, Sequence[Row]]], config: ReportConfig, png: bytes | None) -> str:
    """A self-contained page: the plot (embedded) and each run's table."""
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>winnow report</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}th{background:#f4f4f4}p.d{margin:.2em 0;color:#444}</style></head><body>",
        "<h1>winnow report</h1>",
    ]
    if png is not None:
        parts.append(
            f"<img alt='accuracy vs k and vs generated tokens' style='max-width:100%' "
            f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        )
    else:
        parts.append("<p>No plot: install matplotlib with <code>pip install 'winnow[report]'</code>.</p>")
    for run, rows in results:
        lines = describe(run, config)
        parts.append(f"<h2>{esc(lines[0])}</h2>" + "".join(f"<p class='d'>{esc(line)}</p>" for line in lines[1:]))
        headers, cells = table_rows(rows)
        parts.append(
            "<table><tr>"
            + "".join(f"<th>{esc(h)}</th>" for h in headers)
            + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in cells)
            + "</table>"
        )
    parts.append(
        "<p class='d'>Cells: accuracy in % [95% interval]. pass@k: the unbiased estimator "
        "1 - C(n-c,k)/C(n,k); majority@k and weighted votes: the mean over k-subsets of each problem's "
        "samples; best-of-k: the exact expectation over k-subsets. See docs/report.md.</p></body></html>"
    )
    return "\n".join(parts)


def _json_rows(rows: Sequence[Row]) -> list[dict[str, Any]]:
    return [
        {
            "k": r.k,
            "tokens": r.tokens,
            "metrics": {n: {"value": e.value, "low": e.low, "high": e.high} for n, e in r.metrics.items()},
        }
        for r in rows
    ]


def write_outputs(
    results: Sequence[tuple[Run, Sequence[Row]]], config: ReportConfig, out_dir: Path, log: Callable[[str], None]
) -> list[Path]:
    """report.json always; report.png (with matplotlib) and report.html when plots are on. Returns the paths."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".winnow-report-write-check"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"cannot write the report to {out_dir} ({e.strerror}); choose a folder with --output_dir"
        ) from None
    written = [out_dir / "report.json"]
    written[0].write_text(
        json.dumps(
            {
                "runs": [
                    {
                        "label": run.label,
                        "path": run.path,
                        "problems": len(run.problems),
                        "samples": run.samples,
                        "verdict": run.verdict,
                        "answers": run.answers,
                        "notes": run.notes,
                        "rows": _json_rows(rows),
                    }
                    for run, rows in results
                ],
                "ties": config.ties,
                "bootstrap": config.bootstrap,
                "draws": config.draws,
                "seed": config.seed,
            },
            indent=1,
        ),
        encoding="utf-8",
    )
    if not config.plots:
        return written
    png = None
    try:
        plot(results, out_dir / "report.png")
        png = (out_dir / "report.png").read_bytes()
        written.append(out_dir / "report.png")
    except MissingDependency:
        log("no plots: matplotlib is not installed; install it with: pip install 'winnow[report]'")
    (out_dir / "report.html").write_text(html_page(results, config, png), encoding="utf-8")
    written.append(out_dir / "report.html")
    return written


def report(
    config: ReportConfig, out: Callable[[str], None] = print, log: Callable[[str], None] = print
) -> list[tuple[Run, list[Row]]]:
    """Read every output, print each run's scaling table with ``out`` and write the files; returns the tables."""
    labels: Sequence[str | None] = config.label or [None] * len(config.outputs)
    runs = [load_run(p, config, label) for p, label in zip(config.outputs, labels, strict=True)]
    seen: dict[str, int] = {}
    for run in runs:  # two runs of the same sampler and N: tell them apart by file name
        seen[run.label] = seen.get(run.label, 0) + 1
    for run in runs:
        if seen[run.label] > 1 and not config.label:
            run.label = f"{run.label} ({Path(run.path).stem})"
    results = []
    for run in runs:
        ks = ks_for(run.samples, config.max_k) if run.independent else [run.samples]
        rows = scaling(run, ks, config.ties, config.draws, config.bootstrap, config.seed)
        results.append((run, rows))
        out("\n".join(describe(run, config)) + "\n" + format_table(*table_rows(rows)) + "\n")
    out_dir = Path(config.output_dir) if config.output_dir else Path(config.outputs[0]).resolve().parent
    written = write_outputs(results, config, out_dir, log)
    log(f"wrote {', '.join(p.name for p in written)} to {out_dir}")
    return results
