"""``krypton-fx demo --segmentation``: a small U-Net (batch norm; trained once on the CPU, cached)
that segments the lesion of synthetic scans, explained on held-out scans for the lesion class
over its predicted mask (:class:`krypton_fx.SegmentationTarget`), naive and incremental
occlusion timed side by side; pictures (the scan, the predicted mask's outline, the map) into
``--out``."""

from __future__ import annotations

import functools

from .errors import PROG
from .files import output_dir, save_figure, write_files

__all__ = ["run"]

_PATCH = 12
_STRIDE = 4
_BATCH = 64
_SEED = 7  # make_dataset seeds below 1000 are never used in training: held-out scans
_LESION = 1


def run(args) -> int:
    import numpy as np

    from .. import lesion_seg, lesions
    from ..benchmark import side_by_side
    from ..explainer import compile as compile_explainer
    from ..naive import naive_occlusion
    from ..report import theoretical_speedup
    from ..targets import SegmentationTarget
    from ..viz import heatmap_figure, upsample_heatmap

    size = lesion_seg.SIZE
    with output_dir(args.out, "--out") as out_dir:
        print(f"{PROG} demo --segmentation: a small U-Net (batch norm) that segments the bright lesion of "
              "synthetic fundus scans (trained once on the CPU, then cached)")
        model = lesion_seg.load_or_train("batch", cache_dir=args.cache_dir, progress=True).eval()
        info = lesion_seg.training_info("batch", cache_dir=args.cache_dir)
        if info:
            print(f"model: LesionUNet (2 levels, transposed-conv decoder), trained at {size}x{size} in "
                  f"{info['train_seconds']:.0f} s ({info['steps']} steps of {info['batch']}), held-out Dice "
                  f"{info['dice']:.3f}")
        images, labels, boxes, masks = lesions.make_dataset(4 * args.images + 16, size, seed=_SEED, masks=True)
        chosen = [i for i in range(len(labels)) if int(labels[i]) == 1][:args.images]
        patch, stride = (_PATCH, _PATCH), (_STRIDE, _STRIDE)
        target = SegmentationTarget(_LESION)  # mean P(lesion) over the predicted lesion mask
        ex = compile_explainer(model, patch=patch, stride=stride, color=0.0, image_size=(size, size),
                               batch_size=_BATCH, device="cpu", target=target)
        theory = theoretical_speedup(model, (size, size), patch, target=target)
        print(f"target: mean P(lesion) over the lesion mask the unoccluded model predicts; patch {_PATCH}, stride "
              f"{_STRIDE}: {ex.positions} positions per scan, batch {_BATCH}")
        naive_occlusion(model, images[chosen[0]], patch, stride, 0.0, batch_size=_BATCH, target=target)
        ex(images[chosen[0]])  # both paths warmed up once: neither pays first-call costs below

        print(f"{'scan':<6}{'mask px':>8}{'mean P':>8}{'naive s':>10}{'krypton s':>11}{'speedup':>9}"
              f"{'max |diff|':>12}  strongest drop inside the lesion")
        total_naive = total_inc = 0.0
        writers = {}
        for k, i in enumerate(chosen):
            image = images[i]
            naive, res, t_naive, t_inc = side_by_side(
                functools.partial(naive_occlusion, model, image, patch, stride, 0.0, batch_size=_BATCH, target=target),
                functools.partial(ex, image))
            total_naive += t_naive
            total_inc += t_inc
            heat = res.heatmap.numpy()
            drop = res.base_prob - upsample_heatmap(heat, (size, size), patch, stride)
            hy, hx = np.unravel_index(int(np.argmax(drop)), drop.shape)
            inside = bool(masks[i][hy, hx])
            diff = float((naive.heatmap - res.heatmap).abs().max())
            print(f"{k:<6}{int(res.mask.sum()):>8}{res.base_prob:>8.3f}{t_naive:>10.3f}{t_inc:>11.3f}"
                  f"{t_naive / t_inc:>8.2f}x{diff:>12.1e}  {'yes' if inside else 'no'} (at y={hy}, x={hx})")
            y, x, h, w = (int(v) for v in boxes[i])
            fig = heatmap_figure(image.permute(1, 2, 0).numpy(), heat, patch, stride, res.label, res.base_prob,
                                 label_name="lesion, mean over the predicted mask", box=(y, x, h, w),
                                 box_label="true lesion",
                                 subtitle=(f"synthetic scan {k} (held-out seed {_SEED}, #{i}): patch {_PATCH}, "
                                           f"stride {_STRIDE}, {ex.positions} positions, exact; cyan: the "
                                           "predicted mask"))
            for ax in fig.axes[:2]:
                ax.contour(res.mask.numpy(), levels=[0.5], colors="cyan", linewidths=1.0)
            writers[out_dir / f"demo-segmentation-{k}.png"] = functools.partial(save_figure, fig, "png")
        write_files(writers)
        print(f"total: naive {total_naive:.3f} s, krypton_fx {total_inc:.3f} s: speedup "
              f"{total_naive / total_inc:.2f}x measured side by side on the CPU (theoretical {theory:.2f}x, "
              "conv layers only)")
        print(f"wrote {len(writers)} pictures to {out_dir.resolve()}/")
        for path in writers:
            print(f"  {path}")
    return 0
