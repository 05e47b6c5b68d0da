"""`scalelab <verb>`: the command-line entry point.

Each verb lives in its own module under `scalelab.cli` and exposes `register(subparsers)`,
which adds its parser(s) and sets `func` to a `run(args) -> int | None` function. Verb modules
import nothing heavy at module level (no torch, no matplotlib): `scalelab count --help` must
start instantly. They parse, call the library, and print; the logic lives in the library.

Conventions: human tables on stdout, progress/logs on stderr, `--json`
for one machine-readable object on stdout, `--set KEY=VALUE` overrides. Exit codes: 0 success,
2 bad input (one line, no traceback), 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from typing import Any, Sequence

from scalelab.errors import UserError, describe_os_error
from scalelab.units import format_bytes, format_count, format_duration  # noqa: F401 (re-exported for verbs)

# Verb modules, in the order `scalelab --help` lists them.
VERB_MODULES = [
    "count",
    "plan",
    "fit",
    "tokenizer",
    "prepare",
    "train",
    "sample",
    "eval",
    "plot",
    "hf",
    "demo",
    "sweep",
]


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks; shows an option's default only when it has a real one
    (not None, False or an empty list) and the help text does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if ("%(default)" in help_text or default in (None, False, [], argparse.SUPPRESS)
                or not action.option_strings and action.nargs in ("?", "*")):
            return help_text
        return f"{help_text} (default: %(default)s)"


def add_common_flags(parser: argparse.ArgumentParser, *, json_flag: bool = True, set_flag: bool = True) -> None:
    """The flags every verb shares: `--json` and repeatable `--set KEY=VALUE`."""
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    if set_flag:
        parser.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a config field (repeatable; dotted keys for sections, e.g. train.lr=3e-4)",
        )


def jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, dataclasses and paths into plain JSON values."""
    import dataclasses
    from pathlib import PurePath

    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, PurePath):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy scalar or array
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def print_json(obj: Any) -> None:
    """OBJ as indented JSON on stdout (what `jsonable` cannot convert, e.g. a library's own
    objects in lm-evaluation-harness results, as its str)."""
    json.dump(jsonable(obj), sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="scalelab",
        description="Plan, build and train LLaMA-family language models at compute-optimal scale.",
        formatter_class=HelpFormatter,
        epilog="Example: scalelab count llama3.1-8b --seq-len 8192 --gpus 8 --gpu-type H100 --tokens 15e12",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(f"scalelab.cli.{name}")
        except ModuleNotFoundError as e:  # a verb still being written; skip it
            if e.name == f"scalelab.cli.{name}":
                continue
            _register_broken(sub, name, e)
        except ImportError as e:  # one verb's broken import must not take every other verb down
            _register_broken(sub, name, e)
        else:
            module.register(sub)
    return parser


def _register_broken(sub: argparse._SubParsersAction, name: str, error: ImportError) -> None:
    """A verb whose module failed to import: it answers with the import error (exit 1), the others work."""
    verb = name.replace("_", "-")

    def broken(args: argparse.Namespace) -> int:
        print(f"scalelab {verb}: cannot start: {type(error).__name__}: {error} (a broken or incomplete "
              "installation; reinstall scalelab's dependencies)", file=sys.stderr)
        return 1

    p = sub.add_parser(verb, help=f"(unavailable: {error})", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=broken)


def _say(line: str) -> None:
    """One line to stderr in one write: under torchrun every rank reports the same error into the
    same terminal, and a line written in pieces could interleave with another rank's."""
    sys.stderr.flush()
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except UserError as e:
        _say(f"scalelab {args.verb}: error: {e}")
        return 2
    except KeyboardInterrupt:
        _say(f"scalelab {args.verb}: interrupted")
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # disk full, read-only or missing paths, a directory where a file belongs
        if e.errno is None:
            raise
        _say(f"scalelab {args.verb}: error: {describe_os_error(e)}")
        return 2
    return int(rc or 0)


def leave_torchrun_worker(rc: int) -> int:
    """End a torchrun worker whose work is done (outputs on disk, the process group destroyed)
    with os._exit, skipping interpreter finalization and C++ static destructors; outside torchrun,
    return rc.

    Now and then one gloo rank aborted at exit after a run that had finished cleanly ("terminate
    called without an active exception", seen once in CI on a 2-rank CPU FSDP train, never in over
    100 runs here), and torchrun then reported the whole launch as failed. Leaving without
    finalization removes that window for every verb that runs under torchrun (train, eval).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}


def parse_quantity(text: str, *, name: str = "value") -> float:
    """'1.36e21', '161B', '15T', '2.5M' -> float. Raises UserError on anything else."""
    s = str(text).strip().replace("_", "").replace(",", "")
    mult = 1.0
    if s and s[-1].lower() in _SUFFIXES and not s.lower().endswith("e"):
        mult = _SUFFIXES[s[-1].lower()]
        s = s[:-1]
    try:
        value = float(s) * mult
    except ValueError:
        raise UserError(f"{name} must be a number such as 1.36e21 or 161B, got '{text}'") from None
    if not math.isfinite(value):
        raise UserError(f"{name} must be finite, got '{text}'")
    return value


def print_table(rows: list[tuple[str, str]], title: str | None = None, file=None) -> None:
    """Two aligned columns, a title underlined."""
    file = file or sys.stdout
    if title:
        print(title, file=file)
        print("-" * len(title), file=file)
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}", file=file)
    print(file=file)
