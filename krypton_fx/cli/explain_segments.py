"""``krypton-fx explain IMAGE --segments slic:200``: feature ablation of an image's segments
(:meth:`krypton_fx.Explainer.ablate`) instead of a sliding patch.

``--segments`` takes ``slic:N`` (about N SLIC superpixels), ``felzenszwalb:SCALE``
(Felzenszwalb's segments at that scale) or ``file:PATH`` (a label image, PNG/TIFF, grey
values or colours, of the model input's size or of the image file's, which is then resized
and cropped as the image is, nearest; or a NIfTI / ``.npy`` label volume for a volume). The
picture shows the segments' outlines and each segment's drop; ``--npy`` writes the
per-segment scores (entry ``k``: segment ``k`` ablated; ids are consecutive); ``--color`` is
the baseline the segments take. With ``--out-dir`` every image gets its own segments.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from pathlib import Path
from typing import Union

from .errors import CLIError

__all__ = ["SegmentSpec", "segment_spec", "refuse_patch_options", "labels_for_image", "segment_picture",
           "baseline_of", "ablate_one", "SegmentLabeler"]


@dataclasses.dataclass(frozen=True)
class SegmentSpec:
    """What ``--segments`` asked for: ``kind`` (slic, felzenszwalb, file) and its value."""

    kind: str
    value: Union[int, float, str]

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


def segment_spec(text: str) -> SegmentSpec:
    """argparse type of ``--segments``: ``slic:N``, ``felzenszwalb:SCALE`` or ``file:PATH``."""
    kind, _, value = text.partition(":")
    kind = kind.strip().lower()
    if kind == "file" and value.strip():
        return SegmentSpec("file", value.strip())
    try:
        if kind == "slic":
            number = int(value)
            if number >= 1:
                return SegmentSpec("slic", number)
        elif kind == "felzenszwalb":
            scale = float(value)
            if scale > 0:
                return SegmentSpec("felzenszwalb", scale)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected slic:N (N >= 1 superpixels), felzenszwalb:SCALE (SCALE > 0) or "
                                     f"file:LABELS.png|LABELS.nii.gz, got {text!r}")


def refuse_patch_options(args) -> None:
    """The sliding patch's options mean nothing for segments: one clear error each."""
    for option in ("stride", "drill_down", "stage1_stride"):
        if getattr(args, option, None) is not None:
            raise CLIError(f"--{option.replace('_', '-')} sets the sliding patch; --segments ablates segments "
                           f"instead: drop one of them")
    if getattr(args, "target", None) is not None:
        raise CLIError("--segments ablates a classifier's segments; --target explains a segmentation model "
                       "with a sliding patch: drop one of them")
    if getattr(args, "norm_stats", "exact") != "exact":
        raise CLIError("--segments ablates with the model's own norms; --norm-stats frozen applies to the "
                       "sliding patch: drop it")


def labels_for_image(spec: SegmentSpec, x, display, prep, file_hw, source: str):
    """The ``(H, W)`` int64 label map of model input ``x`` (``display``: the picture in [0, 1])."""
    import torch

    from .. import segments

    picture = torch.as_tensor(display, dtype=torch.float64)
    picture = picture.permute(2, 0, 1) if picture.dim() == 3 else picture[None]
    if spec.kind == "slic":
        return segments.slic(picture, n_segments=int(spec.value))
    if spec.kind == "felzenszwalb":
        return segments.felzenszwalb(picture, scale=float(spec.value))
    try:
        labels = segments.read_labels(spec.value)
    except ValueError as e:
        raise CLIError(str(e)) from None
    size = tuple(x.shape[1:])
    if tuple(labels.shape) == size:
        return labels
    if tuple(labels.shape) == tuple(file_hw) and prep is not None and prep.resize:
        return segments.consecutive(prep.labels(labels))
    raise CLIError(f"--segments {spec}: the labels are {'x'.join(map(str, labels.shape))} but {source} is "
                   f"{'x'.join(map(str, file_hw))} and the model input {'x'.join(map(str, size))}; give labels "
                   "of either size")


def segment_picture(display, labels, res, label_name, model_name: str, source: str, spec: SegmentSpec,
                    tau: float):
    """The figure of one image's feature ablation."""
    from ..viz_segments import segments_figure

    exact = "exact" if tau >= 1.0 else f"tau={tau:g}, approximate"
    return segments_figure(display, labels.numpy(), res.scores.numpy(), res.label, res.base_prob,
                           label_name=label_name, output=res.output,
                           subtitle=(f"{model_name}, {Path(source).name}: {len(res.ids)} segments ({spec}), "
                                     f"{res.programs} box sizes ({exact})"))


@dataclasses.dataclass(frozen=True)
class SegmentLabeler:
    """``(model input, picture, path) -> labels`` for ``--out-dir`` workers (it pickles); a
    label map that does not fit an image is that image's error."""

    spec: SegmentSpec
    prep: object

    def __call__(self, x, picture, path: str):
        from PIL import Image

        with Image.open(path) as image:
            file_hw = (image.height, image.width)
        try:
            return labels_for_image(self.spec, x, picture, self.prep, file_hw, path)
        except CLIError as e:
            raise ValueError(str(e)) from None


def baseline_of(color):
    """``--color`` in the model's input space as ``ablate``'s baseline: a number or ``(C, 1, 1)``."""
    import torch

    return torch.tensor(color, dtype=torch.float32).view(-1, 1, 1) if isinstance(color, list) else float(color)


def ablate_one(args, loaded, x, prep, color, picture, device, channels, out_png, out_npy) -> int:
    """One image's segments, ablated; the picture and (``--npy``) the per-segment scores."""
    import time

    import numpy as np

    from ..explainer import compile as compile_explainer
    from .files import save_figure, write_files

    display = prep.display(x)
    labels = labels_for_image(args.segments, x, display, prep, (picture.height, picture.width), args.image)
    size = tuple(x.shape[1:])
    ex = compile_explainer(loaded.model, patch=1, stride=size, image_size=size, tau=args.tau,
                           batch_size=args.batch_size, device=device, channels=channels, output=args.output)
    if loaded.warning:
        from .errors import warn
        warn(loaded.warning)
    start = time.perf_counter()
    res = ex.ablate(x.to(device), labels, baseline=baseline_of(color), label=args.label, progress=True)
    seconds = time.perf_counter() - start
    cats = loaded.categories
    label_name = cats[res.label] if cats and res.label < len(cats) else None
    fig = segment_picture(display, labels, res, label_name, loaded.name, args.image, args.segments, args.tau)
    writers = {out_png: functools.partial(save_figure, fig, out_png.suffix.lower().lstrip("."))}
    if out_npy is not None:
        writers[out_npy] = functools.partial(np.save, arr=res.scores.numpy())
    write_files(writers)
    name = f" '{label_name}'" if label_name else ""
    what = "P" if args.output == "prob" else "logit"
    print(f"{loaded.name} on {args.image} ({prep.description}): class {res.label}{name}, "
          f"{what} = {res.base_prob:.4f}")
    strongest = int(res.drop.argmax())
    print(f"{len(res.ids)} segments ({args.segments}, {res.programs} box sizes) ablated in {seconds:.2f} s on "
          f"{device}; largest drop {float(res.drop[strongest]):.4f} (segment {strongest})")
    for path in writers:
        print(f"wrote {path}")
    return 0
