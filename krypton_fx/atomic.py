"""Write files so that a crash never leaves a half-written one (a leaf module: the output folders of
:mod:`krypton_fx.scale`, the command line and ``OcclusionResult.save`` all write through it).

Each file is written to a temporary name in its own directory and renamed
into place (``os.replace`` is atomic within a file system) only once every
file of the group has been written; a failure removes the temporaries. A
path that is a symbolic link is written through: its target gets the new
content, the link stays.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Mapping, Union

__all__ = ["write_atomically", "TEMP_PREFIX"]

# Temporaries start with this, so that a directory listing (and a resumed run) can tell them apart.
TEMP_PREFIX = "."
_TEMP_SUFFIX = ".tmp"

PathLike = Union[str, "os.PathLike[str]"]


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_atomically(writers: Mapping[PathLike, Callable[[BinaryIO], None]]) -> None:
    """Write every file to a temporary name next to it, then rename all into place.

    Args:
        writers: target path -> function writing the content to a binary file object.

    Example:
        >>> write_atomically({"/tmp/a.txt": lambda f: f.write(b"hello")})
        >>> open("/tmp/a.txt").read()
        'hello'
    """
    temps: list[tuple[str, Path]] = []
    umask = _umask()
    try:
        for link, write in writers.items():
            path = Path(os.path.realpath(link))
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.", suffix=_TEMP_SUFFIX)
            temps.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs are ordinary files
        for tmp, path in temps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # only the ones not renamed: after a failure
