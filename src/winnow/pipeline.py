"""The one orchestrator: load -> generate -> score -> select -> write.

Rows are read lazily in the run's order; a bounded number of engine calls is in flight; scoring of
one batch overlaps the generation of the next; each finished group is appended to the output as
soon as it is done. Ctrl-C (or SIGTERM) stops new work, lets the calls in flight finish, writes
them, and leaves a resumable output.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from winnow import data, hub, registry, rewards, search, structured
from winnow.config import SampleConfig, fingerprint_fields, make_config, to_dict
from winnow.engines import (
    Engine,
    HasGenerationDefaults,
    Interruptible,
    KeepsState,
    ReportsProgress,
    ReportsStats,
    SummaryNote,
    check_aligned,
    get_engine,
)
from winnow.errors import ConfigError, DataError, WinnowError
from winnow.multiturn import Closeable
from winnow.redact import Redactor
from winnow.schema import FINISH_ERROR, FINISH_LENGTH, BadRow, Group, Prompt, SamplingParams
from winnow.search import SearchContext, SizesBatches
from winnow.select import SelectOptions, select, with_reference
from winnow.store import OutputStore, check_writable
from winnow.structured import load_response_format

# for a search strategy, how it searches: part of the fingerprint of a search run only
SEARCH_FINGERPRINT_FIELDS = (*search.OPTION_FIELDS, "search_kwargs")


@dataclass
class RunSummary:
    """What a run did: counts, tokens, time and where the output is."""

    output_file: str = ""
    failed_file: str = ""
    rows_total: int = 0
    rows_skipped_resumed: int = 0
    groups_written: int = 0
    records_written: int = 0
    rows_filtered: int = 0
    rows_failed: int = 0
    samples: int = 0
    samples_failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    status: str = "running"
    cost_usd: float | None = None
    batch_discount: float | None = None  # with --batch_api: the share of the prices taken off in cost_usd
    filtered_reasons: dict[str, int] = field(default_factory=dict)
    cache_short_rows: int = 0  # --cache_files rows with fewer than N samples (scored as they are, engine 'no')
    cache_short_samples: int = 0
    error: str | None = None  # why a failed run stopped (secrets removed)
    samples_truncated: int = 0  # samples cut at the token limit (kept unless --keep_truncated false)
    # what selection did beyond the records, by kind (lines without rejected_response, duplicates...)
    selection_notes: dict[str, int] = field(default_factory=dict)
    # with an ORM: pass@1, pass@N, majority@N, best-of-N by each reward (this run's groups)
    quality: dict[str, float] = field(default_factory=dict)
    engine_note: str = ""  # one more summary line from the engine (Ray: its replicas)
    # every run of this output together (a resumed run adds to what the earlier ones did)
    totals: dict[str, int] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def line(self) -> str:
        """The one-line summary printed at the end of a run."""
        parts = [
            f"{self.status}: {self.groups_written} groups ({self.records_written} lines) from {self.rows_total} rows",
            f"{self.samples} samples",
            f"{self.completion_tokens} tokens in {self.wall_s:.1f}s ({self.tokens_per_s:.0f} tok/s)",
        ]
        if self.rows_skipped_resumed:
            parts.append(f"{self.rows_skipped_resumed} rows already done")
        parts.append(
            f"{self.rows_filtered} rows filtered"
            + (
                " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.filtered_reasons.items())) + ")"
                if self.filtered_reasons
                else ""
            )
        )
        if self.cache_short_rows:
            parts.append(f"{self.cache_short_rows} cached rows short of samples ({self.cache_short_samples} missing)")
        parts.append(f"{self.rows_failed} rows failed")
        if self.samples_failed:
            parts.append(f"{self.samples_failed} samples failed")
        if self.samples_truncated:
            parts.append(f"{self.samples_truncated} samples cut at the token limit")
        parts += [f"{count} {note}" for note, count in sorted(self.selection_notes.items())]
        if self.quality:
            parts.append(
                "quality: " + ", ".join(f"{k} {v:.1%}" for k, v in self.quality.items() if k != "prompts judged")
            )
        if self.cost_usd is not None:
            parts.append(
                f"cost ${self.cost_usd:.4f}"
                + (f" at batch prices ({self.batch_discount:.0%} off)" if self.batch_discount is not None else "")
            )
        line = "winnow sample " + ", ".join(parts) + f" -> {self.output_file}"
        t = self.totals
        if self.rows_skipped_resumed and t:
            line += (
                f"\n  all runs of this output: {t['rows']} rows settled of {self.rows_total}: "
                f"{t['groups']} written ({t['lines']} lines), {t['filtered']} filtered, {t['failed']} failed"
                + (f" ({t['retry']} to try again with --resume true)" if t["retry"] else "")
            )
        elif t.get("retry"):
            line += f"\n  {t['retry']} failed rows may succeed on another try: rerun with --resume true"
        if self.engine_note:
            line += f"\n  {self.engine_note}"
        return line


# the same, for multi-turn runs only (so that outputs made before these options existed still resume)
MULTI_TURN_FINGERPRINT_FIELDS = ("multi_turn_scheduler", "max_turns", "tools", "gym_env", "multi_turn_kwargs")


def fingerprint(config: SampleConfig) -> str:
    """A short hash of the options that a resumed run must share with the one it continues."""
    values = {k: getattr(config, k) for k in fingerprint_fields(type(config))}
    if config.response_format:  # only when set: outputs written before it existed keep their fingerprint
        values["response_format"] = config.response_format
    if config.multi_turn:  # only when set, likewise
        values.update({k: getattr(config, k) for k in MULTI_TURN_FINGERPRINT_FIELDS})
    if config.sampler_type not in ("sample", "distill"):  # a search: how it searches
        values.update({k: getattr(config, k) for k in SEARCH_FINGERPRINT_FIELDS})
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sampling_params(config: SampleConfig, defaults: dict[str, Any] | None = None) -> SamplingParams:
    """The run's sampling settings: the options given, else the model's generation_config.json
    (``defaults``), else unset (engines apply their own defaults; the client engine sends nothing)."""
    defaults = defaults or {}

    def pick(name: str) -> Any:
        value = getattr(config, name)
        return value if value is not None else defaults.get(name)

    return SamplingParams(
        n=config.num_return_sequences,
        max_new_tokens=config.max_new_tokens,
        temperature=pick("temperature"),
        top_p=pick("top_p"),
        top_k=pick("top_k"),
        repetition_penalty=pick("repetition_penalty"),
        stop=list(config.stop_words),
        seed=config.seed,
        num_beams=config.num_beams,
        response_format=load_response_format(config.response_format) if config.response_format else None,
    )


def template_kwargs(config: SampleConfig) -> dict[str, Any]:
    """The chat template's variables: --chat_template_kwargs, and --enable_thinking."""
    out = dict(config.chat_template_kwargs)
    if config.enable_thinking is not None:
        out["enable_thinking"] = config.enable_thinking
    return out


def build_engine(config: SampleConfig) -> Engine | None:
    """The run's engine from its options (None for ``--sampler_engine no``)."""
    if config.engine == "no":
        return None
    if config.model is None:  # --adapters whose args.json names no base model, or --load_args false
        raise ConfigError(
            "--model is required: the adapters' args.json names no base model (or --load_args is "
            "false); pass --model BASE"
        )
    kwargs: dict[str, Any] = dict(config.engine_kwargs)
    if config.num_beams > 1 and config.engine != "transformers":
        raise ConfigError(f"--num_beams {config.num_beams}: beam search is done by the transformers engine only")
    if config.engine == "client":
        if config.response_prefix:
            raise ConfigError(
                "--response_prefix needs a local engine: an API cannot be made to continue a partial answer in general"
            )
        kwargs.update(
            stream=config.stream,
            max_concurrency=config.max_concurrency,
            rpm=config.rpm,
            tpm=config.tpm,
            request_timeout=config.request_timeout,
            max_retries=config.max_retries,
            keep_truncated=True,
        )  # truncation is the run's call (--keep_truncated), made for every engine
        variables = template_kwargs(config)
        if variables:  # vLLM and SGLang read chat_template_kwargs from the request body
            kwargs["extra_body"] = {**kwargs.get("extra_body", {}), "chat_template_kwargs": variables}
        if config.batch_api:
            if config.ray:
                raise ConfigError(
                    "--batch_api with --ray true: the provider runs the batch, replicas have nothing to do; drop --ray"
                )
            from winnow.engines.batch import BatchEngine

            return BatchEngine(
                config.model,
                max_requests=config.batch_max_requests,
                max_bytes=config.batch_max_bytes,
                poll_s=config.batch_poll_s,
                completion_window=config.batch_completion_window,
                **kwargs,
            )
        return _make_engine(config, kwargs)
    if config.batch_api:
        raise ConfigError(f"--batch_api is a provider API: it needs --sampler_engine client, not {config.engine}")
    kwargs.setdefault("torch_dtype", config.torch_dtype)
    kwargs.setdefault("device", config.device)
    kwargs.setdefault("max_length", config.max_length or config.max_model_len)
    kwargs.setdefault("template", config.template)
    kwargs.setdefault("seed", config.seed)
    # options a backend may not know are passed only when set
    optional = {
        "template_kwargs": template_kwargs(config),
        "use_chat_template": config.use_chat_template,
        "truncation_strategy": config.truncation_strategy,
        "response_prefix": config.response_prefix,
        "adapters": list(config.adapters),
        "attn_implementation": config.attn_impl,
        "device_map": _json_or_text(config.device_map),
        "max_memory": dict(config.max_memory),
        "revision": config.model_revision,
        "quantization": _quantization(config),
        "max_model_len": config.max_model_len if config.engine == "vllm" else None,
    }
    for key, value in optional.items():
        if value not in (None, {}, []):
            kwargs.setdefault(key, value)
    return _make_engine(config, kwargs)


def _make_engine(config: SampleConfig, kwargs: dict[str, Any]) -> Engine:
    """The engine itself, or (``--ray true``) the same engine as ``--num_workers`` replicas on a Ray cluster."""
    if config.ray:
        from winnow.runners.ray import ray_engine

        return ray_engine(config, kwargs)
    assert config.model is not None  # build_engine refused a run without one
    return get_engine(config.engine, config.model, **kwargs)


def _json_or_text(value: str | None) -> Any:
    if value and value.strip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"--device_map {value!r}: not valid JSON") from None
    return value


def _quantization(config: SampleConfig) -> dict[str, Any] | None:
    if not config.quant_method:
        return None
    return {
        "method": config.quant_method,
        "bits": config.quant_bits,
        "hqq_axis": config.hqq_axis,
        **{
            k: getattr(config, k)
            for k in (
                "bnb_4bit_compute_dtype",
                "bnb_4bit_quant_type",
                "bnb_4bit_use_double_quant",
                "bnb_4bit_quant_storage",
            )
        },
    }


class Progress:
    """A progress bar on stderr: prompts done/total, samples/s, tokens/s, failures, ETA.

    ``extra`` (the engine's ``progress_fields``, when it has one) adds fields such as requests/s.
    """

    def __init__(self, total: int, initial: int, enabled: bool, extra=None):
        self.bar = None
        self.start = time.monotonic()
        self.samples = 0
        self.tokens = 0
        self.failures = 0
        self.extra = extra
        self._shown = 0.0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                unit="prompt",
                dynamic_ncols=True,
                file=sys.stderr,
                desc="winnow sample",
                smoothing=0.1,
            )

    def update(self, prompts: int, samples: int, tokens: int, failures: int = 0) -> None:
        self.samples += samples
        self.tokens += tokens
        self.failures += failures
        if self.bar is not None:
            now = time.monotonic()
            if now - self._shown >= 0.2:  # formatting the fields per group costs more than the group
                self._shown = now
                self._set_fields(now)
            self.bar.update(prompts)

    def _set_fields(self, now: float) -> None:
        assert self.bar is not None  # called only while there is a bar
        dt = max(now - self.start, 1e-9)
        postfix: dict[str, str | int] = {"samples/s": f"{self.samples / dt:.1f}", "tok/s": f"{self.tokens / dt:.0f}"}
        if self.extra is not None:
            postfix.update(self.extra())
        if self.failures:
            postfix["failed"] = self.failures
        self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self._set_fields(time.monotonic())  # the last figures, not those of 0.2 s before the end
            self.bar.close()


def validate_rows(plan: data.RowPlan) -> None:
    """``--strict``: read every row first and stop before generating if any is bad."""
    bad = [item for item in (plan.read(p) for p in range(len(plan))) if isinstance(item, BadRow)]
    if bad:
        first = "; ".join(f"{b.source}: {b.reason}" for b in bad[:3])
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DataError(f"{len(bad)} bad rows{more}: {first}. Fix them, or drop --strict to skip and log them")


class Run:
    """One ``winnow sample`` run: owns the store, the engine, the scorer and the counters."""

    def __init__(self, config: SampleConfig, engine: Engine | None = None):
        self.config = config
        self.given_engine = engine  # a caller's engine is reused and left open
        self.summary = RunSummary()
        self.stopping = False
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.redactor = Redactor.for_values(config, sys.argv)
        self.redact = self.redactor.text

    async def execute(self) -> RunSummary:
        config = self.config
        ignored = config.without_effect()
        if ignored:
            print(
                f"winnow sample: note: {', '.join(ignored)}: accepted for swift compatibility, without effect on "
                "sampling",
                file=sys.stderr,
            )
        taken = config.apply_saved_args()
        if taken:
            print(
                f"winnow sample: note: from the checkpoint's args.json (--load_args): {', '.join(taken)}",
                file=sys.stderr,
            )
        hub.configure(config.use_hf, config.hub_token)  # where model and dataset ids are read from
        for path in [*config.custom_register_path, *config.external_plugins]:  # before any name is resolved
            registry.load_plugin(path)
        self.strategy = search.build_strategy(config)
        plan = data.build_plan(
            config.dataset,
            seed=config.data_seed,
            shuffle=config.dataset_shuffle,
            data_range=config.data_range,
            limit=self._limit(),
            system=config.system,
            columns=config.columns,
            holdout=config.split_dataset_ratio,
            keep_columns=not config.remove_unused_columns,
        )
        if config.strict:
            validate_rows(plan)
        check_writable(
            config.output_dir, config.output_file, resume=config.resume, override=config.override_exist_file
        )  # before loading any model
        engine = self.given_engine or build_engine(config)
        if engine is None and not config.cache_files:
            raise DataError("--sampler_engine no needs --cache_files: the stage-1 outputs to score")
        scorer = rewards.build_scorer(config)
        multi_turn = None
        if config.multi_turn:  # every sample a trajectory
            from winnow.multiturn.driver import MultiTurn

            multi_turn = MultiTurn.from_config(config, engine)
        # a search keeps its own number of sequences of a prompt alive: batches hold that many of each
        live = (
            self.strategy.sequences_per_prompt()
            if isinstance(self.strategy, SizesBatches)
            else config.num_return_sequences
        )
        per_call, in_flight = (config.num_sampling_batch_size or 1, 1) if engine is None else engine.batch_plan(live)
        if config.num_sampling_batch_size:
            per_call = config.num_sampling_batch_size
        store = OutputStore(
            config.output_dir,
            config.output_file,
            fingerprint=fingerprint(config),
            resume=config.resume,
            override=config.override_exist_file,
            reorder_window=max(4096, 4 * per_call * in_flight),
        )
        self.store, self.engine, self.scorer = store, engine, scorer
        if isinstance(engine, KeepsState):  # the batch engine's log of submitted batches, beside the output
            engine.keep_state(store.path, resume=config.resume)
        self.summary.output_file = str(store.path)
        self.summary.failed_file = str(store.failed_path)
        self.summary.rows_total = len(plan)
        defaults: dict[str, Any] = engine.generation_defaults() if isinstance(engine, HasGenerationDefaults) else {}
        self.params = sampling_params(config, defaults)
        if multi_turn is not None:
            self.strategy = multi_turn.around(self.strategy)
        self.search = SearchContext(engine, self.params, scorer) if engine is not None else None
        self.select_opts = SelectOptions.from_config(config, scorer)
        schema = structured.schema_of(self.params.response_format)
        self.schema_check = structured.SchemaCheck(schema) if schema is not None else None
        self.quality = None
        if scorer is not None and scorer.orm_key is not None:
            from winnow.report import RunQuality, independent_samples

            independent = independent_samples({"strategy": self.strategy.describe()})
            self.quality = RunQuality(scorer.orm_key, [slot.key for slot in scorer.slots], independent)
        # swift's selection scores the dataset's answer beside the samples
        self.add_reference = config.include_reference or (config.selection == "swift" and scorer is not None)
        from winnow.cache import SampleCache

        self.cache = SampleCache(config.cache_files, missing_ok=engine is not None) if config.cache_files else None
        if self.cache is not None and self.cache.missing:
            print(
                f"winnow sample: note: {', '.join(self.cache.missing)} does not exist yet: its rows are sampled",
                file=sys.stderr,
            )
        self._write_manifest("running")
        self._install_signals()
        done_before = store.state.count_done(len(plan)) if store.resumed else 0
        self.summary.rows_skipped_resumed = done_before
        progress = Progress(
            len(plan),
            done_before,
            config.progress,
            engine.progress_fields if isinstance(engine, ReportsProgress) else None,
        )
        self.progress = progress
        slots = asyncio.Semaphore(in_flight)
        advanced = asyncio.Event()
        tasks: set[asyncio.Task] = set()
        try:
            batch: list[Prompt] = []
            for position in range(len(plan)):
                if self.stopping:
                    break
                if store.is_done(position):
                    continue
                item = plan.read(position)
                if isinstance(item, BadRow):
                    store.write_failed(position, item.id, item.source, item.reason, stage="data")
                    self.summary.rows_failed += 1
                    progress.update(1, 0, 0, 1)
                    continue
                batch.append(item)
                if len(batch) >= per_call:
                    await self._submit(batch, slots, advanced, tasks)
                    batch = []
            if batch and not self.stopping:
                await self._submit(batch, slots, advanced, tasks)
            if tasks:
                await asyncio.gather(*tasks)
            if self.error is not None:
                raise self.error
        except BaseException as e:
            if self.error is None:
                self.error = e
            for task in tasks:
                task.cancel()
            raise
        finally:
            progress.close()
            await self._finish(store, engine, scorer)
        return self.summary

    async def _finish(self, store: OutputStore, engine: Engine | None, scorer) -> None:
        """Close everything the run opened and record how it ended; a failure while closing (a full
        disk, say) does not hide the error that ended the run."""
        s = self.summary
        s.wall_s = time.monotonic() - self.started
        fatal = (
            self.error
            if isinstance(self.error, Exception) and not isinstance(self.error, asyncio.CancelledError)
            else None
        )
        s.status = (
            "interrupted"
            if self.stopping or (self.error is not None and fatal is None)
            else "failed"
            if fatal is not None
            else "finished"
        )
        if fatal is not None:
            s.error = self.redact(
                f"{type(fatal).__name__}: {fatal}" if not isinstance(fatal, WinnowError) else str(fatal)
            )
        try:
            store.close()
        except (OSError, WinnowError) as e:
            if fatal is None:
                s.status, s.error = "failed", self.redact(str(e))
                self.error = e
        s.totals = {**asdict(store.totals), "rows": store.totals.rows}
        if s.status == "finished" and self.config.output_parquet:
            from winnow.store import write_parquet

            try:
                write_parquet(store.path, store.path.with_suffix(".parquet"))
            except (OSError, ValueError, WinnowError) as e:
                s.status, s.error = "failed", self.redact(f"cannot write the Parquet copy: {e}")
                self.error = WinnowError(s.error)
        if s.status == "failed" and not store.resumed and store.totals.rows == 0:
            store.discard()  # an empty output must not look like a finished one: the manifest says why
        strategy = getattr(self, "strategy", None)
        for closer in (
            engine.aclose if engine is not None and engine is not self.given_engine else None,
            scorer.aclose if scorer is not None else None,
            strategy.aclose if isinstance(strategy, Closeable) else None,
        ):
            if closer is not None:
                try:
                    await closer()
                except Exception as e:  # the run's outcome is decided; a close failure is only reported
                    print(f"winnow: warning: closing failed: {type(e).__name__}: {e}", file=sys.stderr)
        if isinstance(engine, SummaryNote):
            s.engine_note = engine.summary_note()
        s.cost_usd = self._cost()
        s.batch_discount = self.config.batch_discount if self.config.batch_api else None
        try:
            self._write_manifest(s.status)
        except (OSError, WinnowError) as e:
            print(f"winnow: warning: {e}", file=sys.stderr)
        if fatal is not None and not isinstance(self.error, WinnowError):
            raise WinnowError(
                f"the run failed: {s.error}; what was written is kept (resume with --resume true)"
            ) from fatal

    def _limit(self) -> int | None:
        c = self.config
        if c.num_sampling_batches is None:
            return None
        return c.num_sampling_batches * (c.num_sampling_batch_size or 1)

    async def _submit(
        self, batch: list[Prompt], slots: asyncio.Semaphore, advanced: asyncio.Event, tasks: set[asyncio.Task]
    ) -> None:
        if self.error is not None:
            raise self.error
        last = batch[-1].position
        while not self.store.can_start(last):  # keep the resume window bounded
            advanced.clear()
            await advanced.wait()
        await slots.acquire()
        task = asyncio.create_task(self._process(batch, slots, advanced))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        task.add_done_callback(self._check_task)

    async def _process(self, batch: list[Prompt], slots: asyncio.Semaphore, advanced: asyncio.Event) -> None:
        try:
            groups = await self._generate(batch)
            self._check_truncated(groups)
            if self.schema_check is not None:  # --response_format: an answer off the schema is a failed sample
                structured.check(groups, self.schema_check)
            if self.config.response_prefix and self.engine is not None:  # the answer the model continued
                for group in groups:
                    for c in group.completions:
                        if not c.failed:
                            c.text = self.config.response_prefix + c.text
                            c.scores.clear()  # a search scored the text without it: scored again
            if self.add_reference:
                groups = [with_reference(g) for g in groups]
            if self.scorer is not None:
                await self.scorer.score(groups)
            for group in groups:
                self._write(group)
        finally:
            slots.release()
            advanced.set()

    async def _generate(self, batch: list[Prompt]) -> list[Group]:
        if self.cache is not None:
            return await self._from_cache(batch)
        assert self.search is not None
        return await self.strategy.run(batch, self.search)

    async def _from_cache(self, batch: list[Prompt]) -> list[Group]:
        """Groups from the stage-1 cache; short ones completed by the engine if there is one."""
        assert self.cache is not None
        n = self.params.n
        groups = [Group(p, self.cache.get(p)) for p in batch]
        short: dict[int, list[Group]] = {}
        for g in groups:
            if len(g.completions) < n:
                short.setdefault(n - len(g.completions), []).append(g)
        for missing, todo in short.items():
            if self.engine is None:
                self.summary.cache_short_rows += len(todo)
                self.summary.cache_short_samples += missing * len(todo)
                continue
            params = SamplingParams(**{**asdict(self.params), "n": missing})
            prompts = [g.prompt for g in todo]
            out = await self.engine.generate(prompts, params)
            check_aligned(self.engine, prompts, missing, out)
            for g, extra in zip(todo, out, strict=True):
                g.completions.extend(extra)
        return groups

    def _check_truncated(self, groups: list[Group]) -> None:
        """Count the samples cut at the token limit; with --keep_truncated false they fail (with the reason)."""
        for group in groups:
            for c in group.completions:
                if c.finish_reason == FINISH_LENGTH and c.error is None:
                    self.summary.samples_truncated += 1
                    if not self.config.keep_truncated:
                        c.error = (
                            f"truncated: the answer reached the token limit (--max_new_tokens "
                            f"{self.config.max_new_tokens}); --keep_truncated true keeps such answers"
                        )

    def _write(self, group: Group) -> None:
        s = self.summary
        if self.quality is not None:
            self.quality.add(group)
            s.quality = self.quality.summary()
        selection = select(group, self.select_opts)
        records, reason = selection.records, selection.reason
        for note, count in selection.notes.items():
            s.selection_notes[note] = s.selection_notes.get(note, 0) + count
        failed = len(group.completions) - len(group.ok)
        # a search's group says what every branch cost; its answers' own counts are the paths that won
        spent = group.compute or {}
        tokens = spent.get("completion_tokens", sum(c.completion_tokens for c in group.completions))
        s.samples += len(group.ok)
        s.samples_failed += failed
        s.prompt_tokens += spent.get("prompt_tokens", sum(c.prompt_tokens for c in group.completions))
        s.completion_tokens += tokens
        if self.stopping and failed:
            return  # failed while the run was stopping (cancelled, most likely): not done, redone on resume
        if records:
            self.store.write_group(group.prompt.position, records, group.prompt.id)
            s.groups_written += 1
            s.records_written += len(records)
        elif not group.ok:
            # nothing usable once the engine's retries are spent: logged with the reason and done for
            # this run (an undone row would hold the resume window); a resumed run tries errors again,
            # not answers cut for length or by a content filter
            transient = any(c.finish_reason == FINISH_ERROR for c in group.completions)
            self.store.write_failed(
                group.prompt.position,
                group.prompt.id,
                group.prompt.source,
                self.redact(reason or ""),
                stage="generate",
                retry=transient,
            )
            s.rows_failed += 1
        else:
            self.store.write_group(group.prompt.position, [], group.prompt.id)
            s.rows_filtered += 1
            key = (reason or "filtered").split(":")[0]
            s.filtered_reasons[key] = s.filtered_reasons.get(key, 0) + 1
        self.progress.update(1, len(group.ok), tokens, failed)

    def _cost(self) -> float | None:
        """The run's cost from its token totals and --price_per_mtok_in/out (None without prices)."""
        c, s = self.config, self.summary
        if c.price_per_mtok_in is None and c.price_per_mtok_out is None:
            return None
        share = 1.0 - c.batch_discount if c.batch_api else 1.0  # batch prices: --batch_discount off
        return round(
            (s.prompt_tokens * (c.price_per_mtok_in or 0.0) + s.completion_tokens * (c.price_per_mtok_out or 0.0))
            * share
            / 1e6,
            6,
        )

    def _check_task(self, task: asyncio.Task) -> None:
        """A batch that died of a bug stops the run (at the next submit), it does not vanish."""
        if not task.cancelled() and task.exception() is not None and self.error is None:
            self.error = task.exception()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()

        def stop(signame: str) -> None:
            if self.stopping:
                self._stop_now(signame)
            self.stopping = True
            if isinstance(self.engine, Interruptible):  # the client engine: no new requests, a deadline for the rest
                self.engine.interrupt()
            print(
                f"\nwinnow: {signame}: finishing the calls in flight, then stopping "
                "(again to stop at once; resume with --resume true)",
                file=sys.stderr,
            )

        for sig, name in ((signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")):
            try:
                loop.add_signal_handler(sig, stop, name)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread, or no signals on this platform

    def _stop_now(self, signame: str) -> None:
        """A second Ctrl-C: record what is written and end the process now, without waiting for a
        local engine's batch in flight (it cannot be cut short mid-call). Every group written is
        complete and indexed (writes happen between event-loop callbacks, and this is one), so the
        output resumes as after any kill; worker processes (math verifiers, engine workers) go too."""
        import multiprocessing
        import os

        try:
            self.store.close()
            self.summary.status = "interrupted"
            self.summary.wall_s = time.monotonic() - self.started
            self.summary.totals = {**asdict(self.store.totals), "rows": self.store.totals.rows}
            self._write_manifest("interrupted")
            print(
                f"\nwinnow: {signame} again: stopped now; resume with --resume true\n{self.summary.line()}",
                file=sys.stderr,
                flush=True,
            )
        finally:
            for child in multiprocessing.active_children():
                child.kill()
            os._exit(130)

    def _write_manifest(self, status: str) -> None:
        from winnow.engines.hf import versions

        s = self.summary
        search = getattr(self, "search", None)  # unset when the run stopped before it was built
        self.store.write_manifest(
            {
                "status": status,
                "command": self.redactor.argv(sys.argv) if sys.argv and "winnow" in sys.argv[0] else None,
                "config": to_dict(self.config),
                "seed": self.config.seed,
                "sampling": asdict(self.params) if hasattr(self, "params") else None,
                "versions": versions(),
                "engine": self.redactor.value(self.engine.describe()) if self.engine is not None else {"name": "no"},
                "rewards": self.redactor.value(self.scorer.describe()) if self.scorer is not None else [],
                **({"error": s.error} if s.error else {}),
                "counts": {
                    k: v
                    for k, v in asdict(s).items()
                    if k not in ("output_file", "failed_file", "wall_s", "status", "error", "totals", "engine_note")
                },
                "totals": s.totals or {**asdict(self.store.totals), "rows": self.store.totals.rows},
                "wall_s": round(time.monotonic() - self.started, 3),
                "tokens_per_s": round(s.tokens_per_s, 2),
                **({"engine_stats": self.engine.stats()} if isinstance(self.engine, ReportsStats) else {}),
                **(
                    {"strategy": self.strategy.describe(), "compute": dict(search.counters)}
                    if search is not None
                    else {}
                ),
            }
        )


async def run_async(config: SampleConfig, engine: Engine | None = None) -> RunSummary:
    """Run ``winnow sample`` inside an existing event loop (optionally on an engine already loaded)."""
    return await Run(config, engine).execute()


def sample(config: SampleConfig | dict | None = None, *, engine: Engine | None = None, **options: Any) -> RunSummary:
    """Run ``winnow sample`` from Python: ``sample(SampleConfig(...))`` or ``sample(model=..., dataset=[...])``."""
    if config is None or isinstance(config, dict):
        run_config: SampleConfig = make_config(SampleConfig, {**(config or {}), **options}, source="sample()")
    else:
        run_config = config
    return asyncio.run(run_async(run_config, engine))
