"""The one registry: every named component of winnow, by kind, as a lazy ``"module:attr"`` target.

Kinds: ``engine``, ``reward`` (built-in rewards, ORMs and PRMs by name), ``rm_style`` (how a reward
model's outputs are read), ``format`` (output record formats), ``strategy`` (how a prompt becomes a
group: best-of-N sampling, search), ``scheduler`` (multi-turn), ``tool`` (functions a multi-turn model
may call), ``environment`` (gym environments of multi-turn runs), ``model`` and ``dataset`` (names such as
the demo world's, resolved to local paths).

Entries come from three places: the built-in table below (data only: importing this module imports
nothing else of winnow), installed packages' entry points (group ``winnow.<kind>``, e.g.
``[project.entry-points."winnow.reward"] my_orm = "pkg.mod:MyORM"``; a ``winnow.register`` entry point
names a function called with the registry, for packages that register many names, as the demo world
does), and plugin files (``--external_plugins my_rewards.py``): ms-swift's ``orms = {...}`` /
``prms = {...}`` tables (and its ``multi_turns`` / ``envs`` tables of schedulers and environments),
``rewards = {...}`` / ``reward_funcs = {...}``, the decorators of this module, and bare reward functions
found by name (TRL's convention). A file is run once per process (again only when it changed). Each
entry records where it came from; the components a run builds record the arguments they were built with
(in the manifest).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from winnow.errors import ConfigError

KINDS = {
    "engine": "inference engines (--sampler_engine)",
    "reward": "rewards by name (--orm_model, --prm_model, --reward_funcs)",
    "rm_style": "reward-model styles (how a PRM's outputs are read)",
    "format": "output record formats (--output_format)",
    "strategy": "sampling and search strategies (--sampler_type)",
    "scheduler": "multi-turn schedulers (--multi_turn_scheduler)",
    "tool": "functions a multi-turn model may call (--tools)",
    "environment": "gym environments of multi-turn runs (--gym_env)",
    "model": "model names resolved to local folders",
    "dataset": "dataset names resolved to local files",
}
PLUGIN_DICTS = {"orms": "orm", "prms": "prm", "rewards": "reward", "reward_funcs": "reward"}
# swift's tables a plugin file fills while it runs (winnow.rewards.swift_compat): role -> (kind, role)
SWIFT_TABLES = {
    "orm": ("reward", "orm"),
    "prm": ("reward", "prm"),
    "scheduler": ("scheduler", "reward"),
    "environment": ("environment", "reward"),
}
ENTRY_POINT_PREFIX = "winnow."


@dataclass
class Entry:
    """One registered component: what builds it (an object, or ``"module:attr"`` imported on first use),
    its one-line doc, its aliases and where it came from. ``role`` tells swift's ORM/PRM tables apart."""

    kind: str
    name: str
    target: Any
    doc: str | None = None
    aliases: tuple[str, ...] = ()
    source: str = "builtin"
    role: str = "reward"

    @property
    def obj(self) -> Any:
        """The target itself (imported on first use when it is a ``"module:attr"`` string)."""
        if isinstance(self.target, str) and ":" in self.target:
            module, _, attr = self.target.partition(":")
            self.target = getattr(importlib.import_module(module), attr)
        return self.target

    @property
    def summary(self) -> str:
        """The one-line doc shown by ``winnow list``."""
        text = self.doc if self.doc is not None else (inspect.getdoc(self.obj) or "")
        line = text.strip().splitlines()[0] if text.strip() else "(no description)"
        if self.aliases:
            line += f" (aliases: {', '.join(self.aliases)})"
        if self.source != "builtin":
            line += f" [from {self.source}]"
        return line


@dataclass
class Registry:
    """Names to components, by kind; see the module's doc for where entries come from."""

    entries: dict[tuple[str, str], Entry] = field(default_factory=dict)
    aliases: dict[tuple[str, str], str] = field(default_factory=dict)
    _entry_points_loaded: bool = False
    _files: dict[str, tuple[tuple[int, int], list[Entry]]] = field(default_factory=dict)

    def add(
        self,
        kind: str,
        name: str,
        target: Any,
        *,
        doc: str | None = None,
        aliases: Iterable[str] = (),
        source: str = "builtin",
        role: str = "reward",
    ) -> Entry:
        """Register ``target`` as ``name`` of ``kind`` (a later registration of the name replaces it)."""
        if kind not in KINDS:
            raise ConfigError(f"unknown component kind {kind!r}; one of {', '.join(KINDS)}")
        entry = Entry(kind, name, target, doc, tuple(aliases), source, role)
        self.entries[(kind, name)] = entry
        for alias in entry.aliases:
            self.aliases[(kind, alias)] = name
        return entry

    def get(self, kind: str, name: str) -> Entry | None:
        """The entry called ``name`` (or an alias of it), or None."""
        self.load_entry_points()
        return self.entries.get((kind, self.aliases.get((kind, name), name)))

    def canonical(self, kind: str, name: str) -> str:
        """The registered name behind an alias (the name itself otherwise)."""
        return self.aliases.get((kind, name), name)

    def of_kind(self, kind: str) -> list[Entry]:
        """Every entry of a kind, sorted by name."""
        self.load_entry_points()
        return sorted((e for (k, _), e in self.entries.items() if k == kind), key=lambda e: e.name)

    def names(self, kind: str) -> list[str]:
        """Every name and alias of a kind, sorted."""
        self.load_entry_points()
        return sorted({n for k, n in self.entries if k == kind} | {a for k, a in self.aliases if k == kind})

    def unknown(self, kind: str, name: str, hint: str = "") -> ConfigError:
        """The error for a name that is not registered, naming the known ones."""
        return ConfigError(
            f"Unknown {kind.replace('_', ' ')} {name!r}. Known: {', '.join(self.names(kind))}."
            + (f" {hint}" if hint else "")
        )

    def resolve(self, kind: str, name: str, hint: str = "") -> Any:
        """The component called ``name``, imported; an unknown name is one clear error."""
        entry = self.get(kind, name)
        if entry is None:
            raise self.unknown(kind, name, hint)
        return entry.obj

    # ------------------------------------------------------------------ entry points

    def load_entry_points(self) -> None:
        """Register what installed packages declare (once per process)."""
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        from importlib.metadata import entry_points

        for kind in KINDS:
            for ep in entry_points(group=ENTRY_POINT_PREFIX + kind):
                self.add(kind, ep.name, ep.value, source=f"entry point {ep.dist.name if ep.dist else ep.value}")
        for ep in entry_points(group=ENTRY_POINT_PREFIX + "register"):
            try:
                ep.load()(self)
            except Exception as e:  # a broken package must not break every run: say which one
                print(
                    f"winnow: warning: the {ep.name} plugin ({ep.value}) could not register: {type(e).__name__}: {e}",
                    file=sys.stderr,
                )

    # ------------------------------------------------------------------ plugin files

    def load_file(self, path: str) -> list[Entry]:
        """Import a plugin file and register what it defines; returns the new entries. A file already
        loaded is not imported again (a run loads its plugins before it resolves any name)."""
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(f"--external_plugins {path}: no such file")
        stat = file.stat()
        seen = self._files.get(str(file.resolve()))
        if seen is not None and seen[0] == (stat.st_mtime_ns, stat.st_size):
            for entry in seen[1]:  # run already (its rewards and its schedulers both ask for it): its names again
                self.add(
                    entry.kind,
                    entry.name,
                    entry.target,
                    doc=entry.doc,
                    aliases=entry.aliases,
                    source=entry.source,
                    role=entry.role,
                )
            return cast("list[Entry]", [self.get(e.kind, e.name) for e in seen[1]])  # each was just added
        module_name = f"winnow_plugin_{abs(hash(str(file.resolve())))}"
        spec = importlib.util.spec_from_file_location(module_name, file)
        if spec is None or spec.loader is None:
            raise ConfigError(f"--external_plugins {path}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        before = set(self.entries)
        from winnow.multiturn import swift as multiturn_swift
        from winnow.rewards import swift_compat

        with swift_compat.shims(multiturn_swift.shim_names) as swift_tables:
            try:
                sys.modules[module_name] = module
                spec.loader.exec_module(module)
            except Exception as e:
                raise ConfigError(f"--external_plugins {path}: importing it failed: {type(e).__name__}: {e}") from None
        added = [self.entries[key] for key in set(self.entries) - before]
        for entry in added:  # registered by this module's decorators while it ran
            entry.source = file.name
        for table_name, table in swift_tables.items():  # `orms['name'] = Cls`, as swift plugins register
            kind, role = SWIFT_TABLES[table_name]
            added += [self.add(kind, str(k), v, source=file.name, role=role) for k, v in table.items()]
        for attr, role in PLUGIN_DICTS.items():
            table = getattr(module, attr, None)
            if table is None:
                continue
            if not isinstance(table, dict):
                raise ConfigError(f"--external_plugins {path}: {attr} must be a dict of name -> reward")
            added += [self.add("reward", str(k), v, source=file.name, role=role) for k, v in table.items()]
        named = {e.name for e in added}
        for attr, value in vars(module).items():  # bare reward functions (TRL's convention), found by name
            if (
                inspect.isfunction(value)
                and not attr.startswith("_")
                and attr not in named
                and ("reward", attr) not in self.entries
                and {"completions", "prompts"} & set(inspect.signature(value).parameters)
            ):
                added.append(self.add("reward", attr, value, source=file.name))
        self._files[str(file.resolve())] = ((stat.st_mtime_ns, stat.st_size), list(added))
        return added


def _builtins(registry: Registry) -> Registry:
    add = registry.add
    add(
        "engine",
        "transformers",
        "winnow.engines.transformers:TransformersEngine",
        aliases=("pt", "hf"),
        doc="Local HuggingFace model: generate with native multi-sample, batched, halved and retried on failure.",
    )
    add(
        "engine",
        "client",
        "winnow.engines.openai:OpenAIEngine",
        aliases=("openai",),
        doc="Any OpenAI-compatible API: concurrency, rate limits, retries with backoff, cost.",
    )
    add("engine", "vllm", "winnow.engines.vllm:VLLMEngine", doc="vLLM's offline LLM (GPU, or the CPU build).")
    add("engine", "sglang", "winnow.engines.sglang:SGLangEngine", doc="SGLang's offline engine.")
    add("engine", "lmdeploy", "winnow.engines.lmdeploy:LMDeployEngine", doc="LMDeploy's pipeline.")
    for name, target, aliases in (
        ("math", "winnow.rewards.builtin:MathReward", ("accuracy",)),
        ("format", "winnow.rewards.builtin:format_reward", ()),
        ("react_format", "winnow.rewards.builtin:react_format_reward", ()),
        ("cosine", "winnow.rewards.builtin:CosineReward", ()),
        ("repetition", "winnow.rewards.builtin:repetition_reward", ()),
        ("soft_overlong", "winnow.rewards.builtin:soft_overlong_reward", ()),
        ("judge", "winnow.rewards.builtin:JudgeReward", ()),
        ("code", "winnow.rewards.code:CodeReward", ()),
        ("json_schema", "winnow.rewards.builtin:JsonSchemaReward", ()),
        ("env_reward", "winnow.multiturn.env:env_reward", ()),
    ):
        add("reward", name, target, aliases=aliases)
    for style, doc in (
        ("classifier", "A sequence-classification reward model with one label: its logit is the score."),
        ("qwen_prm", "Qwen2.5-Math-PRM: <extra_0> after each step, a 2-class head, P(good) per step."),
        ("math_shepherd", "Math-Shepherd: a step tag after each step, P('+') vs P('-') at each tag."),
        ("token_classification", "A token-classification PRM with 2 labels, read at each step's last token."),
    ):
        add("rm_style", style, "winnow.rewards.models:load_reward_model", doc=doc)
    for name, doc in (
        ("swift", "swift sample's record: messages, id, and rejected_response when rewards are set."),
        ("sft", "The kept samples as whole conversations: messages, id."),
        ("prompt_completion", "TRL's prompt/completion SFT form (the loss on the completion only)."),
        ("dpo", "TRL's preference form: prompt, chosen, rejected, their scores."),
        ("raw", "One line per prompt: every sample, its finish reason, tokens and scores."),
        ("grpo", "Prompts a GRPO trainer loads (prompt, messages, columns) with the group's statistics."),
    ):
        add("format", name, f"winnow.select:{name}_format", doc=doc)
    add("strategy", "sample", "winnow.search:BestOfN", doc="N independent samples per prompt (best-of-N).")
    add(
        "strategy",
        "distill",
        "winnow.search:BestOfN",
        doc="N independent samples from an API model, its reasoning kept (swift's distill).",
    )
    add(
        "scheduler",
        "tools",
        "winnow.multiturn.tools:ToolScheduler",
        aliases=("tool_call",),
        doc="Runs the model's tool calls (API tool_calls, <tool_call> blocks, trailing Python blocks) on --tools.",
    )
    add(
        "scheduler",
        "gym",
        "winnow.multiturn.env:EnvironmentScheduler",
        aliases=("gym_scheduler",),
        doc="Each trajectory plays a gym environment (--gym_env): reset, then step after every turn.",
    )
    add(
        "tool",
        "python",
        "winnow.multiturn.tools:PythonTool",
        doc="Runs the model's Python program in winnow's sandbox and returns what it prints.",
    )
    add("tool", "calculator", "winnow.multiturn.tools:calculator_tool", doc="Evaluates an arithmetic expression.")
    add(
        "environment",
        "math_retry",
        "winnow.multiturn.env:MathRetryEnv",
        doc="Checks the final answer against the row's reference; a wrong one gets feedback and another try.",
    )
    add(
        "strategy",
        "beam",
        "winnow.search.beam:BeamSearch",
        doc="PRM-guided beam search over steps: keep the N/M best partial answers, sample M next steps from each.",
    )
    add(
        "strategy",
        "dvts",
        "winnow.search.beam:DVTS",
        doc="Diverse verifier tree search: N/M independent subtrees, each a PRM-greedy beam of width M.",
    )
    add(
        "strategy",
        "mcts",
        "winnow.search.mcts:MCTS",
        doc="Monte Carlo tree search over steps: UCT on PRM values, M sampled next steps per expansion.",
    )
    return registry


REGISTRY = _builtins(Registry())


# ----------------------------------------------------------------------------- decorators for plugin files


def _decorator(kind: str) -> Callable[..., Callable[[Any], Any]]:
    def decorator(name: Any = None, *, aliases: tuple[str, ...] = (), **meta: Any):
        if callable(name):  # used bare: @tool
            return decorator()(name)

        def register(target: Any) -> Any:
            key = name or getattr(target, "__name__", None)
            if not key:
                raise ConfigError(f"{kind} {target!r} needs a name")
            REGISTRY.add(kind, key, target, aliases=aliases, **meta)
            return target

        return register

    decorator.__doc__ = (
        f"Register a {KINDS[kind]} component under ``name`` (default: its own name; ``@decorator`` bare works too)."
    )
    return decorator


reward = _decorator("reward")
engine = _decorator("engine")
output_format = _decorator("format")
strategy = _decorator("strategy")
scheduler = _decorator("scheduler")
tool = _decorator("tool")
environment = _decorator("environment")


# ----------------------------------------------------------------------------- rewards


def load_plugin(path: str) -> list[str]:
    """Import a plugin file and register what it defines; returns the new names."""
    return [e.name for e in REGISTRY.load_file(path)]


def get_entry(name: str) -> Entry | None:
    """The reward called ``name`` (or an alias of it), or None."""
    return REGISTRY.get("reward", name)


def known_rewards() -> list[str]:
    """Every reward name and alias, sorted."""
    return REGISTRY.names("reward")


def unknown_reward(name: str) -> ConfigError:
    """The error for a name that is neither registered nor a model."""
    return REGISTRY.unknown(
        "reward", name, "Or load one with --external_plugins FILE, or give a reward model's directory or hub id."
    )


def build(entry: Entry, options: dict[str, Any], flat: dict[str, Any] | None = None):
    """The reward object of an entry: a class is built with its options, a function gets them bound.

    ``options`` are this reward's own (unknown keys are an error); ``flat`` are run-wide options,
    taken by name or as ``<reward>_<name>`` (ms-swift's flat style) where the reward accepts them.
    """
    import functools

    from winnow.rewards.base import calling_style

    target = entry.obj
    fn = target.__init__ if inspect.isclass(target) else target
    if not (inspect.isclass(target) or inspect.isfunction(target)):
        if options:
            raise ConfigError(f"reward {entry.name} is a ready object and takes no options, got {sorted(options)}")
        return target
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    params = (
        {}
        if sig is None
        else {
            p.name: p
            for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
        }
    )
    takes_any = sig is None or any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    chosen: dict[str, Any] = {}
    for key, value in (flat or {}).items():
        for candidate in (key, key[len(entry.name) + 1 :] if key.startswith(entry.name + "_") else None):
            if candidate and candidate in params and candidate not in ("completions", "infer_requests"):
                chosen[candidate] = value
    # a function's **kwargs receives dataset columns at call time; its options must be named parameters
    bad = [k for k in options if k not in params and (inspect.isfunction(target) or not takes_any)]
    if bad:
        raise ConfigError(
            f"reward {entry.name}: unknown option(s) {', '.join(bad)}; it takes {', '.join(sorted(params)) or 'none'}"
        )
    chosen.update(options)
    if inspect.isclass(target):
        try:
            return target(**chosen)
        except TypeError as e:
            raise ConfigError(f"reward {entry.name}: {e}") from None
    runtime = {
        "completions",
        "infer_requests",
        "ground_truths",
        "completion_tokens",
        "prompts",
        "messages",
        "reference",
        "finish_reasons",
        "rollout_infos",
    }
    # a plugin's TRL-style function takes dataset columns as required parameters, supplied when it is called;
    # a built-in's required parameters are its options
    options_only = calling_style(target) == "seed" or entry.source == "builtin"
    missing = (
        [
            p.name
            for p in params.values()
            if p.default is p.empty
            and p.name not in chosen
            and p.name not in runtime
            and list(params).index(p.name) > 0
        ]
        if options_only
        else []
    )
    if missing:
        raise ConfigError(
            f"reward {entry.name} needs {', '.join(missing)}: "
            f'--reward_kwargs \'{{"{entry.name}": {{"{missing[0]}": ...}}}}\''
        )
    if not chosen:
        return target
    bound = functools.partial(target, **chosen)
    functools.update_wrapper(bound, target)
    # the partial's own signature (options bound) is the one to inspect; update_wrapper set __wrapped__,
    # which typeshed's partial does not declare
    del bound.__wrapped__  # type: ignore[attr-defined]
    return bound
