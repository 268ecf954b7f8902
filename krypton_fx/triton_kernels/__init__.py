"""Gather / projection / occlusion ops: Triton kernels and their torch references.

Layout (only the kernel modules import Triton, so the package imports and runs
on machines without it):

- ``reference.py``: the torch implementations, any number of spatial axes; the
  CPU backend and the tests' reference. No Triton.
- ``config.py``: :class:`LaunchConfig`, the kernels' launch settings, and the
  :func:`launch_config` scope that changes them. No Triton.
- ``_common.py``: launch geometry, shared jit helpers and the launchers' checks.
- ``gather.py``, ``projection.py``, ``occlusion.py``: one op each, a private
  ``@triton.jit`` kernel and its public launcher (1 to 3 spatial axes).
- ``ahead.py``: the launchers' one launch point; recording launches instead of
  running them, and compiling their kernels ahead, in the background.
- ``codegen.py``: what the kernels compile to for sm_90, checked without a GPU.

:mod:`krypton_fx.ops` picks a kernel or its reference per call and imports the
kernel modules only when it launches one.
"""

from .config import LaunchConfig, current_launch_config, launch_config

__all__ = ["LaunchConfig", "current_launch_config", "launch_config"]
