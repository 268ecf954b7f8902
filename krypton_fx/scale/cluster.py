"""A Ray cluster (``pip install 'krypton_fx[ray]'``): Ray Data streams batches of images to
actors, one per worker, each of which compiles once and reuses its explainers.

Topology: the driver (the ``krypton-fx`` process, or your Python session)
plans the run (names, what is complete) and builds a ``ray.data`` dataset of
``(index, path, stem)`` rows; ``map_batches`` runs :class:`RayWorker`
actors (one GPU each, or one CPU each on a cluster without GPUs) that read
the files, explain them and write ``<stem>.png``/``<stem>.npy`` and their
records into the output folder themselves (atomically, as in one process);
the rows of the summary stream back to the driver, which writes
``summary.csv``. Ray Data restarts an actor that dies and runs its batch
again, so a lost worker loses no image; its half-done batch is redone
whole, and every write is an atomic replace, so nothing is half-written and
no image appears twice.

On a real cluster the input files and the output folder must be on a file
system every node sees (NFS, a mounted bucket) under the same paths, and
krypton_fx (with the same torch) must be installed on every node; a model
from ``package.module:callable`` must be importable there too.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from .files import FileJob, FileWorker
from .outputs import COLUMNS, OutputFolder, Task

__all__ = ["init_ray", "start_quietly", "run_on_ray", "explain_dataset", "RayWorker"]

logger = logging.getLogger(__name__)

_RAY_HINT = "install the Ray extra: pip install 'krypton_fx[ray]'"


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401  (needs pandas and pyarrow: the extra brings them)
    except ImportError as e:
        raise ValueError(f"Ray is not available ({e}); {_RAY_HINT}") from None
    return ray


def init_ray(address: Optional[str] = "auto", **kwargs) -> Optional[Path]:
    """Connect to Ray unless already connected: ``auto`` joins the cluster this machine belongs to
    (``ray start``, ``RAY_ADDRESS``) or starts a local one; anything else is a cluster address.

    Returns:
        The folder of this Ray session's logs on this machine (``/tmp/ray/session_*/logs`` by
        default), or None where Ray was connected already.
    """
    ray = _ray()
    if ray.is_initialized():
        return None
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("logging_level", logging.WARNING)
    if address in (None, "auto", "local"):
        if address == "auto":
            try:
                return _logs_folder(ray.init(address="auto", **kwargs))
            except (ConnectionError, RuntimeError):
                pass
        return _logs_folder(ray.init(**kwargs))
    try:
        return _logs_folder(ray.init(address=address, **kwargs))
    except (ConnectionError, RuntimeError) as e:
        raise ValueError(f"cannot connect to the Ray cluster at {address} ({e}); check the address "
                         "(ray status on the head node shows it), or use --ray auto") from None


def _logs_folder(context) -> Optional[Path]:
    session = (getattr(context, "address_info", None) or {}).get("session_dir")
    return Path(session) / "logs" if session else None


def start_quietly(address: Optional[str] = "auto") -> Optional[Path]:
    """Connect to Ray as :func:`init_ray` does, with Ray's own output kept in its log folder rather
    than on this process's terminal: its driver loggers at ERROR, the workers' output not forwarded
    (``log_to_driver=False``; it stays in their log files), Ray Data's progress bars off and its
    console messages held back (its log file, ``logs/ray-data``, keeps them). What Ray's native core
    writes to this process's stderr is the caller's to redirect (the command line does, into the
    returned folder). Returns the folder, as :func:`init_ray` does."""
    ray = _ray()
    _quiet(ray)
    return init_ray(address, log_to_driver=False, logging_level=logging.ERROR)


class RayWorker:
    """A Ray Data actor: builds one :class:`FileWorker` (one compile) and explains batch after batch."""

    def __init__(self, job_ref: list, use_gpu: bool):
        ray = _ray()
        job = job_ref[0]
        job = ray.get(job) if isinstance(job, ray.ObjectRef) else job
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.worker = FileWorker(job, device)

    def __call__(self, batch: dict) -> dict:
        tasks = [Task(int(i), str(p), str(s)) for i, p, s in zip(batch["index"], batch["path"], batch["stem"])]
        arrays = dict(zip((t.index for t in tasks), batch["image"])) if "image" in batch else None
        out: dict = {"index": [], **{c: [] for c in COLUMNS}, "heatmap": []}
        for task, row, heat in self.worker.run(tasks, arrays):
            out["index"].append(task.index)
            for c in COLUMNS:
                out[c].append(str(row.get(c, "")))
            out["heatmap"].append(np.zeros((0, 0), np.float32) if heat is None else heat)
        out["index"] = np.asarray(out["index"], dtype=np.int64)
        for c in COLUMNS:
            out[c] = np.asarray(out[c], dtype=object)
        heats = out["heatmap"]
        same = len({h.shape for h in heats}) == 1
        out["heatmap"] = np.stack(heats) if same else np.array(heats + [None], dtype=object)[:-1]
        return out


def _quiet(ray) -> None:
    """The command line has its own progress bar: no Ray Data progress bars, and Ray Data's console
    handlers held back (its file handler, at its own level, still writes every record)."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.CRITICAL + 1)
    logging.getLogger("ray").setLevel(logging.ERROR)


def _resources(ray, workers: Optional[int]) -> tuple[int, bool]:
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if workers is None:
        workers = gpus or 2
    return workers, gpus > 0


def _map(ds, job: FileJob, workers: Optional[int], images_per_batch: int, ray):
    workers, use_gpu = _resources(ray, workers)
    return ds.map_batches(RayWorker, fn_constructor_args=([job], use_gpu), batch_size=images_per_batch,
                          compute=ray.data.ActorPoolStrategy(size=workers), batch_format="numpy",
                          **({"num_gpus": 1} if use_gpu else {"num_cpus": 1}))


def run_on_ray(job: FileJob, tasks: Sequence[Task], address: Optional[str] = "auto",
               workers: Optional[int] = None, images_per_batch: Optional[int] = None
               ) -> Iterator[tuple[Task, dict, None]]:
    """``(task, row, None)`` for every task, as the actors finish them (the maps are in the output folder)."""
    ray = _ray()
    start_quietly(address)  # failures come back as rows; Ray's own logs would only be noise here
    per_batch = images_per_batch or max(1, min(job.chunk, -(-len(tasks) // (2 * (workers or 2)))))
    # Workers run elsewhere (another folder, another node): they get absolute paths.
    job = dataclasses.replace(job, out_dir=os.path.abspath(job.out_dir)) if job.out_dir else job
    ds = ray.data.from_items([{"index": t.index, "path": os.path.abspath(t.path), "stem": t.stem} for t in tasks])
    by_index = {t.index: t for t in tasks}
    for row in _map(ds, job, workers, per_batch, ray).select_columns(["index", *COLUMNS]).iter_rows():
        task = by_index[int(row["index"])]
        yield task, {c: row[c] for c in COLUMNS} | {"path": task.path}, None


def explain_dataset(data: Any, model: torch.nn.Module, out_dir: Optional[str] = None, *,
                    reader=None, label: Optional[int] = None, workers: Optional[int] = None,
                    images_per_batch: int = 8, address: Optional[str] = "auto", overwrite: bool = False,
                    **compile_kwargs):
    """Occlusion maps on a Ray cluster: a ``ray.data.Dataset`` with one row per image and its map.

    Args:
        data: file paths, or a ``ray.data.Dataset`` with a ``path`` column (files) or
            an ``image`` column (``(H, W, C)`` uint8 arrays as ``ray.data.read_images``
            gives, or ``(C, H, W)`` float model inputs).
        model: the model (pickled to every worker; its class must be importable there).
        out_dir: if given, the workers write ``<stem>.png``, ``<stem>.npy`` and their
            records there, as ``krypton-fx explain --out-dir`` does (atomic and resumable:
            complete images are left out; ``overwrite`` redoes them). Needs file paths.
        reader: path -> ``(model input, picture or None, colour or None)``; default:
            the file at its own size in ``[0, 1]`` (:func:`krypton_fx.scale.files.default_reader`).
        label: the class to explain in every image (default: the prediction).
        workers: actors (default: one per GPU of the cluster, else 2).
        images_per_batch: images per batch sent to an actor.
        address: ``auto`` (the cluster this machine belongs to, else a local one) or an address.
        compile_kwargs: ``krypton_fx.compile`` arguments (patch, stride, color, tau, ...).

    Returns:
        A lazy ``ray.data.Dataset`` with ``index``, the summary columns
        (:data:`krypton_fx.scale.outputs.COLUMNS`) and ``heatmap``; iterate it or
        ``materialize()`` it to run. Rows come in no particular order: sort by ``index``.

    Example:
        >>> ds = explain_dataset(["a.png", "b.png"], model, patch=8, stride=8)  # doctest: +SKIP
        >>> maps = {r["path"]: r["heatmap"] for r in ds.iter_rows()}             # doctest: +SKIP
    """
    ray = _ray()
    init_ray(address)
    color = compile_kwargs.pop("color", 0.0)
    job = FileJob(model.cpu().eval(), out_dir, compile_kwargs, reader=reader, color=color, label=label,
                  fingerprint={"compile": {k: repr(v) for k, v in sorted(compile_kwargs.items())},
                               "color": repr(color), "label": label, "model": type(model).__name__})
    if isinstance(data, ray.data.Dataset):
        if "image" in data.columns():
            if out_dir is not None:
                raise ValueError("out_dir needs file paths: give paths (or a dataset with a 'path' column)")
            ds = _indexed(data, ray)
            return _map(ds, job, workers, images_per_batch, ray)
        if "path" not in data.columns():
            raise ValueError(f"the dataset needs a 'path' or an 'image' column, has {data.columns()}")
        paths = [r["path"] for r in data.select_columns(["path"]).take_all()]
    else:
        paths = [str(p) for p in data]
    paths = [os.path.abspath(p) for p in paths]  # the workers may run in another folder
    if out_dir is not None:
        out_dir = job.out_dir = os.path.abspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        folder = OutputFolder(out_dir, job.fingerprint, overwrite=overwrite)
        job.fingerprint = folder.fingerprint
        folder.clean_temporaries()
        _, todo, _ = folder.plan(paths)
    else:
        todo = [Task(i, p, f"image-{i}") for i, p in enumerate(paths)]
    ds = ray.data.from_items([{"index": t.index, "path": t.path, "stem": t.stem} for t in todo])
    return _map(ds, job, workers, images_per_batch, ray)


def _indexed(data, ray):
    """An image dataset with ``index``, ``path`` (a name) and ``stem`` columns, numbered in order.

    Numbering in order needs the rows on the driver once (Ray Data has no stable row number):
    fine for thousands of small images; for more, give paths, which stream.
    """
    rows = data.take_all()
    items = []
    for i, r in enumerate(rows):
        name = str(r.get("path", f"images[{i}]"))
        items.append({"index": i, "path": name, "stem": f"image-{i}", "image": r["image"]})
    return ray.data.from_items(items)
