"""The ``krypton-fx`` parser and its error policy (:func:`main`).

Every user error ends the same way: exit status 2 and one line on stderr,
``krypton-fx: error: <what is wrong>; <how to fix it>`` -- never a traceback
(set ``KRYPTON_FX_DEBUG=1`` to get one). A many-image run in which some
images failed exits with 1 and a one-line count.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Optional, Sequence

from ..models import ModelLoadError
from . import bench, demo, explain, speedup
from .errors import DEBUG_ENV, PROG, CLIError, attach_log_handler, first_line, report_error

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage block), raised not exited."""

    def error(self, message: str):  # type: ignore[override]
        raise CLIError(f"{message} (see '{self.prog} --help')")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, but not the ``None`` of options whose help says what happens without them."""

    def _get_help_string(self, action):
        if action.default is None or action.help is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The ``krypton-fx`` argument parser (subcommands explain, demo, speedup, bench)."""
    parser = _Parser(prog=PROG, description="Fast occlusion heat maps of CNN predictions (krypton_fx).",
                     epilog="Errors exit with status 2 and one line on stderr; set KRYPTON_FX_DEBUG=1 "
                            "for tracebacks.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in (explain, demo, speedup, bench):
        command.add_parser(sub, _HelpFormatter)
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``krypton-fx`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Example:
        >>> main(["speedup", "--model", "resnet18", "--size", "64"])  # doctest: +SKIP
        0
    """
    debug = bool(os.environ.get(DEBUG_ENV))
    parser = build_parser()
    handler = attach_log_handler(logging.DEBUG if debug else logging.INFO)
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise CLIError("choose a command: explain, demo, speedup or bench (see 'krypton-fx --help')")
        with warnings.catch_warnings():
            if not debug:  # library deprecation chatter is not for end users
                warnings.simplefilter("ignore")
            return args.run(args)
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    except (CLIError, ModelLoadError) as e:
        report_error(str(e))
        return 2
    except (ValueError, TypeError) as e:  # the library's one-line argument errors
        if debug:
            raise
        report_error(str(e))
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        report_error(f"{type(e).__name__}: {first_line(e)} (unexpected; rerun with "
                     f"{DEBUG_ENV}=1 for the traceback)")
        return 1
    finally:
        logging.getLogger("krypton_fx").removeHandler(handler)
