"""What the kernels compile to on an NVIDIA GPU, checked without one.

The kernels' speed rests on two properties of their generated code: the
contiguous channel run of a channels-last row moves in 128-bit vectors, and
there is no integer division per element (only one or two per program, to
decode its row). Both can be read from the PTX, and PTX needs no GPU: Triton
compiles for any architecture ahead of time. This module runs the real launchers
on CPU tensors with the launch recorded instead (``ahead.recording``), so each kernel is specialised exactly
as a real launch of that shape would be (dtypes, alignment, unit and 16-divisible
strides, the tile ``block_sizes`` picks), compiles it for the target, and reads
the PTX and the cubin's resource usage::

    python -m krypton_fx.triton_kernels.codegen            # sm_90 table
    python -m krypton_fx.triton_kernels.codegen --check    # exit 1 if a property fails

Must run without ``TRITON_INTERPRET`` (the interpreter replaces the kernels).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

__all__ = ["KernelCode", "ptx_stats", "occupancy", "specialisation", "compile_cases", "main"]


@dataclass(frozen=True)
class KernelCode:
    """One compiled kernel variant and what its code does."""

    case: str               # kernel, dtype and shape
    tile: str               # ROWS x BLOCK_J x BLOCK_C
    vector_bits: frozenset  # widths of the data loads and stores, in bits
    scalar_data: int        # data loads/stores narrower than 128 bits
    divisions: int          # integer div/rem instructions in the whole kernel
    warps: int              # per program
    registers: int          # per thread, from the cubin
    stack: int              # bytes per thread, from the cubin: register spills
    axes: int = 2           # spatial axes of the maps (the kernel's AXES)

    @property
    def occupancy(self) -> float:
        """Warp slots of an SM these programs can fill (see :func:`occupancy`)."""
        return occupancy(self.registers, self.warps)

    @property
    def allowed_divisions(self) -> int:
        """Integer divisions the row decode needs, once per program: one per axis that
        grid axis 0 holds besides the position, ``axes - 1``. It holds ``b`` for 1
        axis (one row per position: none), ``(b, i)`` for 2 (one), ``(b, d, i)`` for 3
        (two). Anything more is per-element work."""
        return self.axes - 1

    def problems(self, vectorised: bool) -> list[str]:
        """What breaks the kernels' properties: no division but the row decode's
        (:attr:`allowed_divisions`); where the layout allows it, only 128-bit data
        accesses; no spills."""
        found = []
        if self.divisions > self.allowed_divisions:
            found.append(f"{self.divisions} integer divisions ({self.allowed_divisions} "
                         f"expected: the row decode)")
        if vectorised and (self.scalar_data or self.vector_bits != {128}):
            found.append(f"data accesses of {sorted(self.vector_bits)} bits, "
                         f"{self.scalar_data} narrower than 128")
        if self.stack:
            found.append(f"{self.stack} bytes of stack (register spills)")
        return found


_ACCESS = re.compile(r"^\s*(@!?%p\d+\s+)?(ld|st)\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.b(\d+)\s+(.*)$",
                     re.M)


def ptx_stats(ptx: str) -> tuple[frozenset, int, int]:
    """``(vector_bits, scalar_data, divisions)`` of a kernel's PTX.

    Data accesses are global loads/stores except unpredicated scalar loads: a
    program's own scalars (the int64 table entries, an occlusion's float32 scale),
    loaded once, unmasked; every per-element load and store is masked, so
    predicated. ``vector_bits`` holds each data access's width (``v4.b32`` is 128);
    ``scalar_data`` counts those under 128 bits; ``divisions`` counts ``div``/``rem``
    instructions of any integer type.

    Example:
        >>> bits, narrow, divisions = ptx_stats("ld.global.b64 { %rd1 }, [ %rd2 + 0 ];\\n"
        ...     "@%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd5 + 0 ];\\n"
        ...     "st.global.b16 [ %rd6 + 0 ], %rs1;\\ndiv.s32 %r6, %r7, %r8;")
        >>> sorted(bits), narrow, divisions
        ([16, 128], 1, 1)
    """
    widths = []
    for predicate, op, lanes, bits, _ in _ACCESS.findall(ptx):
        if op == "ld" and not lanes and not predicate:
            continue  # a per-program scalar
        widths.append(int(lanes or 1) * int(bits))
    divisions = len(re.findall(r"^\s*(?:@%p\d+\s+)?(?:div|rem)\.(?:[su]\d+|full)", ptx, re.M))
    return frozenset(widths), sum(w < 128 for w in widths), divisions


def _bind(kernel, args: tuple, kwargs: dict, arch: int):
    """Triton's own binder for ``sm_<arch>`` applied to one launch: ``(target, backend,
    bound arguments, specialisation, options)``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    return (target, backend, *binder(*args, **kwargs))


def specialisation(kernel, args: tuple, kwargs: dict, arch: int = 90) -> tuple[str, str, str]:
    """What tells one compiled variant of ``kernel`` from another for this launch (its
    name, specialisation and options, as Triton's launcher keys its cache)."""
    _, _, _, specialization, options = _bind(kernel, args, kwargs, arch)
    return kernel.fn.__name__, str(specialization), str(options)


def _compile(kernel, args: tuple, kwargs: dict, arch: int):
    """Compile one recorded launch for ``sm_<arch>``, specialised as Triton's launcher
    would specialise it (its own binder and argument packing)."""
    from triton.compiler import ASTSource, compile

    target, backend, bound, specialization, options = _bind(kernel, args, kwargs, arch)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                              specialization, options)
    return compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                   options=options.__dict__)


def _resources(cubin: bytes) -> tuple[int, int]:
    """``(registers per thread, stack bytes per thread)`` of the compiled kernel, as
    ``cuobjdump --dump-resource-usage`` reads them from the cubin Triton built.
    Stack in a kernel without local arrays is register spills."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        report = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path],
                                capture_output=True, text=True, check=True).stdout
    usage = re.search(r"REG:(\d+)\s+STACK:(\d+)", report)
    if usage is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{report}")
    return int(usage.group(1)), int(usage.group(2))


def occupancy(registers: int, warps: int) -> float:
    """Fraction of an sm_80/sm_90 SM's 64 warp slots that programs of ``warps`` warps
    using ``registers`` per thread can fill: 64K registers, allocated per warp
    in units of 256, and at most 32 programs per SM.

    Example:
        >>> occupancy(32, 8), occupancy(64, 4), occupancy(40, 4)
        (1.0, 0.5, 0.75)
    """
    per_warp = -(-registers * 32 // 256) * 256
    programs = min(32, 65536 // (per_warp * warps))
    return min(64, programs * warps) / 64


def _cases() -> list[tuple[str, bool, int, Callable[[], object]]]:
    """``(description, vectorised, axes, launch)``: realistic layers in every dtype.
    ``vectorised`` says whether the layout allows 128-bit accesses throughout
    (channels-last maps with 16-divisible channels; not a 1- or 3-channel
    channels-first input image)."""
    from .gather import gather_window_triton
    from .occlusion import occlude_window_triton
    from .projection import project_to_full_triton

    def maps(batch, c, size, patch, dtype):
        """Channels-last stored map ``(1, c, *size)`` and patches ``(batch, c, *patch)``."""
        stored = torch.zeros(1, c, *size, dtype=dtype)
        patches = torch.zeros(batch, c, *patch, dtype=dtype)
        return stored.movedim(1, -1).contiguous().movedim(-1, 1), \
            patches.movedim(1, -1).contiguous().movedim(-1, 1)

    def table(axes):
        return torch.zeros(8, 2 * axes, dtype=torch.int64)

    # (description, vectorised, axes, launch): each launch is a launcher with its arguments.
    cases: list[tuple[str, bool, int, Callable[[], object]]] = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        name = str(dtype)[6:]
        # VGG16 conv1_2 (64 channels, 20-wide window of an 18-wide patch), ResNet layer1
        # (256, 14 of 12), a late layer (512, 6 of 4).
        for c, hw, window, patch in ((64, 226, 20, 18), (256, 58, 14, 12), (512, 16, 6, 4)):
            stored, patches = maps(8, c, (hw, hw), (patch, patch), dtype)
            cases.append((f"gather {name} C={c} window {window}", True, 2,
                          partial(gather_window_triton, stored, patches, table(2), (window, window))))
        stored, _ = maps(8, 64, (58, 58), (1, 1), dtype)
        cases.append((f"gather {name} C=64 no patch", True, 2,
                      partial(gather_window_triton, stored, None, table(2), (14, 14))))
        stored, patches = maps(8, 512, (14, 14), (6, 6), dtype)
        cases.append((f"project {name} C=512 14x14", True, 2,
                      partial(project_to_full_triton, stored, patches,
                              torch.zeros(8, 2, dtype=torch.int64))))
        image = torch.zeros(1, 3, 224, 224, dtype=dtype)
        cases.append((f"occlude {name} NCHW C=3", False, 2,
                      partial(occlude_window_triton, image, torch.zeros(3), table(2), (18, 18),
                              (16, 16))))
        # Volumes: a 16^3 window of 64 channels (patch 14^3), a 12^3 map of 256 channels
        # projected, a one-channel NCDHW scan occluded with a gaussian profile (MONAI).
        stored, patches = maps(8, 64, (20, 20, 20), (14, 14, 14), dtype)
        cases.append((f"gather3d {name} C=64 window 16", True, 3,
                      partial(gather_window_triton, stored, patches, table(3), (16, 16, 16))))
        stored, patches = maps(8, 256, (12, 12, 12), (4, 4, 4), dtype)
        cases.append((f"project3d {name} C=256 12^3", True, 3,
                      partial(project_to_full_triton, stored, patches,
                              torch.zeros(8, 3, dtype=torch.int64))))
        image = torch.zeros(1, 1, 40, 40, 40, dtype=dtype)
        cases.append((f"occlude3d {name} C=1 gaussian", False, 3,
                      partial(occlude_window_triton, image, torch.zeros(1), table(3),
                              (18, 18, 18), (16, 16, 16), weight=torch.ones(1, 16, 16, 16))))
    # Signals (one spatial axis) and the other occlusion modes, in float32.
    stored, patches = maps(8, 64, (300,), (18,), torch.float32)
    cases.append(("gather1d float32 C=64 window 20", True, 1,
                  partial(gather_window_triton, stored, patches, table(1), (20,))))
    cases.append(("occlude float32 C=3 mean_patch", False, 2,
                  partial(occlude_window_triton, torch.zeros(1, 3, 224, 224), torch.zeros(3),
                          table(2), (18, 18), (16, 16), scale=torch.ones(8))))
    image, weight = maps(1, 16, (24, 24, 24), (8, 8, 8), torch.float32)
    cases.append(("occlude3d float32 C=16 weight, scale", True, 3,
                  partial(occlude_window_triton, image, torch.zeros(16), table(3), (10, 10, 10),
                          (8, 8, 8), weight=weight[0], scale=torch.ones(8))))
    # Feature ablation: a segment of a one-row label map (read for every channel) in an RGB
    # image, and of a volume's labels with a baseline volume.
    labels = torch.zeros(1, 1, 224, 224, dtype=torch.int64)
    cases.append(("occlude float32 C=3 segment", False, 2,
                  partial(occlude_window_triton, torch.zeros(1, 3, 224, 224), torch.zeros(3),
                          table(2), (18, 18), (16, 16), ids=labels,
                          segment=torch.zeros(8, dtype=torch.int64))))
    volume = torch.zeros(1, 1, 40, 40, 40)
    cases.append(("occlude3d float32 C=1 seg. baseline", False, 3,
                  partial(occlude_window_triton, volume, torch.zeros(1), table(3), (18, 18, 18),
                          (16, 16, 16), ids=torch.zeros(1, 1, 40, 40, 40, dtype=torch.int64),
                          segment=torch.zeros(8, dtype=torch.int64), baseline=volume)))
    return cases


def compile_cases(arch: int = 90) -> list[tuple[KernelCode, bool]]:
    """Every case of :func:`_cases` compiled for ``sm_<arch>``: ``(code, vectorised)``."""
    from .ahead import recording

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels")
    results = []
    for description, vectorised, axes, launch in _cases():
        with recording() as launches:
            launch()
        (kernel, _, args, kwargs), = launches
        compiled = _compile(kernel, args, kwargs, arch)
        ptx = compiled.asm["ptx"]
        bits, scalar, divisions = ptx_stats(ptx)
        registers, stack = _resources(compiled.asm["cubin"])
        tile = f"{kwargs['ROWS']}x{kwargs['BLOCK_J']}x{kwargs['BLOCK_C']}"
        results.append((KernelCode(description, tile, bits, scalar, divisions, kwargs["num_warps"],
                                   registers, stack, axes), vectorised))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90,
                        help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless every kernel keeps its properties")
    parser.add_argument("--max-rows", type=int, default=None,
                        help="rows per program at most (default: the kernels' own setting)")
    parser.add_argument("--tile", type=int, default=None,
                        help="elements per program (default: the kernels' own setting)")
    parser.add_argument("--warps", type=int, default=None,
                        help="warps per program (default: the kernels' own setting)")
    args = parser.parse_args(argv)
    from .config import launch_config

    changes = {name: value for name, value in (("max_rows", args.max_rows),
                                               ("tile_elements", args.tile),
                                               ("num_warps", args.warps)) if value is not None}
    for name, value in changes.items():
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    failures = 0
    print(f"{'kernel':<38} {'tile':<10} {'warps':>5} {'data bits':<10} {'<128':>5} {'div':>4} "
          f"{'regs':>5} {'stack':>6} {'occup.':>7}  problems")
    with launch_config(**changes):
        compiled = compile_cases(args.arch)
    for code, vectorised in compiled:
        problems = code.problems(vectorised)
        failures += bool(problems)
        bits = ",".join(str(b) for b in sorted(code.vector_bits))
        print(f"{code.case:<38} {code.tile:<10} {code.warps:>5} {bits:<10} {code.scalar_data:>5} "
              f"{code.divisions:>4} {code.registers:>5} {code.stack:>6} {code.occupancy:>6.0%}  "
              f"{'; '.join(problems) or 'none'}")
    print(f"sm_{args.arch}. tile: rows x columns x channels a program copies; data bits: "
          "widths of the data loads/stores; div: integer div/rem instructions (the row decode "
          "may take one per spatial axis after the first: 0, 1, 2 for signals, images, "
          "volumes); regs, stack: per thread, from the cubin; occup.: warp slots of an SM "
          "that programs of these warps and registers can fill (at most 32 programs an SM)")
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
