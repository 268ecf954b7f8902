"""``krypton-fx demo``: a small lesion classifier (trained once, cached) explained on synthetic
scans, naive and incremental occlusion timed side by side; pictures into ``--out``. With
``--volume``, the same on synthetic volumes and a small 3-D CNN (:mod:`.demo_volume`); with
``--segmentation``, a small U-Net explained for its lesion mask (:mod:`.demo_segmentation`)."""

from __future__ import annotations

import functools

from . import demo_segmentation, demo_volume
from . import options as opt
from .errors import PROG, CLIError
from .files import output_dir, save_figure, write_files

__all__ = ["add_parser", "run"]

def add_parser(sub, formatter_class):
    p = sub.add_parser("demo", help="offline demo on synthetic lesion scans (or volumes: --volume)",
                       formatter_class=formatter_class,
                       description="Explain a small lesion classifier (trained on first run, then cached) "
                                   "on synthetic scans, and time naive vs incremental occlusion; with "
                                   "--volume, a small 3-D CNN on synthetic volumes.")
    p.add_argument("--out", default="krypton-demo", metavar="DIR", help="folder for the pictures")
    p.add_argument("--images", type=opt.positive_int, default=3, metavar="N",
                   help="lesion images (or volumes) to explain")
    p.add_argument("--volume", action="store_true",
                   help="the 3-D demo: synthetic volumes with a small bright lesion, a small 3-D CNN")
    p.add_argument("--segmentation", action="store_true",
                   help="a small U-Net that segments the lesion, explained for the lesion class over its "
                        "predicted mask")
    p.add_argument("--size", type=opt.int_at_least(demo_volume.MIN_SIZE), metavar="N",
                   help=f"--volume: edge of the volumes explained (default {demo_volume.DEFAULT_SIZE}; the "
                        f"model, trained at {demo_volume.TRAIN_SIZE}, runs on any size; larger volumes "
                        "take longer and gain more)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where the trained model is kept (default $KRYPTON_CACHE or ~/.cache/krypton_fx)")
    p.set_defaults(run=run)
    return p


_DEMO_PATCH = 12
_DEMO_STRIDE = 2
_DEMO_BATCH = 64
_DEMO_SEED = 7  # make_dataset seeds below 1000 are never used in training: held-out images
_DEMO_CLASSES = ("healthy", "lesion")


def run(args) -> int:
    if args.volume and args.segmentation:
        raise CLIError("give --volume or --segmentation, not both")
    if args.volume:
        return demo_volume.run(args)
    if args.segmentation:
        if args.size is not None:
            raise CLIError("--size applies to the 3-D demo (--volume)")
        return demo_segmentation.run(args)
    if args.size is not None:
        raise CLIError("--size applies to the 3-D demo: add --volume")
    import numpy as np

    from .. import lesions
    from ..benchmark import side_by_side
    from ..explainer import compile as compile_explainer
    from ..naive import naive_occlusion
    from ..report import theoretical_speedup
    from ..viz import heatmap_figure, upsample_heatmap

    with output_dir(args.out, "--out") as out_dir:
        print(f"{PROG} demo: a small CNN that tells synthetic fundus scans with a bright lesion "
              "from healthy ones (trained once, then cached)")
        model = lesions.load_or_train("tiny", cache_dir=args.cache_dir, progress=True).eval()
        size = lesions.DEFAULT_SIZE["tiny"]
        # Half the scans carry a lesion: 4N + 16 of them hold N lesion scans but for odds of ~1e-5.
        images, labels, boxes = lesions.make_dataset(4 * args.images + 16, size, seed=_DEMO_SEED)
        chosen = [i for i in range(len(labels)) if int(labels[i]) == 1][:args.images]
        patch, stride = (_DEMO_PATCH, _DEMO_PATCH), (_DEMO_STRIDE, _DEMO_STRIDE)
        color = 0.0  # black: the images are in [0, 1] and the model takes them unnormalised
        ex = compile_explainer(model, patch=patch, stride=stride, color=color, image_size=(size, size),
                               batch_size=_DEMO_BATCH, device="cpu")
        theory = theoretical_speedup(model, (size, size), patch)
        print(f"model: lesions tiny (3 conv layers), {size}x{size} images; occlusion patch {_DEMO_PATCH}, "
              f"stride {_DEMO_STRIDE}: {ex.positions} positions per image, batch {_DEMO_BATCH}")
        # Warm both paths up once so that neither pays first-call costs in the timing.
        naive_occlusion(model, images[chosen[0]], patch, stride, color, batch_size=_DEMO_BATCH)
        ex(images[chosen[0]])

        print(f"{'image':<8}{'P(lesion)':>10}{'naive s':>10}{'krypton s':>11}{'speedup':>9}"
              f"{'max |diff|':>12}  hottest point in the lesion box")
        total_naive = total_inc = 0.0
        writers = {}
        for k, i in enumerate(chosen):
            image = images[i]
            naive, res, t_naive, t_inc = side_by_side(
                functools.partial(naive_occlusion, model, image, patch, stride, color, batch_size=_DEMO_BATCH),
                functools.partial(ex, image))
            total_naive += t_naive
            total_inc += t_inc
            heat = res.heatmap.numpy()
            drop = res.base_prob - upsample_heatmap(heat, (size, size), patch, stride)
            hy, hx = np.unravel_index(int(np.argmax(drop)), drop.shape)
            y, x, h, w = (int(v) for v in boxes[i])
            inside = y <= hy < y + h and x <= hx < x + w
            diff = float((naive.heatmap - res.heatmap).abs().max())
            print(f"{k:<8}{res.base_prob:>10.3f}{t_naive:>10.3f}{t_inc:>11.3f}"
                  f"{t_naive / t_inc:>8.2f}x{diff:>12.1e}  "
                  f"{'yes' if inside else 'no'} (hottest at y={hy}, x={hx}; box y={y}..{y + h - 1}, "
                  f"x={x}..{x + w - 1})")
            fig = heatmap_figure(image.permute(1, 2, 0).numpy(), heat, patch, stride, res.label,
                                 res.base_prob, label_name=_DEMO_CLASSES[res.label], box=(y, x, h, w),
                                 box_label="true lesion",
                                 subtitle=(f"synthetic scan {k} (held-out seed {_DEMO_SEED}, #{i}): "
                                           f"patch {_DEMO_PATCH}, stride {_DEMO_STRIDE}, "
                                           f"{ex.positions} positions, exact"))
            writers[out_dir / f"demo-{k}.png"] = functools.partial(save_figure, fig, "png")
        write_files(writers)
        print(f"total: naive {total_naive:.3f} s, krypton_fx {total_inc:.3f} s: "
              f"speedup {total_naive / total_inc:.2f}x measured side by side "
              f"(theoretical {theory:.2f}x, conv layers only)")
        print(f"wrote {len(writers)} pictures to {out_dir.resolve()}/")
        for path in writers:
            print(f"  {path}")
    return 0
