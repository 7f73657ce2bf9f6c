"""The ``winnow`` command: ``sample``, ``serve`` (alias ``deploy``), ``report``, ``list``.

One handler turns winnow's errors into one line and an exit code; tracebacks only with --debug.
Nothing heavy is imported here: ``winnow --help`` needs neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NoReturn

from winnow import __version__
from winnow.config import ReportConfig, SampleConfig, ServeConfig, build_parser, parse_args
from winnow.errors import WinnowError

COMMANDS = {
    "sample": "Sample N completions per prompt, score them, keep the best, write JSONL.",
    "serve": "Serve a model or reward model over an OpenAI-compatible API (alias: deploy).",
    "report": "Scaling table and plots (pass@k, majority@k, best-of-k, vs tokens) from raw outputs.",
    "list": "List components: winnow list [engines|rewards|formats|strategies|...] [--external_plugins F.py].",
}


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line and exits with 2."""

    def error(self, message: str) -> NoReturn:  # noqa: D401 - argparse's name
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.__class__ = _OneLineParser
    return parser


def _usage() -> str:
    lines = [
        f"winnow {__version__}: sample, score and select LLM completions at scale.",
        "",
        "usage: winnow <command> [options]",
        "",
        "commands:",
    ]
    lines += [f"  {name:<8} {text}" for name, text in COMMANDS.items()]
    lines += ["", "winnow <command> --help shows a command's options."]
    return "\n".join(lines)


def sampling_main(args: SampleConfig | list[str] | None = None):
    """swift's ``sampling_main`` shape: a config, a list of CLI arguments, or None for sys.argv."""
    from winnow.pipeline import sample

    if isinstance(args, SampleConfig):
        return sample(args)
    config = parse_args(
        SampleConfig, list(sys.argv[1:] if args is None else args), "winnow sample", SampleConfig.__doc__ or ""
    )
    return sample(config)


def _parse(cls, argv: list[str], prog: str, description: str):
    if argv and argv[0].endswith((".yaml", ".yml", ".json")) and not argv[0].startswith("-"):
        argv = ["--config", argv[0], *argv[1:]]  # swift's `swift sample config.yaml`
    parser = _one_line(build_parser(cls, prog, description))
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        raise SystemExit(0)
    return parse_args(cls, argv, prog, description, parser=parser)  # bad flags: one line, exit 2


def cmd_sample(argv: list[str]) -> int:
    from winnow.pipeline import sample

    config = _parse(SampleConfig, argv, "winnow sample", "Sample N completions per prompt, score, select, write.")
    summary = sample(config)
    print(summary.line(), file=sys.stderr)
    if summary.status == "interrupted":
        return 130
    if summary.rows_total and not summary.totals.get("lines"):
        where = f" and in {summary.failed_file}" if summary.totals.get("failed") else ""
        print(
            f"winnow sample: WARNING: the output has no lines: every row failed or was filtered; the reasons are "
            f"in the summary above{where}",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_serve(argv: list[str]) -> int:
    config = _parse(ServeConfig, argv, "winnow serve", "Serve a model over an OpenAI-compatible API.")
    try:
        from winnow.serve.app import run_server
    except ImportError as e:
        raise WinnowError(f"winnow serve is not available in this build ({e})") from None
    return run_server(config) or 0


def cmd_report(argv: list[str]) -> int:
    from winnow.report import report

    config = _parse(ReportConfig, argv, "winnow report", ReportConfig.__doc__ or "")
    report(config, out=print, log=lambda line: print(line, file=sys.stderr))
    return 0


LIST_KINDS = {
    "engines": "engine",
    "rewards": "reward",
    "rm_styles": "rm_style",
    "formats": "format",
    "strategies": "strategy",
    "schedulers": "scheduler",
    "tools": "tool",
    "environments": "environment",
    "models": "model",
    "datasets": "dataset",
}


def cmd_list(argv: list[str]) -> int:
    """``winnow list [KIND] [--external_plugins F.py ...]``: every registered component, with its one-line doc."""
    from winnow.registry import KINDS, REGISTRY

    plugins = argv[argv.index("--external_plugins") + 1 :] if "--external_plugins" in argv else []
    wanted = [a for a in argv[: argv.index("--external_plugins")] if a] if plugins else argv
    for path in plugins:
        REGISTRY.load_file(path)
    kinds = [LIST_KINDS.get(w, w) for w in wanted] or list(KINDS)
    for kind in kinds:
        if kind not in KINDS:
            raise WinnowError(f"winnow list {kind!r}: use one of {', '.join(LIST_KINDS)}")
        entries = REGISTRY.of_kind(kind)
        if len(kinds) > 1:
            plural = next(word for word, k in LIST_KINDS.items() if k == kind)
            print(f"{plural} ({KINDS[kind]}):")
        for entry in entries:
            print(f"  {entry.name:<22} {entry.summary}" if len(kinds) > 1 else f"{entry.name:<22} {entry.summary}")
        if kind == "reward":
            hint = (
                "<classifier RM or PRM>",
                "a reward model's directory, hub id or http(s) URL: --orm_model/--prm_model/--reward_model PATH",
            )
            print(f"  {hint[0]:<22} {hint[1]}" if len(kinds) > 1 else f"{hint[0]:<22} {hint[1]}")
    return 0


HANDLERS = {"sample": cmd_sample, "serve": cmd_serve, "deploy": cmd_serve, "report": cmd_report, "list": cmd_list}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"winnow {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in HANDLERS:
        print(
            f"winnow: error: unknown command {command!r}; use one of {', '.join(HANDLERS)} (see winnow --help)",
            file=sys.stderr,
        )
        return 2
    debug = "--debug" in rest and _flag_value(rest, "--debug") or os.environ.get("WINNOW_DEBUG") == "1"
    try:
        return HANDLERS[command](rest)
    except WinnowError as e:
        if debug:
            raise
        from winnow.redact import Redactor

        print(f"winnow {command}: error: {Redactor.for_values(rest).text(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"winnow {command}: stopped; what was written is kept (resume with --resume true)", file=sys.stderr)
        return 130


def _flag_value(argv: list[str], flag: str) -> Any:
    i = argv.index(flag)
    return i + 1 >= len(argv) or argv[i + 1].lower() not in ("false", "0", "no")


if __name__ == "__main__":
    raise SystemExit(main())
