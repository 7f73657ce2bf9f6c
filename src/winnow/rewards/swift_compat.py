"""Let ms-swift plugin files load unchanged when ms-swift itself is not installed.

swift plugins import their base classes and registries from swift (``from swift.plugin import ORM,
orms`` in swift 3, ``from swift.rewards import ORM, orms`` in swift 4, ``InferRequest`` from
``swift.llm`` or ``swift.infer_engine``) and register with ``orms['name'] = MyORM``. This module puts
small stand-ins for those modules in ``sys.modules`` (only while swift is absent) so such a file
imports as written; the registry then reads what it added to ``orms`` / ``prms``.
"""

from __future__ import annotations

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


orms: dict[str, Any] = {}
prms: dict[str, Any] = {}


def install() -> bool:
    """Install the stand-ins unless the real swift is importable; True when they are in place."""
    if "swift" in sys.modules:
        return getattr(sys.modules["swift"], "__winnow_shim__", False)
    spec = importlib.util.find_spec("swift")
    if spec is not None and spec.origin not in (None, "namespace"):
        return False  # the real ms-swift (a folder called swift/ in the working directory is not it)
    for name in SHIM_MODULES:
        module = types.ModuleType(name)
        module.__winnow_shim__ = True
        module.__dict__.update(ORM=ORM, PRM=PRM, orms=orms, prms=prms, InferRequest=InferRequest)
        sys.modules[name] = module
    for parent, child in (("swift", "plugin"), ("swift", "rewards"), ("swift", "llm"), ("swift", "infer_engine")):
        setattr(sys.modules[parent], child, sys.modules[f"{parent}.{child}"])
    return True


def registered() -> dict[str, dict[str, Any]]:
    """What plugins added to swift's registries, by kind."""
    return {"orm": dict(orms), "prm": dict(prms)}
