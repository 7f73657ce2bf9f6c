"""Let ms-swift plugin files load unchanged when ms-swift itself is not installed.

swift plugins import their base classes and registries from swift (``from swift.plugin import ORM,
orms`` in swift 3, ``from swift.rewards import ORM, orms`` in swift 4, ``InferRequest`` from
``swift.llm`` or ``swift.infer_engine``) and register with ``orms['name'] = MyORM``; multi-turn plugins
import ``MultiTurnScheduler``/``multi_turns`` and ``Env``/``envs`` (``swift.rollout`` in swift 4,
``swift.plugin.multi_turn`` / ``swift.plugin.env`` in swift 3; stand-ins in :mod:`winnow.multiturn.swift`).
This module puts small stand-ins for those modules in ``sys.modules`` while such a file runs (only when
swift is absent) so it imports as written; the registry then reads what it added to the tables.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from collections.abc import Callable
from typing import Any

from winnow.rewards.base import InferRequest

SHIM_MODULES = (
    "swift",
    "swift.plugin",
    "swift.rewards",
    "swift.llm",
    "swift.infer_engine",
    "swift.plugin.multi_turn",
    "swift.plugin.env",
    "swift.rollout",
    "swift.rollout.multi_turn",
    "swift.rollout.gym_env",
    "swift.infer_engine.protocol",
    "swift.llm.infer",
    "swift.llm.infer.protocol",
    "swift.utils",
)
# where swift 4 and swift 3 keep their tables of schedulers and environments (for the real ms-swift)
SWIFT_MULTI_TURN = (
    ("swift.rollout", "multi_turns", "envs"),
    ("swift.plugin.multi_turn", "multi_turns", None),
    ("swift.plugin.env", None, "envs"),
)


class ORM:
    """swift's outcome-reward base: subclasses define ``__call__(self, completions, **kwargs)``."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass


class PRM:
    """swift's process-reward base: subclasses define ``__call__(self, infer_requests, ground_truths, **kw)``."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass


@contextlib.contextmanager
def shims(more_names: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None):
    """While a plugin file runs: stand-ins for swift's modules (unless the real ms-swift is installed),
    and afterwards, what the file added to swift's ``orms``/``prms``/``multi_turns``/``envs`` tables, by role
    (``orm``, ``prm``, ``scheduler``, ``environment``). ``more_names(multi_turns, envs)`` gives the other names
    the stand-ins export (the multi-turn ones: :func:`winnow.multiturn.swift.shim_names`). The stand-ins leave
    ``sys.modules`` when the file has run."""
    tables: dict[str, dict[str, Any]] = {"orm": {}, "prm": {}, "scheduler": {}, "environment": {}}
    spec = importlib.util.find_spec("swift") if "swift" not in sys.modules else None
    real = "swift" in sys.modules or (spec is not None and spec.origin not in (None, "namespace"))
    if real:  # the real ms-swift: watch its own tables
        try:
            from swift.rewards import orms as real_orms
            from swift.rewards import prms as real_prms
        except ImportError:
            real_orms, real_prms = {}, {}
        watched = [("orm", real_orms), ("prm", real_prms), *_real_multi_turn_tables()]
        before = [dict(table) for _, table in watched]
        yield tables
        for (role, table), old in zip(watched, before, strict=True):
            tables[role].update({k: v for k, v in table.items() if old.get(k) is not v})
        return
    orms: dict[str, Any] = {}
    prms: dict[str, Any] = {}
    multi_turns: dict[str, Any] = {}
    envs: dict[str, Any] = {}
    names = {
        **(more_names(multi_turns, envs) if more_names else {}),
        "ORM": ORM,
        "PRM": PRM,
        "orms": orms,
        "prms": prms,
        "InferRequest": InferRequest,
    }
    saved = {name: sys.modules.get(name) for name in SHIM_MODULES}
    for name in SHIM_MODULES:
        module = types.ModuleType(name)
        # marks a stand-in; ModuleType declares no such attribute
        module.__winnow_shim__ = True  # type: ignore[attr-defined]
        module.__dict__.update(names)
        sys.modules[name] = module
    for name in SHIM_MODULES:  # each submodule an attribute of its parent, as after a real import
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])
    try:
        yield tables
    finally:
        for name, old_module in saved.items():
            if old_module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old_module
        tables["orm"].update(orms)
        tables["prm"].update(prms)
        tables["scheduler"].update(multi_turns)
        tables["environment"].update(envs)


def _real_multi_turn_tables() -> list[tuple[str, dict[str, Any]]]:
    """The real ms-swift's tables of schedulers and environments, by role (swift 4's or swift 3's modules)."""
    import importlib

    out: list[tuple[str, dict[str, Any]]] = []
    for module_name, schedulers, environments in SWIFT_MULTI_TURN:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # this swift version keeps them elsewhere (or importing it needs a GPU stack)
            continue
        for role, attr in (("scheduler", schedulers), ("environment", environments)):
            table = getattr(module, attr, None) if attr else None
            if isinstance(table, dict) and all(table is not t for _, t in out):
                out.append((role, table))
    return out
