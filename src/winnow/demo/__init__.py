"""winnow's offline demo world: small models and datasets that need no hub and no GPU.

Names resolve here: ``--model demo-tiny`` is a tiny random-weight chat model built locally on
first use (cached under ``$WINNOW_CACHE``, default ``~/.cache/winnow``).
"""

from __future__ import annotations

import os
from pathlib import Path

BUILT_MODELS = {"demo-tiny"}


def cache_dir() -> Path:
    """Where built demo artefacts are kept."""
    return Path(os.environ.get("WINNOW_CACHE", Path.home() / ".cache" / "winnow")).expanduser()


def resolve_model(name: str) -> str | None:
    """The local directory of a demo model name, building it on first use; None for other names."""
    if name not in BUILT_MODELS:
        return None
    from winnow.demo.build import build_tiny_model

    target = cache_dir() / name
    if not (target / "config.json").is_file():
        build_tiny_model(target)
    return str(target)


def resolve_dataset(name: str) -> str | None:
    """The local file of a bundled demo dataset name (e.g. ``demo-arith``); None for other names."""
    return None
