"""Volumes and signals: exact incremental occlusion vs naive, side by side.

MONAI's 3-D ResNet18 and DenseNet121 (random init, 1 input channel) at 64^3
and 96^3, and a 1-D ResNet-style ECG classifier (12 leads, 5000 samples).
For each: the same block of centre positions (every position costs the same)
and the same batch size, naive and incremental timed in interleaved rounds
in one process, the minimum of each kept. Prints the measured ratio next to
theoretical_speedup (eqs. 16-20, patch at the centre) and the conv
multiply-add ratio the incremental graph really executes; peak memory on
CUDA (not measured on the CPU); --profile adds where the incremental time
goes (conv, gather, projection, other).

    python bench/volumes.py                        # CPU, one thread
    python bench/volumes.py --device cuda --batch-size 32 --positions 128
    python bench/volumes.py --cases resnet18@96 --profile
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# bench/monai.py sits beside this script: keep `import monai` from finding it.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import krypton_fx  # noqa: E402
from krypton_fx.benchmark import measure, split_breakdown, time_breakdown  # noqa: E402

# At least 90 % of theory on the CPU (the volumes issue's goals).
GOALS_CPU = {"resnet18@64": 2.4, "resnet18@96": 4.3, "densenet121@64": 1.4}


class ECGResNet(nn.Module):
    """A 1-D ResNet over 12 leads of 5000 samples (the shape of ECG classifiers)."""

    def __init__(self, leads: int = 12, classes: int = 5, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(leads, width, 15, 2, 7, bias=False), nn.BatchNorm1d(width),
                                  nn.ReLU(), nn.MaxPool1d(3, 2, 1))
        blocks, ch = [], width
        for out, stride in ((width, 1), (2 * width, 2), (4 * width, 2), (4 * width, 2)):
            blocks.append(_Block1d(ch, out, stride))
            ch = out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(ch, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool1d(self.blocks(self.stem(x)), 1).flatten(1))


class _Block1d(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv1d(cin, cout, 7, stride, 3, bias=False)
        self.b1 = nn.BatchNorm1d(cout)
        self.c2 = nn.Conv1d(cout, cout, 7, 1, 3, bias=False)
        self.b2 = nn.BatchNorm1d(cout)
        self.down = (nn.Sequential(nn.Conv1d(cin, cout, 1, stride, bias=False), nn.BatchNorm1d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.down(x))


def build(name: str) -> tuple[nn.Module, tuple[int, ...], int]:
    """``(model, spatial size, channels)`` of ``NAME@SIZE``."""
    from monai.networks import nets

    arch, _, size = name.partition("@")
    torch.manual_seed(0)
    if arch == "ecg":
        return ECGResNet().eval(), (int(size or 5000),), 12
    s = int(size)
    if arch == "resnet18":
        return nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=2).eval(), (s, s, s), 1
    if arch == "densenet121":
        return nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2).eval(), (s, s, s), 1
    raise SystemExit(f"volumes.py: error: unknown case {name!r} (resnet18@N, densenet121@N, ecg@N)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="resnet18@64,resnet18@96,densenet121@64,densenet121@96,ecg@5000")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: the machine is shared)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--positions", type=int, default=16, help="centre positions timed (a multiple of the batch)")
    p.add_argument("--patch", type=int, default=16, help="patch per axis (64 for the ECG)")
    p.add_argument("--stride", type=int, default=8, help="stride per axis (32 for the ECG)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the minimum of each side is kept")
    p.add_argument("--profile", action="store_true", help="also break the incremental time down by op")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("volumes.py: error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} thread(s))"
    print(f"device: {device_name}; torch {torch.__version__}; batch {args.batch_size}, "
          f"{args.positions} centre positions, {args.rounds} interleaved rounds (min of each)")
    header = (f"{'case':16s} {'patch':>6s} {'naive s':>8s} {'krypton s':>9s} {'speedup':>8s} {'theory':>7s} "
              f"{'% theory':>8s} {'exec MAC':>8s} {'goal':>5s} {'naive MiB':>9s} {'kfx MiB':>8s} {'maxdiff':>8s}")
    print(header)
    results = []
    for case in args.cases.split(","):
        model, size, channels = build(case)
        model = model.to(args.device)
        ecg = len(size) == 1
        patch, stride = (64, 32) if ecg and args.patch == 16 else (args.patch, args.stride)
        image = torch.randn(channels, *size, generator=torch.Generator().manual_seed(0)).to(args.device)
        ex = krypton_fx.compile(model, patch=patch, stride=stride, image_size=size, channels=channels,
                                batch_size=args.batch_size, device=args.device)
        best = None
        for r in range(args.rounds):  # each round times naive, then incremental
            m = measure(model, image, patch=patch, stride=stride, batch_size=args.batch_size,
                        positions=args.positions, device=args.device, explainer=ex, warmup=(r == 0))
            if best is None:
                best = m
            best.naive_s, best.incremental_s = min(best.naive_s, m.naive_s), min(best.incremental_s,
                                                                                   m.incremental_s)
        speedup = best.naive_s / best.incremental_s
        mib = (lambda v: "n/a" if v is None else f"{v / 2**20:.0f}")
        goal = GOALS_CPU.get(case) if not cuda else None
        row = {"case": case, "size": size, "patch": patch, "stride": stride, "positions": best.positions,
               "batch_size": best.batch_size, "naive_s": best.naive_s, "incremental_s": best.incremental_s,
               "speedup": speedup, "theoretical": best.theoretical, "executed_ratio": best.executed_ratio,
               "naive_peak_bytes": best.naive_peak, "incremental_peak_bytes": best.incremental_peak,
               "max_abs_diff": best.max_abs_diff, "goal": goal, "device": device_name}
        line = (f"{case:16s} {patch:>6d} {best.naive_s:8.2f} {best.incremental_s:9.2f} {speedup:7.2f}x "
                f"{best.theoretical:7.2f} {speedup / best.theoretical:8.0%} {best.executed_ratio:8.2f} "
                f"{goal or float('nan'):5.1f} {mib(best.naive_peak):>9s} {mib(best.incremental_peak):>8s} "
                f"{best.max_abs_diff:8.1e}")
        print(line, flush=True)
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
