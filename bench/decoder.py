"""Decoder ops (transposed convs, resampling, pixel shuffle): exact incremental occlusion vs
naive, side by side, on small encoder-decoder nets that end in a classifier head.

For each case: the same block of centre positions and batch size, naive and incremental
timed in interleaved rounds in one process, the minimum of each side kept. Prints the
measured ratio next to theoretical_speedup (eqs. 16-20 with transposed convs, patch at
the centre) and the conv multiply-add ratio the incremental graph executes; --profile
adds where the incremental time goes.

    python bench/decoder.py                          # CPU, one thread
    python bench/decoder.py --cases unet-transpose@128 --rounds 5 --profile
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch import nn

import krypton_fx
from krypton_fx.benchmark import measure, split_breakdown, time_breakdown


def _block(cin: int, cout: int, dims: int) -> nn.Module:
    conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
    return nn.Sequential(conv(cin, cout, 3, 1, 1, bias=False), bn(cout), nn.ReLU(),
                         conv(cout, cout, 3, 1, 1, bias=False), bn(cout), nn.ReLU())


class UNetClassifier(nn.Module):
    """A BasicUNet-shaped net (two 3x3 convs a level, max pool, ``up`` back, skip concat) of
    ``levels`` levels, then global average pooling and a linear head.

    ``up``: ``"transpose"`` (kernel 2, stride 2), ``"bilinear"`` (scale 2, then a 1x1 conv;
    trilinear in 3-D) or ``"nearest"``.
    """

    def __init__(self, up: str = "transpose", dims: int = 2, channels: int = 1, width: int = 16,
                 levels: int = 3, classes: int = 2):
        super().__init__()
        self.dims, self.up_mode = dims, up
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        widths = [width * 2 ** i for i in range(levels + 1)]
        self.down = nn.ModuleList([_block(channels, widths[0], dims)]
                                  + [_block(widths[i], widths[i + 1], dims) for i in range(levels)])
        if up == "transpose":
            t = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
            self.ups = nn.ModuleList([t(widths[i + 1], widths[i], 2, 2) for i in reversed(range(levels))])
        else:
            self.ups = nn.ModuleList([conv(widths[i + 1], widths[i], 1) for i in reversed(range(levels))])
        self.decode = nn.ModuleList([_block(2 * widths[i], widths[i], dims) for i in reversed(range(levels))])
        self.head = nn.Linear(widths[0], classes)

    def forward(self, x):
        pool = F.max_pool2d if self.dims == 2 else F.max_pool3d
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else pool(x, 2))
            skips.append(x)
        skips.pop()
        for up, block in zip(self.ups, self.decode):
            if self.up_mode == "transpose":
                x = up(x)
            else:
                mode = "nearest" if self.up_mode == "nearest" else ("bilinear" if self.dims == 2 else "trilinear")
                x = up(F.interpolate(x, scale_factor=2, mode=mode))
            x = block(torch.cat([x, skips.pop()], 1))
        return self.head(x.mean(tuple(range(2, 2 + self.dims))))


def build(case: str) -> tuple[nn.Module, tuple[int, ...]]:
    """``(model, spatial size)`` of ``unet-UP[-3d][-lLEVELS]@SIZE`` (2 levels unless given)."""
    arch, _, size = case.partition("@")
    parts = arch.split("-")
    dims = 3 if "3d" in parts else 2
    levels = next((int(p[1:]) for p in parts if p.startswith("l") and p[1:].isdigit()), 2)
    torch.manual_seed(0)
    model = UNetClassifier(up=parts[1], dims=dims, levels=levels).eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model, (int(size),) * dims


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="unet-transpose@128,unet-bilinear@128,unet-nearest@128,"
                                      "unet-transpose@256,unet-transpose-l3@256,unet-transpose-3d@48")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: the machine is shared)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--positions", type=int, default=32, help="centre positions timed (a multiple of the batch)")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the minimum of each side is kept")
    p.add_argument("--profile", action="store_true", help="also break the incremental time down by op")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"device: CPU ({torch.get_num_threads()} thread(s)); torch {torch.__version__}; batch {args.batch_size}, "
          f"{args.positions} centre positions, {args.rounds} interleaved rounds (min of each)")
    print(f"{'case':24s} {'patch':>5s} {'naive s':>8s} {'krypton s':>9s} {'speedup':>8s} {'theory':>7s} "
          f"{'% theory':>8s} {'exec MAC':>8s} {'maxdiff':>8s}")
    results = []
    for case in args.cases.split(","):
        model, size = build(case)
        patch = min(args.patch, size[0] // 3)
        image = torch.randn(1, *size, generator=torch.Generator().manual_seed(0))
        ex = krypton_fx.compile(model, patch=patch, stride=args.stride, image_size=size, channels=1,
                                batch_size=args.batch_size)
        best = None
        for r in range(args.rounds):  # each round times naive, then incremental
            m = measure(model, image, patch=patch, stride=args.stride, batch_size=args.batch_size,
                        positions=args.positions, explainer=ex, warmup=(r == 0))
            if best is None:
                best = m
            best.naive_s, best.incremental_s = min(best.naive_s, m.naive_s), min(best.incremental_s, m.incremental_s)
        speedup = best.naive_s / best.incremental_s
        print(f"{case:24s} {patch:>5d} {best.naive_s:8.3f} {best.incremental_s:9.3f} {speedup:7.2f}x "
              f"{best.theoretical:7.2f} {speedup / best.theoretical:8.0%} {best.executed_ratio:8.2f} "
              f"{best.max_abs_diff:8.1e}", flush=True)
        row = {"case": case, "size": size, "patch": patch, "stride": args.stride, "positions": best.positions,
               "batch_size": best.batch_size, "naive_s": best.naive_s, "incremental_s": best.incremental_s,
               "speedup": speedup, "theoretical": best.theoretical, "executed_ratio": best.executed_ratio,
               "max_abs_diff": best.max_abs_diff}
        if args.profile:
            row["breakdown_s"], shares = split_breakdown(time_breakdown(ex, image, args.positions, args.batch_size))
            print("    incremental time: " + shares, flush=True)
        results.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
