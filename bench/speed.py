"""Exact incremental occlusion vs naive batched occlusion, side by side.

For each model: the same occlusion positions (a block around the image
centre) and the same batch size, timed in one process one after the other;
prints the measured ratio next to theoretical_speedup (eqs. 16-20) and the
conv multiply-add ratio the incremental graph really executes, plus peak
memory. The naive baseline runs in both memory formats and the faster one is
the reference. --profile adds where the incremental time goes.

    python bench/speed.py                         # VGG16, ResNet18, InceptionV3 on the CPU
    python bench/speed.py --device cuda --batch-size 128
    python bench/speed.py --models vgg16 --positions 256 --profile
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torchvision

import krypton_fx
from krypton_fx.benchmark import measure, time_breakdown

SIZES = {"inception_v3": 299}
GOALS_CPU = {"vgg16": 6.0, "resnet18": 2.0, "inception_v3": 1.6}
GOALS_GPU = {"vgg16": 4.5, "resnet18": 2.0, "inception_v3": 1.3}



def _mib(value):
    """Bytes as MiB; None (not measured: the CPU) stays None."""
    return None if value is None else value / 2**20


def build(name: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    kwargs = {"init_weights": False, "aux_logits": False} if name in ("inception_v3", "googlenet") else {}
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    return model.to(device=device, dtype=dtype)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vgg16,resnet18,inception_v3")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 on CPU, 128 on CUDA")
    p.add_argument("--positions", type=int, default=None,
                   help="positions timed around the centre (default: 128 on CPU, all on CUDA)")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--profile", action="store_true", help="also break the incremental time down by op")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("speed.py: error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    cuda = args.device.startswith("cuda")
    batch = args.batch_size or (128 if cuda else 32)
    positions = args.positions if args.positions is not None else (None if cuda else 128)
    dtype = getattr(torch, args.dtype)
    goals = GOALS_GPU if cuda else GOALS_CPU
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}; torch {torch.__version__}; patch {args.patch}, stride {args.stride}, "
          f"batch {batch}, dtype {args.dtype}")
    header = (f"{'model':14s} {'size':>4s} {'pos':>5s} {'naive s':>8s} {'naive fmt':>9s} {'krypton s':>9s} "
              f"{'speedup':>7s} {'theory':>6s} {'exec':>5s} {'goal':>5s} {'naive MiB':>9s} {'kfx MiB':>8s} "
              f"{'maxdiff':>8s}")
    print(header)
    results = []
    for name in args.models.split(","):
        size = SIZES.get(name, 224)
        model = build(name, args.device, dtype)
        image = torch.randn(3, size, size, generator=torch.Generator().manual_seed(0)).to(args.device, dtype)
        t0 = time.perf_counter()
        ex = krypton_fx.compile(model, patch=args.patch, stride=args.stride, image_size=(size, size),
                                batch_size=batch, device=args.device, backend=args.backend)
        compile_s = time.perf_counter() - t0
        runs = {}
        for channels_last in (False, True):
            runs[channels_last] = measure(model, image, batch_size=batch, positions=positions,
                                          device=args.device, channels_last_naive=channels_last,
                                          explainer=ex, backend=args.backend)
        fmt = min(runs, key=lambda k: runs[k].naive_s)
        m = runs[fmt]
        row = {"model": name, "size": size, "positions": m.positions, "batch_size": batch,
               "naive_s": m.naive_s, "naive_format": "NHWC" if fmt else "NCHW",
               "naive_s_nchw": runs[False].naive_s, "naive_s_nhwc": runs[True].naive_s,
               "incremental_s": m.incremental_s, "speedup": m.naive_s / m.incremental_s,
               "speedup_vs_nchw": runs[False].naive_s / runs[False].incremental_s,
               "theoretical": m.theoretical, "executed_ratio": m.executed_ratio,
               "naive_peak_mib": _mib(m.naive_peak), "incremental_peak_mib": _mib(m.incremental_peak),
               "max_abs_diff": m.max_abs_diff, "compile_s": compile_s, "device": device_name}
        results.append(row)
        print(f"{name:14s} {size:4d} {m.positions:5d} {m.naive_s:8.2f} {row['naive_format']:>9s} "
              f"{m.incremental_s:9.2f} {row['speedup']:6.2f}x {m.theoretical:6.2f} {m.executed_ratio:5.2f} "
              f"{goals.get(name, float('nan')):5.1f} {row['naive_peak_mib'] or float('nan'):9.0f} "
              f"{row['incremental_peak_mib'] or float('nan'):8.0f} {m.max_abs_diff:8.1e}", flush=True)
        if args.profile:
            cats = time_breakdown(ex, image, min(m.positions, 2 * batch), batch)
            total = cats.pop("total") or 1.0
            print("    where krypton time goes: " + ", ".join(
                f"{k} {v / total:5.1%}" for k, v in cats.items()), flush=True)
            row["profile"] = {k: v / total for k, v in cats.items()}
        del ex, model
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print("speedup: naive time / krypton time on the same positions and batch size, against the faster "
          "naive memory format; theory: eqs. 16-20; exec: conv MACs full / executed per position.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
