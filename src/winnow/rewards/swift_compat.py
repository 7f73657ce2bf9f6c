"""Let ms-swift plugin files load unchanged when ms-swift itself is not installed.

swift plugins import their base classes and registries from swift (``from swift.plugin import ORM,
orms`` in swift 3, ``from swift.rewards import ORM, orms`` in swift 4, ``InferRequest`` from
``swift.llm`` or ``swift.infer_engine``) and register with ``orms['name'] = MyORM``. This module puts
small stand-ins for those modules in ``sys.modules`` while such a file runs (only when swift is absent)
so it imports as written; the registry then reads what it added to ``orms`` / ``prms``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from typing import Any

from winnow.rewards.base import InferRequest

SHIM_MODULES = ("swift", "swift.plugin", "swift.rewards", "swift.llm", "swift.infer_engine")


class ORM:
    """swift's outcome-reward base: subclasses define ``__call__(self, completions, **kwargs)``."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass


class PRM:
    """swift's process-reward base: subclasses define ``__call__(self, infer_requests, ground_truths, **kw)``."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass


@contextlib.contextmanager
def shims():
    """While a plugin file runs: stand-ins for swift's modules (unless the real ms-swift is installed),
    and afterwards, what the file added to swift's ``orms``/``prms`` tables, by role. The stand-ins
    leave ``sys.modules`` when the file has run."""
    tables: dict[str, dict[str, Any]] = {"orm": {}, "prm": {}}
    spec = importlib.util.find_spec("swift") if "swift" not in sys.modules else None
    real = "swift" in sys.modules or (spec is not None and spec.origin not in (None, "namespace"))
    if real:  # the real ms-swift: watch its own tables
        try:
            from swift.rewards import orms, prms  # type: ignore[import-not-found]
        except ImportError:
            orms, prms = {}, {}
        before = {"orm": dict(orms), "prm": dict(prms)}
        yield tables
        for role, table in (("orm", orms), ("prm", prms)):
            tables[role].update({k: v for k, v in table.items() if before[role].get(k) is not v})
        return
    orms: dict[str, Any] = {}
    prms: dict[str, Any] = {}
    saved = {name: sys.modules.get(name) for name in SHIM_MODULES}
    for name in SHIM_MODULES:
        module = types.ModuleType(name)
        module.__winnow_shim__ = True
        module.__dict__.update(ORM=ORM, PRM=PRM, orms=orms, prms=prms, InferRequest=InferRequest)
        sys.modules[name] = module
    for parent, child in (("swift", "plugin"), ("swift", "rewards"), ("swift", "llm"), ("swift", "infer_engine")):
        setattr(sys.modules[parent], child, sys.modules[f"{parent}.{child}"])
    try:
        yield tables
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        tables["orm"].update(orms)
        tables["prm"].update(prms)
