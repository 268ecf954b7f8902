"""``krypton-fx demo --volume``: a small 3-D CNN (trained once on the CPU, cached) explained on
synthetic held-out volumes, naive and incremental occlusion timed side by side; three-slice
pictures and the volumes themselves (``.npy``, for ``krypton-fx explain``) into ``--out``."""

from __future__ import annotations

import functools

from ..lesions3d import DEFAULT_SIZE, TRAIN_SIZE
from .errors import PROG
from .files import output_dir, save_figure, write_files

__all__ = ["run", "DEFAULT_SIZE", "TRAIN_SIZE", "MIN_SIZE"]

#: Smallest --size: two patches per axis.
MIN_SIZE = 16
# Patch and stride in voxels, whatever the volume's size (the lesion's size is fixed in voxels
# too): 8 covers a whole lesion (at most 8 voxels across) from some position of stride 4.
_PATCH = 8
_STRIDE = 4
_BATCH = 64
_SEED = 7  # make_volumes seeds below 1000 are never used in training: held-out volumes
# The patch colour: the tissue's grey. A black cube inside grey tissue is a high-contrast
# object that this small CNN reads as a lesion (P(lesion) of a healthy volume goes to 0.99), so
# a black patch adds evidence where it should only remove it; a grey cube removes a lesion
# without adding one.
_COLOR = 0.4
_CLASSES = ("healthy", "lesion")


def run(args) -> int:
    import numpy as np

    from .. import lesions3d
    from ..benchmark import side_by_side
    from ..explainer import compile as compile_explainer
    from ..explainer import naive_occlusion
    from ..report import theoretical_speedup
    from ..viz import drop_limit, upsample_heatmap_nd, volume_figure

    size = args.size or DEFAULT_SIZE
    with output_dir(args.out, "--out") as out_dir:
        print(f"{PROG} demo --volume: a small 3-D CNN that tells synthetic volumes with a small bright lesion "
              "from healthy ones (trained once on the CPU, then cached)")
        model = lesions3d.load_or_train(cache_dir=args.cache_dir, progress=True).eval()
        info = lesions3d.training_info(cache_dir=args.cache_dir)
        if info:
            print(f"model: lesions3d Tiny3DNet (3 Conv3d layers), trained at {info['size']}^3 in "
                  f"{info['train_seconds']:.0f} s ({info['steps']} steps of {info['batch']}), held-out accuracy "
                  f"{info['accuracy']:.3f}" + (f"; at {size}^3: {lesions3d.evaluate(model, size, n=64):.3f}"
                                               if size != info["size"] else ""))
        # Half the volumes carry a lesion: 4N + 16 of them hold N lesion volumes but for odds of ~1e-5.
        volumes, labels, boxes = lesions3d.make_volumes(4 * args.images + 16, size, seed=_SEED)
        chosen = [i for i in range(len(labels)) if int(labels[i]) == 1][:args.images]
        patch, stride, shape = (_PATCH,) * 3, (_STRIDE,) * 3, (size,) * 3
        ex = compile_explainer(model, patch=patch, stride=stride, color=_COLOR, image_size=shape, channels=1,
                               batch_size=_BATCH, device="cpu")
        theory = theoretical_speedup(model, shape, patch, channels=1)
        print(f"volumes {size}^3; occlusion patch {_PATCH}^3 of grey {_COLOR:g} (the tissue's), stride {_STRIDE}: "
              f"{ex.positions} positions per volume, batch {_BATCH}")
        # Warm both paths up once so that neither pays first-call costs in the timing.
        naive_occlusion(model, volumes[chosen[0]], patch, stride, _COLOR, batch_size=_BATCH)
        ex(volumes[chosen[0]])

        print(f"{'volume':<8}{'P(lesion)':>10}{'naive s':>10}{'krypton s':>11}{'speedup':>9}"
              f"{'max |diff|':>12}  hottest voxel in the lesion box")
        total_naive = total_inc = 0.0
        writers = {}
        for k, i in enumerate(chosen):
            volume = volumes[i]
            naive, res, t_naive, t_inc = side_by_side(
                functools.partial(naive_occlusion, model, volume, patch, stride, _COLOR, batch_size=_BATCH),
                functools.partial(ex, volume))
            total_naive += t_naive
            total_inc += t_inc
            heat = res.heatmap.numpy()
            drop = res.base_prob - upsample_heatmap_nd(heat, shape, patch, stride)
            voxel = tuple(int(v) for v in np.unravel_index(int(np.argmax(drop)), drop.shape))
            box = [int(v) for v in boxes[i]]
            inside = lesions3d.lesion_contains(box, voxel)
            diff = float((naive.heatmap - res.heatmap).abs().max())
            span = ", ".join(f"{'dhw'[a]}={box[a]}..{box[a] + box[a + 3] - 1}" for a in range(3))
            print(f"{k:<8}{res.base_prob:>10.3f}{t_naive:>10.3f}{t_inc:>11.3f}{t_naive / t_inc:>8.2f}x"
                  f"{diff:>12.1e}  {'yes' if inside else 'no'} (hottest at d={voxel[0]}, h={voxel[1]}, "
                  f"w={voxel[2]}; box {span})")
            fig = volume_figure(volume[0].numpy(), drop, voxel, res.label, res.base_prob,
                                limit=drop_limit(res.base_prob - heat), label_name=_CLASSES[res.label], box=box,
                                box_label="true lesion",
                                subtitle=(f"synthetic volume {k} (held-out seed {_SEED}, #{i}), {size}^3: patch "
                                          f"{_PATCH}^3, stride {_STRIDE}, {ex.positions} positions, exact"))
            writers[out_dir / f"demo-volume-{k}.png"] = functools.partial(save_figure, fig, "png")
            writers[out_dir / f"volume-{k}.npy"] = functools.partial(np.save, arr=volume[0].numpy())
        write_files(writers)
        print(f"total: naive {total_naive:.3f} s, krypton_fx {total_inc:.3f} s: "
              f"speedup {total_naive / total_inc:.2f}x measured side by side on the CPU "
              f"(theoretical {theory:.2f}x, conv layers only)")
        print(f"wrote {len(writers)} files to {out_dir.resolve()}/ (pictures, and the volumes as .npy)")
        for path in writers:
            print(f"  {path}")
        print(f"explain one yourself: {PROG} explain {out_dir / 'volume-0.npy'} --model "
              f"krypton_fx.lesions3d:load_or_train --patch {_PATCH} --stride {_STRIDE} --color {_COLOR:g} "
              f"--out volume-0.png")
    return 0
