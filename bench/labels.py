"""What every class at once costs: one call for 1 label, 5 labels and all 1000, side by side.

ResNet18 (random init) at 224, patch 16; the three calls run interleaved in one process on
one thread, and each row is the minimum over the rounds. The occluded forwards are the same
for every row: the extra labels only add a softmax column pick and a host copy per batch.

    python bench/labels.py [--stride 16] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

import krypton_fx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    image = torch.randn(3, 224, 224)
    ex = krypton_fx.compile(model, patch=16, stride=args.stride, image_size=(224, 224))
    calls = {"1 label": {}, "5 labels": {"top_k": 5}, "all 1000": {"labels": "all"}}
    ex(image)  # compile and warm up
    best = {name: float("inf") for name in calls}
    maps = {}
    for _ in range(args.rounds):
        for name, kwargs in calls.items():
            start = time.perf_counter()
            maps[name] = ex(image, **kwargs)
            best[name] = min(best[name], time.perf_counter() - start)
    one = maps["1 label"]
    assert torch.equal(maps["all 1000"].heatmaps[one.label], one.heatmap)
    print(f"ResNet18 224, patch 16, stride {args.stride}: {ex.positions} positions, {args.threads} thread(s), "
          f"min of {args.rounds} interleaved rounds")
    for name in calls:
        print(f"  {name:>9}: {best[name]:7.3f} s   {best[name] / best['1 label']:.3f}x the one-label call")


if __name__ == "__main__":
    main()
