"""Name -> reward: the built-in rewards, rewards from plugin files, and how each is built.

A plugin file (``--external_plugins my_rewards.py``) may define ``orms = {...}`` and ``prms = {...}``
(the ms-swift seed convention), ``rewards = {...}`` / ``reward_funcs = {...}``, or use the
:func:`reward` decorator. Values are classes (built with the options given for that name), functions
(used as they are, options bound as keyword arguments) or ready objects. This module imports nothing
heavy; the built-ins are imported on first use.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from winnow.errors import ConfigError

PLUGIN_DICTS = {"orms": "orm", "prms": "prm", "rewards": "reward", "reward_funcs": "reward"}


@dataclass
class RewardEntry:
    """One registered reward: what builds it, its one-line doc and where it came from."""

    name: str
    target: Any
    kind: str = "reward"  # orm, prm or reward
    source: str = "builtin"
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def doc(self) -> str:
        text = inspect.getdoc(self.target) or ""
        line = text.strip().splitlines()[0] if text.strip() else "(no description)"
        if self.aliases:
            line += f" (aliases: {', '.join(self.aliases)})"
        if self.source != "builtin":
            line += f" [{self.kind}, from {self.source}]"
        return line


_REWARDS: dict[str, RewardEntry] = {}
_ALIASES: dict[str, str] = {}
_builtins_loaded = False
_current_source = "builtin"


def reward(name: str | None = None, *, aliases: tuple[str, ...] = (), kind: str = "reward"):
    """Register a reward class or function under ``name`` (default: its own name)."""

    def register(target: Any) -> Any:
        key = name or getattr(target, "__name__", None)
        if not key:
            raise ConfigError(f"reward {target!r} needs a name")
        _REWARDS[key] = RewardEntry(key, target, kind=kind, source=_current_source, aliases=tuple(aliases))
        for alias in aliases:
            _ALIASES[alias] = key
        return target

    return register


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        import winnow.rewards.builtin  # noqa: F401 - registers by decorator
        import winnow.rewards.code  # noqa: F401


def load_plugin(path: str) -> list[str]:
    """Import a plugin file and register its rewards; returns their names."""
    global _current_source
    _load_builtins()
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"--external_plugins {path}: no such file")
    module_name = f"winnow_plugin_{abs(hash(str(file.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ConfigError(f"--external_plugins {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    before = set(_REWARDS)
    _current_source = file.name
    from winnow.rewards import swift_compat

    shimmed = swift_compat.install()
    swift_before = swift_compat.registered()
    try:
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"--external_plugins {path}: importing it failed: {type(e).__name__}: {e}") from None
    finally:
        _current_source = "builtin"
    names = sorted(set(_REWARDS) - before)
    if shimmed:  # `orms['name'] = Cls` into swift's registry, as swift plugins do
        for kind, table in swift_compat.registered().items():
            for key, target in table.items():
                if swift_before[kind].get(key) is not target:
                    _REWARDS[key] = RewardEntry(str(key), target, kind=kind, source=file.name)
                    names.append(str(key))
    for attr, kind in PLUGIN_DICTS.items():
        table = getattr(module, attr, None)
        if table is None:
            continue
        if not isinstance(table, dict):
            raise ConfigError(f"--external_plugins {path}: {attr} must be a dict of name -> reward")
        for key, target in table.items():
            _REWARDS[key] = RewardEntry(str(key), target, kind=kind, source=file.name)
            names.append(str(key))
    return names


def get_entry(name: str) -> RewardEntry | None:
    """The registered reward called ``name`` (or an alias of it), or None."""
    _load_builtins()
    return _REWARDS.get(_ALIASES.get(name, name))


def known_rewards() -> list[str]:
    """Every registered name and alias, sorted."""
    _load_builtins()
    return sorted({*_REWARDS, *_ALIASES})


def unknown_reward(name: str) -> ConfigError:
    """The error for a name that is neither registered nor a model."""
    return ConfigError(f"Unknown reward {name!r}. Known: {', '.join(known_rewards())}. "
                       "Or load one with --external_plugins FILE, or give a reward model's directory or hub id.")


def build(entry: RewardEntry, options: dict[str, Any], flat: dict[str, Any] | None = None):
    """The reward object of an entry: a class is built with its options, a function gets them bound.

    ``options`` are this reward's own (unknown keys are an error); ``flat`` are run-wide options,
    taken by name or as ``<reward>_<name>`` (ms-swift's flat style) where the reward accepts them.
    """
    import functools

    target = entry.target
    fn = target.__init__ if inspect.isclass(target) else target
    if not (inspect.isclass(target) or inspect.isfunction(target)):
        if options:
            raise ConfigError(f"reward {entry.name} is a ready object and takes no options, got {sorted(options)}")
        return target
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    params = {} if sig is None else {p.name: p for p in sig.parameters.values()
                                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}
    takes_any = sig is None or any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    chosen: dict[str, Any] = {}
    for key, value in (flat or {}).items():
        for candidate in (key, key[len(entry.name) + 1:] if key.startswith(entry.name + "_") else None):
            if candidate and candidate in params and candidate not in ("completions", "infer_requests"):
                chosen[candidate] = value
    # a function's **kwargs receives dataset columns at call time; its options must be named parameters
    bad = [k for k in options if k not in params and (inspect.isfunction(target) or not takes_any)]
    if bad:
        raise ConfigError(f"reward {entry.name}: unknown option(s) {', '.join(bad)}; "
                          f"it takes {', '.join(sorted(params)) or 'none'}")
    chosen.update(options)
    if inspect.isclass(target):
        try:
            return target(**chosen)
        except TypeError as e:
            raise ConfigError(f"reward {entry.name}: {e}") from None
    runtime = {"completions", "infer_requests", "ground_truths", "completion_tokens", "prompts", "messages",
               "reference", "finish_reasons"}
    missing = [p.name for p in params.values() if p.default is p.empty and p.name not in chosen
               and p.name not in runtime and list(params).index(p.name) > 0]
    if missing:
        raise ConfigError(f"reward {entry.name} needs {', '.join(missing)}: "
                          f"--reward_kwargs '{{\"{entry.name}\": {{\"{missing[0]}\": ...}}}}'")
    if not chosen:
        return target
    bound = functools.partial(target, **chosen)
    functools.update_wrapper(bound, target)
    del bound.__wrapped__  # the partial's own signature (options bound) is the one to inspect
    return bound


def list_rewards() -> list[tuple[str, str]]:
    """(name, one-line doc) of every registered reward, plus the model-based kinds."""
    _load_builtins()
    rows = [(name, entry.doc) for name, entry in _REWARDS.items()]
    rows += [(alias, f"Alias of {target}.") for alias, target in _ALIASES.items()]
    rows.sort()
    rows += [
        ("<classifier RM dir>", "A sequence-classification reward model (one label): --orm_model/--reward_model PATH."),
        ("<PRM dir>", "A process reward model (qwen_prm, math_shepherd, token_classification): --prm_model PATH."),
    ]
    return rows
