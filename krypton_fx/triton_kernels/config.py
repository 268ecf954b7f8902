"""Launch settings of the Triton kernels: one frozen object, changed only in a scope.

No Triton import here: the settings can be read and changed on any machine.

Example:
    >>> from krypton_fx.triton_kernels import current_launch_config, launch_config
    >>> current_launch_config().num_warps
    8
    >>> with launch_config(num_warps=4, max_rows=4) as config:
    ...     config.num_warps, current_launch_config().max_rows
    (4, 4)
    >>> current_launch_config().num_warps
    8
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional

__all__ = ["LaunchConfig", "current_launch_config", "launch_config"]


@dataclass(frozen=True)
class LaunchConfig:
    """How the gather, projection and occlusion kernels split their work.

    A program copies a ``(BLOCK_J, BLOCK_C)`` tile of each of ``ROWS`` output rows of
    one position (see ``_common.py``); these settings pick the tile. The defaults:
    4096 elements (16 KiB of float32) per program and 8 warps (16 elements, four
    128-bit vectors of float32, per thread). Why 8 warps: compiled for sm_90
    (``python -m krypton_fx.triton_kernels.codegen``), a 16x256 tile with 4 warps
    takes 64 registers in float32 (half the SM's warp slots) and spills 24 bytes in
    float16/bfloat16; with 8 warps every kernel needs 26-32 registers, fills all 64
    warp slots and spills nothing. And on an H200 the earlier, flat kernels ran
    fastest with 8 warps in all five bandwidth cases. ``bench/kernel_bandwidth.py
    --sweep`` measures the alternatives.
    """

    tile_elements: int = 4096   # elements per program: BLOCK_J * BLOCK_C * ROWS at most
    max_block_c: int = 256      # widest channel block; the rest of the tile goes to columns
    num_warps: int = 8          # per program; fewer for a tile too small to fill them
    max_rows: int = 1           # rows of one position per program (1: one program a row)
    wide_offsets: bool = False  # int64 in-row offsets even where int32 cannot overflow

    def __post_init__(self) -> None:
        for field in ("tile_elements", "max_block_c", "num_warps", "max_rows"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LaunchConfig.{field} must be an int >= 1, got {value!r}")
        if not isinstance(self.wide_offsets, bool):
            raise ValueError(f"LaunchConfig.wide_offsets must be a bool, got {self.wide_offsets!r}")


# A context variable, not a module attribute: a benchmark sweeping settings in one
# thread does not change the launches of explainers running in others.
_CURRENT: contextvars.ContextVar[LaunchConfig] = contextvars.ContextVar(
    "krypton_fx_launch_config", default=LaunchConfig())  # noqa: B039 (frozen: immutable)


def current_launch_config() -> LaunchConfig:
    """The settings launches use now: the defaults, or those of the innermost
    :func:`launch_config` scope of this thread (or asyncio task)."""
    return _CURRENT.get()


@contextlib.contextmanager
def launch_config(config: Optional[LaunchConfig] = None, /,
                  **changes) -> Iterator[LaunchConfig]:
    """Launch the kernels with other settings inside a ``with`` block.

    Args:
        config: the settings to use; the current ones when None.
        **changes: fields of :class:`LaunchConfig` to change in ``config``.

    Yields:
        The settings in force inside the block.

    Raises:
        TypeError: on an unknown field.
        ValueError: on a value out of range.

    Example:
        >>> with launch_config(tile_elements=16, max_block_c=4) as config:
        ...     config.tile_elements
        16
    """
    new = dataclasses.replace(config if config is not None else _CURRENT.get(), **changes)
    token = _CURRENT.set(new)
    try:
        yield new
    finally:
        _CURRENT.reset(token)
