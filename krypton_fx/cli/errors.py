"""The command line's error policy, shared by every command.

A user error ends the same way everywhere: exit status 2 and one line on
stderr, ``krypton-fx: error: <what is wrong>; <how to fix it>`` -- never a
traceback (``KRYPTON_FX_DEBUG=1`` gives one). Warnings and library log
messages go to stderr too; a command's result goes to stdout.
"""

from __future__ import annotations

import logging
import re
import sys

from ..common import first_line

__all__ = ["PROG", "DEBUG_ENV", "CLIError", "first_line", "warn", "report_error", "attach_log_handler"]

PROG = "krypton-fx"
DEBUG_ENV = "KRYPTON_FX_DEBUG"


class CLIError(Exception):
    """A user error: reported as one line on stderr, exit status 2."""


def one_line(message: str) -> str:
    """``message`` with its line breaks folded into spaces."""
    return re.sub(r"\s*\n\s*", " ", message.strip())


def warn(message: str) -> None:
    print(f"{PROG}: warning: {one_line(message)}", file=sys.stderr, flush=True)


def report_error(message: str) -> None:
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr, flush=True)


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = f"{PROG}: warning: " if record.levelno >= logging.WARNING else f"{PROG}: "
        return prefix + one_line(record.getMessage())


def attach_log_handler(level: int = logging.INFO) -> logging.Handler:
    """Show the library's log messages (``krypton_fx.*`` loggers) on stderr, one line each.

    The library only logs; the command line decides where that goes.
    Returns the handler so that the caller can remove it again.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    root = logging.getLogger("krypton_fx")
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > level:
        root.setLevel(level)
    return handler
