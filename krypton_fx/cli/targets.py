"""The ``explain`` command's options for dense-output (segmentation) models: ``--target class:N``
(each cell: the mean, or ``--reduce sum``, over a mask of class N's value in the occluded output),
``--mask FILE|predicted`` and ``--norm-stats``. The picture and the map are the classifier's."""

from __future__ import annotations

import argparse
import re
from typing import Optional

from .errors import CLIError, first_line

__all__ = ["add_arguments", "target_class", "segmentation_target", "refuse_segmentation_options"]


def target_class(text: str) -> int:
    """argparse type of ``--target``: ``class:N`` (an output channel, N >= 0)."""
    match = re.fullmatch(r"class:(\d+)", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected class:N (the output channel to explain), got {text!r}")
    return int(match.group(1))


def add_arguments(p: argparse.ArgumentParser) -> None:
    seg = p.add_argument_group("segmentation models (dense outputs)")
    seg.add_argument("--target", type=target_class, metavar="class:N",
                     help="explain a segmentation model: each cell is the mean over --mask of class N's value "
                          "(--output: softmax prob, sigmoid or logit) in the occluded output")
    seg.add_argument("--mask", metavar="FILE|predicted",
                     help="--target's mask: 'predicted' (the pixels the unoccluded model assigns to the class, the "
                          "default), or a file of the output's shape: NIfTI/.npy for volumes, .npy or a picture "
                          "for images (nonzero = in the mask; .npy values are weights)")
    seg.add_argument("--reduce", choices=("mean", "sum"),
                     help="--target: mean over the mask (default) or sum (Captum's and grad-cam's convention with "
                          "--output logit)")
    seg.add_argument("--norm-stats", choices=("exact", "frozen"), default="exact",
                     help="instance/group/layer norms: exact (dense from the first of them) or frozen (the unoccluded "
                          "image's statistics: the whole net incremental, approximate)")


def refuse_segmentation_options(args) -> None:
    """Without ``--target``: ``--mask``, ``--reduce`` and ``--output sigmoid`` do not apply."""
    if args.target is None:
        for option in ("mask", "reduce"):
            if getattr(args, option) is not None:
                raise CLIError(f"--{option} applies to a segmentation target: add --target class:N")
        if args.output == "sigmoid":
            raise CLIError("--output sigmoid applies to a segmentation target: add --target class:N")


def _read_mask(path: str, spatial: tuple[int, ...]):
    """A mask file as a float32 tensor: a NIfTI/.npy array (weights), or a picture (nonzero pixels)."""
    import numpy as np
    import torch

    from ..volumes import VolumeFileError, read_volume, volume_suffix

    if volume_suffix(path) is not None:
        try:
            data = read_volume(path).data
        except VolumeFileError as e:
            raise CLIError(f"--mask {path}: {e}") from None
        data = np.asarray(data, dtype=np.float32)
        while data.ndim > len(spatial) and data.shape[0] == 1:
            data = data[0]
    else:
        try:
            from PIL import Image

            with Image.open(path) as img:
                data = (np.asarray(img.convert("L")) > 0).astype(np.float32)
        except (OSError, ValueError) as e:
            raise CLIError(f"--mask {path}: cannot read it ({first_line(e)}); give a .npy, NIfTI or "
                           "picture file") from None
    if tuple(data.shape) != tuple(spatial):
        raise CLIError(f"--mask {path} has shape {'x'.join(map(str, data.shape))} but the model's output is "
                       f"{'x'.join(map(str, spatial))}; give a mask of the output's shape")
    if not np.isfinite(data).all() or not data.any():
        raise CLIError(f"--mask {path} is empty (no nonzero weight) or holds non-finite values")
    return torch.from_numpy(np.ascontiguousarray(data))


def segmentation_target(args, loaded, x, device):
    """The ``SegmentationTarget`` of ``--target``/``--mask``/``--reduce``/``--output``, checked on one
    plain inference of ``x`` (a dict output explains its ``"out"``), or None without ``--target``."""
    import torch

    from ..targets import SegmentationTarget

    refuse_segmentation_options(args)
    if args.target is None:
        return None
    for option in ("label", "labels", "top_k"):
        if getattr(args, option, None) is not None:
            raise CLIError(f"--{option.replace('_', '-')} names a classifier's class; with --target class:N the "
                           "class is N")
    with torch.no_grad():
        loaded.model.to(device)
        try:
            out = loaded.model.eval()(x[None].to(device))
        except Exception as e:
            raise CLIError(f"{loaded.name} cannot run on this input ({first_line(e)})") from None
    key: Optional[str] = None
    if isinstance(out, dict):
        if "out" not in out:
            raise CLIError(f"{loaded.name} returns a dict without 'out' (keys {sorted(out)}): wrap it so that it "
                           "returns the segmentation map")
        key, out = "out", out["out"]
    if not isinstance(out, torch.Tensor) or out.dim() != x.dim() + 1:
        raise CLIError(f"{loaded.name} does not return a dense map (N, classes, *spatial) but "
                       f"{tuple(getattr(out, 'shape', ()))}: --target applies to segmentation models")
    if args.target >= out.shape[1]:
        raise CLIError(f"--target class:{args.target} is out of range: {loaded.name} returns {out.shape[1]} "
                       f"channel(s) (classes 0..{out.shape[1] - 1})")
    mask = None if args.mask in (None, "predicted") else _read_mask(args.mask, tuple(out.shape[2:]))
    target = SegmentationTarget(args.target, mask=mask, output=args.output, reduce=args.reduce or "mean", key=key)
    if mask is None:
        try:
            target.resolve(out.cpu())
        except ValueError as e:
            raise CLIError(f"--mask predicted: {e}") from None
    return target
