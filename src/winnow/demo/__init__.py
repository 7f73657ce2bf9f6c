"""winnow's offline demo world: small models and datasets that need no hub and no GPU.

Names resolve here:

- ``demo-tiny``: a tiny random-weight chat model built locally on first use (cached under
  ``$WINNOW_CACHE``, default ``~/.cache/winnow``); for tests of the plumbing.
- ``demo-policy``, ``demo-prm``, ``demo-rm``: the trained arithmetic world shipped in the package
  (a policy, a Math-Shepherd-style process reward model, a classifier reward model), reproduced by
  ``python -m demo_world.train --all``; see docs/demo.md.
- datasets ``demo-arith`` (the test split) and ``demo-arith-train`` (the train split):
  ``problem``/``solution``/``answer`` rows of multi-step integer arithmetic.
"""

from __future__ import annotations

import os
from pathlib import Path

from winnow.errors import ConfigError

HERE = Path(__file__).resolve().parent
ASSETS = HERE / "assets"
DATA = HERE / "data"
BUILT_MODELS = {"demo-tiny"}
TRAINED_MODELS = {"demo-policy", "demo-prm", "demo-rm"}
DATASETS = {
    "demo-arith": "arith_test.jsonl",
    "demo-arith-test": "arith_test.jsonl",
    "demo-arith-train": "arith_train.jsonl",
}


def cache_dir() -> Path:
    """Where built demo artefacts are kept."""
    return Path(os.environ.get("WINNOW_CACHE", Path.home() / ".cache" / "winnow")).expanduser()


def resolve_model(name: str) -> str | None:
    """The local directory of a demo model name, building it on first use; None for other names."""
    if name in TRAINED_MODELS:
        target = ASSETS / name
        if not (target / "config.json").is_file():
            raise ConfigError(
                f"the demo model {name!r} is missing from {ASSETS}; rebuild the demo world with "
                "python -m demo_world.train --all"
            )
        return str(target)
    if name not in BUILT_MODELS:
        return None
    from winnow.demo.build import build_tiny_model

    target = cache_dir() / name
    if not (target / "config.json").is_file():
        build_tiny_model(target)
    return str(target)


def resolve_dataset(name: str) -> str | None:
    """The local file of a bundled demo dataset name (e.g. ``demo-arith``); None for other names."""
    file = DATASETS.get(name)
    if file is None:
        return None
    path = DATA / file
    if not path.is_file():
        raise ConfigError(
            f"the demo dataset {name!r} is missing ({path}); rebuild it with python -m demo_world.train --all"
        )
    return str(path)


def register(registry) -> None:
    """Register the demo world's model and dataset names with winnow's registry (the ``winnow.register``
    entry point calls it; the core never imports this package)."""
    import functools

    for name in sorted(TRAINED_MODELS | BUILT_MODELS):
        registry.add(
            "model",
            name,
            functools.partial(resolve_model, name),
            doc="the demo world's "
            + {
                "demo-policy": "policy",
                "demo-prm": "process reward model",
                "demo-rm": "classifier reward model",
                "demo-tiny": "tiny random model, built on first use",
            }[name],
        )
    for name in DATASETS:
        registry.add(
            "dataset",
            name,
            functools.partial(resolve_dataset, name),
            doc=f"the demo world's arithmetic problems ({DATASETS[name]})",
        )
