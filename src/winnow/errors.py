"""winnow's exceptions: one short hierarchy; the CLI turns each into one line and an exit code."""

from __future__ import annotations


class WinnowError(Exception):
    """Base of every error winnow reports to the user as one line."""

    exit_code = 1


class ConfigError(WinnowError):
    """An option is unknown, missing or has a bad value."""

    exit_code = 2


class DataError(WinnowError):
    """A dataset cannot be read, or (with --strict) has bad rows."""

    exit_code = 2


class OutputExistsError(WinnowError):
    """The output file exists and neither --resume nor --override_exist_file was given."""

    exit_code = 2


class StoreError(WinnowError):
    """The output (or a file beside it) cannot be written: a full disk, a file size limit, a lost mount."""


class EngineError(WinnowError):
    """An engine cannot be built or has failed as a whole."""


class RewardError(WinnowError):
    """A reward cannot be built, or returned something that breaks its contract."""


class SchedulerError(WinnowError):
    """A multi-turn scheduler (or its tool or environment) raised, or broke its contract."""


class MissingDependency(WinnowError):
    """An optional library is not installed; the message names the extra to install."""

    exit_code = 3

    def __init__(self, module: str, extra: str, what: str = ""):
        self.module = module
        self.extra = extra
        purpose = f" for {what}" if what else ""
        super().__init__(
            f"{module} is needed{purpose} but is not installed; install it with: pip install 'winnow[{extra}]'"
        )


def require(module: str, extra: str, what: str = ""):
    """Import ``module`` or raise :class:`MissingDependency` naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name and module.split(".")[0] != e.name.split(".")[0]:
            raise
        raise MissingDependency(module, extra, what) from None
