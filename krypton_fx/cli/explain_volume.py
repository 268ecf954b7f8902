"""``krypton-fx explain VOLUME``: an occlusion map of one NIfTI (``.nii``, ``.nii.gz``) or ``.npy``
volume for a 3-D model.

Writes (a) a picture (``--out``) of three orthogonal slices through the voxel
of the strongest drop -- the volume, the map over it and the map alone, with
the colour bar and the label -- and (b) the map on the input's voxel grid
(``--map``): the drop ``base_prob - P`` trilinearly interpolated between patch
centres, as NIfTI with the input's affine and header (it overlays the scan in a
radiology viewer: threshold it at a drop) or as ``.npy``. ``--npy`` adds the raw
grid of probabilities, as for images. The error policy is the images': exit 2
and one line, every output checked before the long work and written atomically.
"""

from __future__ import annotations

import functools
from pathlib import Path

from ..models import input_channels, load_model, model_spatial_dims
from ..monai_nets import is_monai_spec
from ..volumes import Volume, VolumeFileError, map_writer, read_volume, to_display_orientation, volume_suffix
from . import options as opt
from .errors import CLIError
from .explain_segments import refuse_patch_options
from .files import PICTURE_FORMATS, output_file, save_figure, write_files
from .targets import segmentation_target

__all__ = ["run_volume", "volume_color", "VOLUME_ONLY"]

#: Options that only a volume takes.
VOLUME_ONLY = ("--intensity", "--map")


def volume_color(spec, x) -> float:
    """``--color`` for a volume, in the scaled (``--intensity``) space, over the whole volume:
    black its lowest value, gray halfway between lowest and highest, mean its mean; a number as is.

    Example:
        >>> import torch
        >>> volume_color("gray", torch.tensor([[[[0.0, 4.0]]]]))
        2.0
    """
    if spec == "black":
        return float(x.min())
    if spec == "gray":
        return float((x.min() + x.max()) / 2)
    if spec == "mean":
        return float(x.double().mean())
    return float(spec)


def _check_options(args) -> None:
    for option, fix in (("size", "volumes are explained on their own voxel grid; resample beforehand"),
                        ("mean", "scale volumes with --intensity"), ("std", "scale volumes with --intensity")):
        if getattr(args, option) is not None:
            raise CLIError(f"--{option} applies to images; {fix}")


def _map_file(text: str, args) -> Path:
    if volume_suffix(text) is None:
        raise CLIError(f"--map {text}: a map is written as .nii, .nii.gz (NIfTI, with the input's affine) or "
                       ".npy; give a name ending in one of those")
    return output_file(text, "--map", inputs=[args.image], example="heat.nii.gz")


def _read(path: str) -> Volume:
    try:
        return read_volume(path)
    except VolumeFileError as e:
        raise CLIError(str(e)) from None


def _check_axes(volume: Volume, model_dims, name: str, monai: bool) -> None:
    if model_dims is not None and model_dims != 3:
        fix = ("use --spatial-dims 3" if monai else
               "give a 3-D model (--model monai:resnet18 --spatial-dims 3, say)")
        what = {1: "signals", 2: "2-D images"}.get(model_dims, f"{model_dims}-D inputs")
        raise CLIError(f"{name} takes {what} (its first convolution is {model_dims}-D), but {volume.path} is a "
                       f"3-D volume; {fix}")


def run_volume(args) -> int:
    import numpy as np
    import torch

    from ..viz import approximate_pixels, display_scale, drop_limit, upsample_heatmap_nd, volume_figure

    _check_options(args)
    segmenting = args.segments is not None
    if segmenting:
        refuse_patch_options(args)
        if args.segments.kind == "felzenszwalb":
            raise CLIError("--segments felzenszwalb segments 2-D images; for a volume give slic:N or "
                           "file:LABELS.nii.gz")
        patch = stride = drill = None
    else:
        patch, stride, drill = opt.check_settings(args, spatial_dims=3)
    out_png = output_file(args.out or "heat.png", "--out", PICTURE_FORMATS, inputs=[args.image])
    map_suffix = ".npy" if volume_suffix(args.image) == ".npy" else ".nii.gz"
    out_map = _map_file(args.map or str(out_png.with_name(f"{out_png.stem}-map{map_suffix}")), args)
    out_npy = output_file(args.npy, "--npy", inputs=[args.image], example="heat.npy") if args.npy else None
    outputs = [p.resolve() for p in (out_png, out_map, out_npy) if p is not None]
    if len(set(outputs)) < len(outputs):
        raise CLIError("--out, --map and --npy name the same file; give them different names")

    volume = _read(args.image)
    if volume.spatial_dims != 3:
        raise CLIError(f"{args.image} holds a {opt.sizes(volume.spatial_shape)} array ({volume.spatial_dims} "
                       "axes): a volume is (D, H, W) or (C, D, H, W) in a .npy file, 3 spatial axes in NIfTI")
    if not segmenting:
        opt.check_patch(patch, volume.spatial_shape, size_option=None)
    device = opt.resolve_device(args.device)
    monai = is_monai_spec(args.model)
    loaded = load_model(args.model, args.weights, args.num_classes, args.seed,
                        spatial_dims=(args.spatial_dims or 3) if monai else args.spatial_dims,
                        in_channels=(args.in_channels or volume.channels) if monai else args.in_channels)
    model = loaded.model
    _check_axes(volume, model_spatial_dims(model), loaded.name, monai)
    channels = input_channels(model)
    if channels != volume.channels:
        raise CLIError(f"{args.image} has {volume.channels} channel(s) but {loaded.name} takes {channels}; "
                       "give a volume with as many channels" + (" or --in-channels" if monai else ""))
    intensity = args.intensity or opt.intensity("none")
    x = torch.from_numpy(intensity.apply(volume.data))
    target = segmentation_target(args, loaded, x, device)
    if target is None:
        opt.probe_model(loaded, x, device, args.label, args.output)

    color = volume_color(args.color or "black", x)
    if segmenting:
        return _ablate_volume(args, loaded, x, volume, color, channels, device, out_png, out_map, out_npy)
    ex, res, seconds = opt.compile_and_explain(loaded, x, args, patch, stride, color, volume.spatial_shape,
                                               channels, device, drill, target)

    heat = res.heatmap.numpy()
    drop = res.base_prob - upsample_heatmap_nd(heat, volume.spatial_shape, res.patch, res.stride)
    voxel = tuple(int(v) for v in np.unravel_index(int(np.argmax(drop)), drop.shape))
    exact = opt.exactness(args, drill, res)
    what = {"prob": "P", "logit": "logit", "sigmoid": "sigmoid"}[args.output]
    if target is not None:
        what = f"{target.reduce} {what} over the mask,"
    view = to_display_orientation(volume)
    exact_cells = res.stats.get("exact_cells")
    approximate = None if exact_cells is None else view.reorient(
        approximate_pixels(exact_cells, volume.spatial_shape, res.patch, res.stride))
    axis_names = "ijk" if volume.kind == "nifti" else "dhw"
    fig = volume_figure(view.reorient(display_scale(x)), view.reorient(drop), view.voxel_index(voxel), res.label,
                        res.base_prob, limit=drop_limit(res.base_prob - heat), layout=view.layout,
                        spacing=view.zooms, output=res.output, approximate=approximate,
                        voxel_text=f"voxel ({', '.join(map(str, voxel))}) of the file",
                        plane_text=[f"{axis_names[a]} = {voxel[a]}" for a in view.file_axes],
                        subtitle=(f"{loaded.name}, {Path(args.image).name} ({opt.sizes(volume.spatial_shape)}, "
                                  f"intensity {intensity}): patch {opt.sizes(patch)}, stride {opt.sizes(stride)}, "
                                  f"{opt.sizes(heat.shape)} positions ({exact})"))
    description = f"krypton_fx: drop in {what}(class {res.label}) when occluded"
    writers = {out_png: functools.partial(save_figure, fig, out_png.suffix.lower().lstrip(".")),
               out_map: map_writer(drop, volume, out_map, description)}
    if out_npy is not None:
        writers[out_npy] = functools.partial(np.save, arr=heat)
    write_files(writers)

    print(f"{loaded.name} on {args.image} ({opt.sizes(volume.spatial_shape)} voxels, {volume.channels} "
          f"channel{'s' if volume.channels != 1 else ''}, intensity {intensity}): class {res.label}, "
          f"{what} = {res.base_prob:.4f}")
    ran = res.stats.get("positions_run", ex.positions)
    count = f"{ran} of {ex.positions} positions run" if ran != ex.positions else f"{ex.positions} positions"
    print(f"heat map {opt.sizes(heat.shape)} ({count}, batch {min(ex.batch_size, ran)}) in {seconds:.2f} s on "
          f"{device}; lowest {what} {heat.min():.4f}, strongest drop {float(drop.max()):.4f} at voxel {voxel}")
    note = opt.peak_note(res)
    if note:
        print(f"approximate: {note}")
    kind = "NIfTI, the input's affine" if volume_suffix(out_map) != ".npy" else "numpy"
    for path in writers:
        note = f" (drop in {what} on the input's grid, {kind})" if path == out_map else ""
        print(f"wrote {path}{note}")
    return 0


def _ablate_volume(args, loaded, x, volume: Volume, color: float, channels: int, device, out_png, out_map,
                   out_npy) -> int:
    """``--segments`` on a volume: supervoxels (SLIC) or a label volume, each ablated with ``--color``; the
    picture and ``--map`` show each voxel's segment's drop, ``--npy`` the per-segment scores."""
    import time

    import numpy as np

    from .. import segments
    from ..explainer import compile as compile_explainer
    from ..viz import display_scale, volume_figure

    shape = volume.spatial_shape
    if args.segments.kind == "slic":
        labels = segments.slic(display_scale(x)[None], n_segments=int(args.segments.value), compactness=0.1)
    else:
        try:
            labels = segments.read_labels(args.segments.value)
        except ValueError as e:
            raise CLIError(str(e)) from None
        if tuple(labels.shape) != tuple(shape):
            raise CLIError(f"--segments {args.segments}: the labels are {opt.sizes(labels.shape)} but {args.image} "
                           f"is {opt.sizes(shape)}; give a label volume on the scan's voxel grid")
    ex = compile_explainer(loaded.model, patch=1, stride=shape, image_size=shape, tau=args.tau,
                           batch_size=args.batch_size, device=device, channels=channels, output=args.output)
    if loaded.warning:
        from .errors import warn
        warn(loaded.warning)
    start = time.perf_counter()
    res = ex.ablate(x.to(device), labels, baseline=color, label=args.label, progress=True)
    seconds = time.perf_counter() - start
    drop = res.drop.numpy()[labels.numpy()]
    voxel = tuple(int(v) for v in np.unravel_index(int(np.argmax(drop)), drop.shape))
    what = "P" if args.output == "prob" else "logit"
    view = to_display_orientation(volume)
    axis_names = "ijk" if volume.kind == "nifti" else "dhw"
    exact = "exact" if args.tau >= 1.0 else f"tau={args.tau:g}, approximate"
    fig = volume_figure(view.reorient(display_scale(x)), view.reorient(drop), view.voxel_index(voxel), res.label,
                        res.base_prob, limit=float(np.abs(res.drop.numpy()).max()) or 1.0, layout=view.layout,
                        spacing=view.zooms, output=res.output,
                        voxel_text=f"voxel ({', '.join(map(str, voxel))}) of the file",
                        plane_text=[f"{axis_names[a]} = {voxel[a]}" for a in view.file_axes],
                        subtitle=(f"{loaded.name}, {Path(args.image).name}: {len(res.ids)} segments "
                                  f"({args.segments}), ablated with {color:g} ({exact})"))
    description = f"krypton_fx: drop in {what}(class {res.label}) when the voxel's segment is ablated"
    writers = {out_png: functools.partial(save_figure, fig, out_png.suffix.lower().lstrip(".")),
               out_map: map_writer(drop, volume, out_map, description)}
    if out_npy is not None:
        writers[out_npy] = functools.partial(np.save, arr=res.scores.numpy())
    write_files(writers)
    print(f"{loaded.name} on {args.image} ({opt.sizes(shape)} voxels): class {res.label}, "
          f"{what} = {res.base_prob:.4f}")
    print(f"{len(res.ids)} segments ({args.segments}, {res.programs} box sizes) ablated in {seconds:.2f} s on "
          f"{device}; strongest drop {float(drop.max()):.4f} at voxel {voxel}")
    for path in writers:
        print(f"wrote {path}")
    return 0
