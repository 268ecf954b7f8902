"""Memory bandwidth of the gather / projection / occlusion Triton kernels.

Each kernel is a copy: it reads every output element once (from the stored map
or the patch) and writes it once. The script times each kernel on realistic
shapes (images, and volumes: 3 spatial axes) with
``triton.testing.do_bench_cudagraph`` next to a device-to-device copy of the same
number of bytes and next to the torch implementation, and prints::

    kernel | shape | MB moved | triton ms | GB/s | % of copy | torch ms | torch/triton

Usage (from the repository root)::

    python bench/kernel_bandwidth.py [--dtype float32|float16|bfloat16]

Without a CUDA device it prints a note and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402


@dataclass
class Case:
    """One kernel launch to time."""

    kernel: str                     # which op
    shape: str                      # what the shapes are, for the table
    triton_fn: Callable[[], torch.Tensor]
    torch_fn: Callable[[], torch.Tensor]
    channels: int                   # C, output row width and height: they pick the
    width: int                      # kernels' (ROWS, BLOCK_J, BLOCK_C) tile
    height: int


def _positions(batch: int, full: int, window: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` window starts spread over ``[0, full - window]``, as a sliding patch gives."""
    return torch.randint(0, full - window + 1, (batch,), generator=gen)


def _channels_last(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random CUDA tensor of ``shape`` (N, C, *spatial), memory ordered (N, *spatial, C)."""
    n, c, *spatial = shape
    return torch.randn(n, *spatial, c, generator=gen).to("cuda", dtype).movedim(-1, 1)


def _gather_case(c: int, hw: int, pad: int, batch: int, window: int, patch: int,
                 dtype: torch.dtype, gen: torch.Generator, axes: int = 2) -> Case:
    """Gather with superimposition on a padded channels-last stored map with ``axes``
    spatial axes, each ``hw`` long (plus padding)."""
    from krypton_fx.triton_kernels.gather import gather_window_triton
    from krypton_fx.triton_kernels.reference import gather_window_torch

    full = hw + 2 * pad
    stored = _channels_last((1, c) + (full,) * axes, dtype, gen)
    patches = _channels_last((batch, c) + (patch,) * axes, dtype, gen)
    off = (window - patch) // 2
    table = torch.stack([_positions(batch, full, window, gen) for _ in range(axes)]
                        + [torch.full((batch,), off)] * axes, 1).cuda()
    win = (window,) * axes
    size = ",".join([str(full)] * axes)
    return Case("gather_window", f"stored (1,{c},{size}) B={batch} win {window}^{axes} "
                f"patch {patch}^{axes}",
                lambda: gather_window_triton(stored, patches, table, win),
                lambda: gather_window_torch(stored, patches, table, win), c, window, window)


def _projection_case(c: int, hw: int, batch: int, patch: int, dtype: torch.dtype,
                     gen: torch.Generator, axes: int = 2) -> Case:
    """Projection of a patch into the full map before the first global op."""
    from krypton_fx.triton_kernels.projection import project_to_full_triton
    from krypton_fx.triton_kernels.reference import project_to_full_torch

    stored = _channels_last((1, c) + (hw,) * axes, dtype, gen)
    patches = _channels_last((batch, c) + (patch,) * axes, dtype, gen)
    starts = torch.stack([_positions(batch, hw, patch, gen) for _ in range(axes)], 1).cuda()
    size = ",".join([str(hw)] * axes)
    return Case("project_to_full", f"stored (1,{c},{size}) B={batch} patch {patch}^{axes}",
                lambda: project_to_full_triton(stored, patches, starts),
                lambda: project_to_full_torch(stored, patches, starts), c, hw, hw)


def _occlusion_case(hw: int, batch: int, window: int, patch: int, dtype: torch.dtype,
                    gen: torch.Generator) -> Case:
    """Input occlusion of a contiguous (NCHW) image, as the model input arrives."""
    from krypton_fx.triton_kernels.occlusion import occlude_window_triton
    from krypton_fx.triton_kernels.reference import occlude_window_torch

    image = torch.randn(1, 3, hw, hw, generator=gen).to("cuda", dtype)
    color = torch.zeros(3, device="cuda")
    if window == hw:  # full image: the naive occlusion batch
        wy = wx = torch.zeros(batch, dtype=torch.int64)
        oy, ox = _positions(batch, hw, patch, gen), _positions(batch, hw, patch, gen)
    else:
        wy, wx = _positions(batch, hw, window, gen), _positions(batch, hw, window, gen)
        oy = ox = torch.full((batch,), (window - patch) // 2)
    table = torch.stack([wy, wx, oy, ox], 1).cuda()
    win, phw = (window, window), (patch, patch)
    return Case("occlude_window", f"image (1,3,{hw},{hw}) B={batch} win {window}^2 patch {patch}^2",
                lambda: occlude_window_triton(image, color, table, win, phw),
                lambda: occlude_window_torch(image, color, table, win, phw), 3, window,
                window)


def _cases(dtype: torch.dtype) -> list[Case]:
    gen = torch.Generator().manual_seed(0)
    return [
        # VGG16 conv1_2 after a 16x16 patch: 18x18 changed, 20x20 read with 3x3 kernels.
        _gather_case(64, 224, 1, 128, 20, 18, dtype, gen),
        # ResNet-style layer1: 56x56x256.
        _gather_case(256, 56, 1, 128, 14, 12, dtype, gen),
        # Projection before the pooling of a VGG16-like 14x14x512 map.
        _projection_case(512, 14, 128, 6, dtype, gen),
        _occlusion_case(224, 128, 18, 16, dtype, gen),
        _occlusion_case(224, 128, 224, 16, dtype, gen),
        # Volumes: a 16^3 window of 64 channels (a 14^3 patch) from a 48^3 map, and the
        # projection of a 12^3 map of 256 channels before its global pool.
        _gather_case(64, 46, 1, 32, 16, 14, dtype, gen, axes=3),
        _projection_case(256, 12, 32, 4, dtype, gen, axes=3),
    ]


def _time_ms(fn) -> float:
    """Median GPU time of ``fn`` replayed from a CUDA graph.

    The incremental graph runs under CUDA-graph replay, so launch overhead is
    not what a kernel costs there; the copy and torch are timed the same way.
    """
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def _copy_ms(nbytes: int) -> float:
    """Time of a device-to-device copy that reads and writes ``nbytes`` bytes in total."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return _time_ms(lambda: dst.copy_(src))


# (tile elements, warps, most rows per program) to try with --sweep. A program
# copies a (BLOCK_J, BLOCK_C) tile of each of ROWS output rows of one position;
# block_sizes splits the tile elements between a row's columns and channels
# (channels first, up to LaunchConfig.max_block_c), and rows fill what a short row
# leaves of the budget, up to the given most. The printed
# [ROWS x BLOCK_J x BLOCK_C, warps] shows what each case got.
SWEEP = [(2048, 4, 1), (4096, 4, 1), (2048, 8, 1), (4096, 8, 1), (8192, 8, 1),
         (8192, 8, 4), (16384, 8, 8), (16384, 16, 8)]


def _tile_shape(case: Case) -> str:
    """``ROWS x BLOCK_J x BLOCK_C, warps`` the current launch config gives ``case``."""
    from krypton_fx.triton_kernels import current_launch_config
    from krypton_fx.triton_kernels._common import block_sizes, num_warps, rows_per_program

    config = current_launch_config()
    block_j, block_c = block_sizes(case.channels, case.width, config)
    rows = rows_per_program(case.height, block_j, block_c, config)
    return f"{rows}x{block_j}x{block_c}, {num_warps(block_j, block_c, config)} warps"


def _best_config(case: Case) -> tuple[float, str]:
    """Fastest launch config of SWEEP for ``case``, as (ms, tile description)."""
    from krypton_fx.triton_kernels import launch_config

    best = (float("inf"), "")
    for tile, warps, rows in SWEEP:
        with launch_config(tile_elements=tile, num_warps=warps, max_rows=rows):
            case.triton_fn()
            best = min(best, (_time_ms(case.triton_fn), f"tile {tile} = {_tile_shape(case)}"))
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--sweep", action="store_true", help="also try other tile sizes / warps")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: kernel bandwidth check skipped")
        return 0

    dtype = getattr(torch, args.dtype)
    print(f"device: {torch.cuda.get_device_name()}  dtype: {args.dtype}")
    header = (f"{'kernel':<16} {'shape':<56} {'MB moved':>9} {'triton ms':>10} {'GB/s':>8} "
              f"{'% copy':>7} {'torch ms':>9} {'torch/triton':>12}")
    print(header)
    print("-" * len(header))
    failures = 0
    for case in _cases(dtype):
        out = case.triton_fn()
        expected = case.torch_fn()
        try:  # a copy must be exact; a wrong kernel's speed means nothing
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
        except AssertionError as e:
            failures += 1
            print(f"{case.kernel:<16} {case.shape:<56} MISMATCH vs torch: {e}".splitlines()[0])
            continue
        nbytes = 2 * out.numel() * out.element_size()  # each element read once, written once
        triton_ms = _time_ms(case.triton_fn)
        torch_ms = _time_ms(case.torch_fn)
        copy_ms = _copy_ms(nbytes)
        best_ms, best_tile = _best_config(case) if args.sweep else (triton_ms, "")
        gbs = nbytes / (triton_ms * 1e-3) / 1e9
        print(f"{case.kernel:<16} {case.shape:<56} {nbytes / 1e6:>9.1f} {triton_ms:>10.4f} "
              f"{gbs:>8.1f} {100 * copy_ms / triton_ms:>6.1f}% {torch_ms:>9.4f} "
              f"{torch_ms / triton_ms:>11.2f}x"
              + (f"  [{_tile_shape(case)}]  best {100 * copy_ms / best_ms:5.1f}% at {best_tile}"
                 if args.sweep else f"  [{_tile_shape(case)}]"),
              flush=True)
        del out, expected
    print("% copy: device-to-device copy time of the same bytes / kernel time (100% = copy speed); "
          "all timed by CUDA-graph replay (triton.testing.do_bench_cudagraph)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
