"""The command line's error policy, shared by every command.

A user error ends the same way everywhere: exit status 2 and one line on
stderr, ``krypton-fx: error: <what is wrong>; <how to fix it>`` -- never a
traceback (``KRYPTON_FX_DEBUG=1`` gives one). Warnings and library log
messages go to stderr too; a command's result goes to stdout. Other libraries'
chatter stays off the terminal (:func:`native_stderr_to`: Ray's core, into Ray's log folder).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from pathlib import Path
from typing import Iterator

from ..common import first_line

__all__ = ["PROG", "DEBUG_ENV", "CLIError", "first_line", "warn", "report_error", "attach_log_handler",
           "native_stderr_to"]

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


@contextlib.contextmanager
def native_stderr_to(path: Path) -> Iterator[None]:
    """While the block runs, what native code writes to this process's stderr (file descriptor 2:
    Ray's C++ core, say) is appended to ``path``; Python's ``sys.stderr`` -- this command's warnings,
    errors, progress bar and log handler -- keeps the terminal."""
    native = 2
    previous = sys.stderr
    try:
        shared = previous.fileno() == native  # else Python's stderr is apart already (captured, say)
    except (AttributeError, OSError, ValueError):
        shared = False
    if previous is not None:
        previous.flush()
    sink = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    terminal = os.dup(native)
    os.dup2(sink, native)
    os.close(sink)
    handlers, ours = [], None
    if shared:
        ours = io.TextIOWrapper(io.FileIO(terminal, "w", closefd=False), encoding=previous.encoding,
                                errors=previous.errors, line_buffering=True)
        handlers = [h for h in logging.getLogger("krypton_fx").handlers
                    if isinstance(h, logging.StreamHandler) and h.stream is previous]
        sys.stderr = ours
        for handler in handlers:
            handler.setStream(ours)
    try:
        yield
    finally:
        if ours is not None:
            ours.flush()
            sys.stderr = previous
            for handler in handlers:
                handler.setStream(previous)
        os.dup2(terminal, native)
        os.close(terminal)
