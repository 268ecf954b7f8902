"""krypton_fx.captum.FeatureAblation against captum.attr.FeatureAblation on superpixels.

One process, the same inputs for both: a model (random init, eval mode), a smooth random
image (or volume) and its SLIC superpixels (``krypton_fx.segments.slic``; SLIC returns about
the number asked for, the table prints the real count). krypton_fx's first call compiles
(the bucket programs; printed as cold), then the two run interleaved for ``--rounds``
rounds (Captum first in even rounds), one thread by default; each time is the minimum over
rounds. Printed per row::

    model | input | segments | buckets | captum s | krypton_fx s (cold) | measured | theory own box |
        theory buckets | measured / theory buckets | area waste | max |diff| | max |attr|

theory: conv multiply-adds of Captum's ablated forwards (one full inference per segment)
over those of the incremental programs, with each segment's own bounding box (own box) and
with the bucket box it runs in (buckets); their quotient is what the buckets waste. Both
come from PatchProp run on the meta device (no arithmetic). area waste: the buckets' summed
area over the segments' bounding boxes'. max |diff|: krypton_fx's attributions against
Captum's.

Usage (from the repository root)::

    python bench/ablation.py                                   # the issue's table (slow on a CPU)
    python bench/ablation.py --models resnet18 --segments 256 --rounds 1
    python bench/ablation.py --models none --volume             # the 3-D row only
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

# This folder holds captum.py: drop it from the path so that ``import captum`` finds the library.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.join(_HERE, ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,vgg16", help="torchvision classifiers, or none")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--segments", default="64,256,1024", help="SLIC n_segments per row")
    parser.add_argument("--volume", action="store_true", default=None,
                        help="add the 3-D row: MONAI ResNet18 at --volume-size^3, --volume-segments supervoxels")
    parser.add_argument("--no-volume", dest="volume", action="store_false")
    parser.add_argument("--volume-size", type=int, default=64)
    parser.add_argument("--volume-segments", type=int, default=64)
    parser.add_argument("--perturbations-per-eval", type=int, default=16)
    parser.add_argument("--target", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved warm rounds; each time their minimum")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.volume is None:
        args.volume = True
    return args


def smooth_input(channels: int, size: tuple[int, ...], seed: int) -> torch.Tensor:
    """``(1, C, *size)``: coarse random colours, interpolated, a little noise (SLIC follows it)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, channels, *(8,) * len(size), generator=gen)
    mode = "bilinear" if len(size) == 2 else "trilinear"
    return F.interpolate(coarse, size=size, mode=mode) + 0.05 * torch.randn(1, channels, *size, generator=gen)


class MacCounter:
    """Conv multiply-adds of the model's incremental program for a box size (PatchProp on the
    meta device, one run per distinct size), and of one full inference."""

    def __init__(self, model, example_shape):
        from krypton_fx.passes.functionalize import functionalize
        from krypton_fx.tracing import trace

        meta = copy.deepcopy(model).to("meta")
        self.example = torch.zeros(example_shape, device="meta")
        self.gm = functionalize(trace(meta), self.example)
        self.full = None
        self._by_size: dict = {}

    def incremental(self, size: tuple[int, ...]) -> int:
        from krypton_fx.passes.patch_prop import annotate

        if size not in self._by_size:
            starts = tuple(torch.zeros(1, dtype=torch.int64) for _ in size)
            prop = annotate(self.gm, self.example, size, starts)
            self._by_size[size] = sum(info.macs_inc for info in prop.infos.values())
            self.full = sum(info.macs_full for info in prop.infos.values())
        return self._by_size[size]


def theory(counter: MacCounter, labels: torch.Tensor, image_size: tuple[int, ...]
           ) -> tuple[float, float, float, int]:
    """``(own-box ratio, bucket ratio, area waste, buckets)`` of one label map."""
    from krypton_fx import ablation

    ids, inverse = torch.unique(labels, return_inverse=True)
    lo, hi = ablation.segment_boxes(inverse.unsqueeze(0), len(ids))
    placed = [ablation.place_segments(lo[:, d], hi[:, d], n, len(image_size)) for d, n in enumerate(image_size)]
    buckets = torch.stack([p[0] for p in placed], 1)
    own = sum(counter.incremental(tuple(r)) for r in (hi - lo).tolist())
    bucketed = sum(counter.incremental(tuple(r)) for r in buckets.tolist())
    naive = len(ids) * counter.full
    waste = float(buckets.prod(1).double().sum() / (hi - lo).prod(1).double().sum())
    return naive / own, naive / bucketed, waste, len(torch.unique(buckets, dim=0))


def run_row(name: str, model, x: torch.Tensor, labels: torch.Tensor, args, captum_cls, ours_cls) -> str:
    mask = labels.view(1, 1, *labels.shape)
    kwargs = dict(feature_mask=mask, target=args.target, perturbations_per_eval=args.perturbations_per_eval)
    ours = ours_cls(model)
    start = time.perf_counter()
    mine = ours.attribute(x, **kwargs)
    cold = time.perf_counter() - start
    times = {"captum": float("inf"), "krypton_fx": float("inf")}
    theirs = None
    for r in range(args.rounds):
        for impl in ("captum", "krypton_fx") if r % 2 == 0 else ("krypton_fx", "captum"):
            start = time.perf_counter()
            if impl == "captum":
                theirs = captum_cls(model).attribute(x, **kwargs)
            else:
                mine = ours.attribute(x, **kwargs)
            times[impl] = min(times[impl], time.perf_counter() - start)
    spatial = tuple(labels.shape)
    own, bucketed, waste, buckets = theory(MacCounter(model, tuple(x.shape)), labels, spatial)
    measured = times["captum"] / times["krypton_fx"]
    return " | ".join([
        name, "x".join(map(str, spatial)), str(len(torch.unique(labels))), str(buckets),
        f"{times['captum']:.1f}", f"{times['krypton_fx']:.1f} ({cold:.1f})", f"{measured:.2f}x",
        f"{own:.2f}", f"{bucketed:.2f}", f"{measured / bucketed:.0%}", f"{waste:.2f}",
        f"{float((mine - theirs).abs().max()):.1e}", f"{float(theirs.abs().max()):.1e}",
        ours.last_path])


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import torchvision
    from captum.attr import FeatureAblation as CaptumFA

    from krypton_fx.captum import FeatureAblation as OursFA
    from krypton_fx.segments import slic

    print(f"# cpu threads={args.threads} perturbations_per_eval={args.perturbations_per_eval} target={args.target} "
          f"rounds={args.rounds} (interleaved; min of each) torch {torch.__version__}")
    print("model | input | segments | buckets | captum s | krypton_fx s (cold) | measured | theory own box | "
          "theory buckets | measured / theory buckets | area waste | max |diff| | max |attr| | path", flush=True)
    models = [m.strip() for m in args.models.split(",") if m.strip() and m.strip() != "none"]
    for name in models:
        torch.manual_seed(args.seed)
        model = torchvision.models.get_model(name, weights=None).eval()
        x = smooth_input(3, (args.size, args.size), args.seed)
        for count in (int(c) for c in args.segments.split(",")):
            labels = slic(x[0], n_segments=count)
            print(run_row(name, model, x, labels, args, CaptumFA, OursFA), flush=True)
    if args.volume:
        from monai.networks.nets import resnet18

        torch.manual_seed(args.seed)
        net = resnet18(spatial_dims=3, n_input_channels=1, num_classes=2).eval()
        size = (args.volume_size,) * 3
        x = smooth_input(1, size, args.seed)
        labels = slic(x[0], n_segments=args.volume_segments, compactness=0.1)
        args_3d = argparse.Namespace(**{**vars(args), "target": 1})
        print(run_row("monai resnet18 3-D", net, x, labels, args_3d, CaptumFA, OursFA), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
