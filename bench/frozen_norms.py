"""What norm_stats="frozen" costs in quality, and what it saves, on a trained net.

The demo's lesion U-Net retrained with instance norm (krypton_fx.lesion_seg, trained once and
cached) explains held-out scans for the lesion class over its predicted mask, exact (instance
norms dense) and with frozen statistics (the whole net incremental). Per scan: the largest
difference of the two maps, the drop kept (the frozen map's drop at the exact map's
strongest-drop cell over the exact drop there; the goal is >= 95 %), and the time of each,
one thread, interleaved (min of --rounds). Also the theoretical speedup of each mode.

    python bench/frozen_norms.py                 # 8 held-out scans
    python bench/frozen_norms.py --scans 3 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import krypton_fx
from krypton_fx import lesion_seg, lesions
from krypton_fx.approx.metrics import drop_kept

_SEED = 7  # held-out: seeds below 1000 are never used in training


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scans", type=int, default=8)
    p.add_argument("--patch", type=int, default=12)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = lesion_seg.load_or_train("instance", progress=True).eval()
    info = lesion_seg.training_info("instance")
    size = lesion_seg.SIZE
    images, labels, _, masks = lesions.make_dataset(4 * args.scans + 16, size, seed=_SEED, masks=True)
    chosen = [i for i in range(len(labels)) if int(labels[i]) == 1][:args.scans]
    target = krypton_fx.SegmentationTarget(1)
    kw = dict(patch=args.patch, stride=args.stride, image_size=(size, size), batch_size=64, target=target)
    exact = krypton_fx.compile(model, **kw)
    frozen = krypton_fx.compile(model, norm_stats="frozen", **kw)
    theory = {mode: krypton_fx.theoretical_speedup(model, (size, size), args.patch, target=target, norm_stats=mode)
              for mode in ("exact", "frozen")}
    print(f"LesionUNet (instance norm), held-out Dice {info.get('dice', float('nan')):.3f}; {size}x{size}, patch "
          f"{args.patch}, stride {args.stride}: {exact.positions} positions; target: mean P(lesion) over the "
          f"predicted mask; theoretical speedup exact {theory['exact']:.2f}x, frozen {theory['frozen']:.2f}x; "
          f"{torch.get_num_threads()} thread(s), min of {args.rounds} interleaved rounds")
    print(f"{'scan':>4} {'mask px':>7} {'mean P':>7} {'exact min':>9} {'max |diff|':>10} {'drop kept':>9} "
          f"{'exact s':>8} {'frozen s':>8} {'ratio':>6}")
    exact(images[chosen[0]])
    frozen(images[chosen[0]])  # both compiled and warm
    rows = []
    for k, i in enumerate(chosen):
        t_exact = t_frozen = float("inf")
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            a = exact(images[i])
            t1 = time.perf_counter()
            b = frozen(images[i])
            t2 = time.perf_counter()
            t_exact, t_frozen = min(t_exact, t1 - t0), min(t_frozen, t2 - t1)
        diff = float((a.heatmap - b.heatmap).abs().max())
        kept = drop_kept(a, b.heatmap)
        rows.append({"scan": k, "index": i, "mask_pixels": int(a.mask.sum()), "base": a.base_prob,
                     "exact_min": float(a.heatmap.min()), "max_abs_diff": diff, "drop_kept": kept,
                     "exact_s": t_exact, "frozen_s": t_frozen})
        print(f"{k:>4} {int(a.mask.sum()):>7} {a.base_prob:>7.3f} {float(a.heatmap.min()):>9.3f} {diff:>10.2e} "
              f"{kept:>9.1%} {t_exact:>8.2f} {t_frozen:>8.2f} {t_exact / t_frozen:>5.2f}x", flush=True)
    kept = [r["drop_kept"] for r in rows]
    print(f"drop kept: min {min(kept):.1%}, mean {sum(kept) / len(kept):.1%} (goal >= 95% on every scan); "
          f"max |diff| {max(r['max_abs_diff'] for r in rows):.2e}; time exact/frozen "
          f"{sum(r['exact_s'] for r in rows) / sum(r['frozen_s'] for r in rows):.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"theory": theory, "rows": rows, "info": info}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
