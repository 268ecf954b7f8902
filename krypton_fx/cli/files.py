"""Output files and folders of the command line: checked before the long work, written atomically.

Output paths are checked for writability before anything slow starts; files
are written to a temporary name next to the target and renamed into place
only once everything succeeded (:func:`krypton_fx.atomic.write_atomically`),
so a failed run leaves no output file behind. An output never overwrites an
input, and a symbolic link is written through.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Sequence

from ..atomic import write_atomically
from .errors import CLIError

__all__ = ["probe_writable", "output_file", "output_dir", "write_files", "save_figure", "PICTURE_FORMATS"]

# Formats every matplotlib Agg install writes (listed, not asked for: importing
# matplotlib before the cheap checks would slow down every failing call).
PICTURE_FORMATS = ("png", "jpg", "jpeg", "tif", "tiff", "webp", "pdf", "svg", "eps")

write_files = write_atomically


def probe_writable(directory: Path, what: str) -> None:
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".krypton-fx-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CLIError(f"cannot write {what}: {e.strerror or e} in {directory}; "
                       "choose a writable location") from None


def output_file(text: str, option: str, formats: Optional[Sequence[str]] = None,
                inputs: Sequence[str] = (), example: str = "heat.png") -> Path:
    """Check, before any long work, that ``text`` can be written as a file.

    A symbolic link is written through (the link stays, its target gets the
    new content); a path that is one of ``inputs`` is refused.
    """
    path = Path(text).expanduser()
    if path.is_dir():
        raise CLIError(f"{option} {text} is a directory; give a file name such as {path / example}")
    for name in inputs:
        if Path(os.path.realpath(path)) == Path(os.path.realpath(Path(name).expanduser())):
            raise CLIError(f"{option} {text} is the input {name}; krypton-fx never overwrites an input: "
                           "give another output name")
    if formats is not None and path.suffix.lower().lstrip(".") not in formats:
        raise CLIError(f"{option} {text}: unknown picture format {path.suffix or '(none)'!r}; "
                       f"use a name ending in .png (or one of {', '.join(formats)})")
    parent = Path(os.path.realpath(path)).parent
    if not parent.is_dir():
        raise CLIError(f"cannot write {option} {text}: directory {parent} does not exist; "
                       "create it first or choose another path")
    probe_writable(parent, f"{option} {text}")
    return path


@contextlib.contextmanager
def output_dir(text: str, option: str) -> Iterator[Path]:
    """A writable output directory; one this run created is removed again if the run fails empty."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise CLIError(f"{option} {text} exists and is not a directory; choose another path")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create {option} directory {text}: {e.strerror or e}; "
                       "choose a writable location") from None
    try:
        probe_writable(path, f"{option} {text}")
        yield path
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()  # only if still empty
        raise


def save_figure(fig, fmt: str, f: BinaryIO) -> None:
    fig.savefig(f, format=fmt)
