"""The output folder of a many-image run: names, resumption, records and the summary.

Per image ``OUT/<stem>.png`` (the picture) and ``OUT/<stem>.npy`` (the raw
map) are written together and atomically; then a small record,
``OUT/.krypton-fx/<stem>.json``, says that they are complete and holds the
image's summary row and the settings that made it. An image is *complete*
exactly when its record exists: a rerun skips it (``overwrite`` redoes it),
and a run killed between the outputs and the record just redoes that image.
``OUT/summary.csv`` (one row per input of the run) is written atomically at
the end of every run, from the rows of this run and the records of earlier ones.

Names: the file's stem (``scan`` for ``a/scan.png``). Two inputs with the
same stem (``a/scan.png``, ``b/scan.png``, ``scan.jpg``) keep their names
stable across reruns: a path that has a record keeps its stem; a new path
gets the plain stem if no other input or record holds it, else
``<stem>-<8 hex digits of a hash of its absolute path>``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from .. import common
from ..atomic import TEMP_PREFIX, write_atomically

__all__ = ["Task", "OutputFolder", "OutputConflict", "COLUMNS", "SUMMARY", "RECORDS", "result_row", "error_row"]

SUMMARY = "summary.csv"
RECORDS = ".krypton-fx"
# "probability" holds the logit when the run records logits (output="logit").
COLUMNS = ("path", "output", "label", "class", "probability", "drop", "drop_y", "drop_x", "seconds", "status",
           "error")


class OutputConflict(ValueError):
    """The output folder cannot take this run as asked (it would overwrite an input, or mix settings)."""


@dataclasses.dataclass(frozen=True)
class Task:
    """One input of the run: its position, its file and its output stem."""

    index: int
    path: str
    stem: str


def _key(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _safe_stem(path: str) -> str:
    stem = Path(path).name
    for suffix in (".gz", ".bz2", ".xz"):
        stem = stem[: -len(suffix)] if stem.lower().endswith(suffix) else stem
    stem = Path(stem).stem or stem
    stem = re.sub(r"[^\w.+-]+", "_", stem).lstrip(".") or "image"
    return stem


def result_row(task: Task, res, seconds: float, categories: Optional[Sequence[str]] = None) -> dict:
    """The summary row of an explained image: label, score, strongest drop and where (patch top-left)."""
    heat = res.heatmap.numpy() if hasattr(res.heatmap, "numpy") else np.asarray(res.heatmap)
    cell = np.unravel_index(int(np.argmin(heat)), heat.shape)
    where = [int(c) * int(s) for c, s in zip(cell, res.stride)]
    name = categories[res.label] if categories and res.label < len(categories) else ""
    return {"path": task.path, "output": task.stem, "label": int(res.label), "class": name,
            "probability": f"{res.base_prob:.6g}", "drop": f"{res.base_prob - float(heat[cell]):.6g}",
            "drop_y": where[0], "drop_x": where[-1], "seconds": f"{seconds:.3f}", "status": "ok", "error": ""}


def error_row(task: Task, error: BaseException) -> dict:
    text = common.first_line(error)
    row = {c: "" for c in COLUMNS}
    row.update(path=task.path, output=task.stem, status="error", error=re.sub(r"\s+", " ", text))
    return row


class OutputFolder:
    """One run's output folder.

    Args:
        root: the folder (created by the caller).
        fingerprint: the settings that make a map (model, weights, patch, ...);
            a complete output made with other settings is an :class:`OutputConflict`
            unless ``overwrite``.
        overwrite: redo complete images.
    """

    def __init__(self, root: "str | os.PathLike", fingerprint: Optional[dict] = None, overwrite: bool = False):
        self.root = Path(root)
        self.records = self.root / RECORDS
        self.fingerprint = json.loads(json.dumps(fingerprint or {}))  # what a record will hold
        self.overwrite = overwrite

    def png(self, stem: str) -> Path:
        return self.root / f"{stem}.png"

    def npy(self, stem: str) -> Path:
        return self.root / f"{stem}.npy"

    def record(self, stem: str) -> Path:
        return self.records / f"{stem}.json"

    def read_record(self, stem: str) -> Optional[dict]:
        try:
            return json.loads(self.record(stem).read_text())
        except (OSError, ValueError):
            return None

    def _existing(self) -> dict[str, str]:
        """stem -> the input's absolute path, from the records."""
        found = {}
        if self.records.is_dir():
            for f in self.records.glob("*.json"):
                rec = self.read_record(f.stem)
                if rec and "key" in rec:
                    found[f.stem] = rec["key"]
        return found

    def assign_stems(self, paths: Sequence[str]) -> list[Task]:
        """One task per path, with stable, distinct output stems (see the module's docstring)."""
        existing = self._existing()
        by_key = {key: stem for stem, key in existing.items()}
        taken = set(existing)
        tasks = []
        for index, path in enumerate(paths):
            key = _key(path)
            stem = by_key.get(key)
            if stem is None:
                base = _safe_stem(path)
                stem = base
                if stem in taken or stem.lower() == Path(SUMMARY).stem:
                    stem = f"{base}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
                n = 2
                while stem in taken:
                    stem = f"{base}-{hashlib.sha1(key.encode()).hexdigest()[:8]}-{n}"
                    n += 1
                by_key[key] = stem
            taken.add(stem)
            tasks.append(Task(index, str(path), stem))
        return tasks

    def check_inputs(self, tasks: Sequence[Task]) -> None:
        """Refuse a run whose outputs would overwrite one of its inputs."""
        inputs = {_key(t.path): t.path for t in tasks}
        outputs = [self.root / SUMMARY] + [p for t in tasks for p in (self.png(t.stem), self.npy(t.stem))]
        for out in outputs:
            hit = inputs.get(_key(str(out)))
            if hit is not None:
                raise OutputConflict(f"output {out} would overwrite the input {hit}; krypton-fx never overwrites "
                                     "an input: choose another --out-dir")

    def complete(self, task: Task) -> Optional[dict]:
        """The earlier run's summary row if ``task``'s outputs are complete, else None.

        Raises:
            OutputConflict: complete, but made with other settings (and not ``overwrite``).
        """
        rec = self.read_record(task.stem)
        if rec is None or rec.get("key") != _key(task.path):
            return None
        if not (self.png(task.stem).is_file() and self.npy(task.stem).is_file()):
            return None
        if self.overwrite:
            return None
        if rec.get("settings") != self.fingerprint:
            theirs, ours = rec.get("settings") or {}, self.fingerprint
            changed = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
            what = ", ".join(f"{k} {theirs.get(k)!r} -> {ours.get(k)!r}" for k in changed[:3])
            raise OutputConflict(f"{self.root} holds a map of {task.path} made with other settings ({what}); "
                                 "use --overwrite to redo it, or another --out-dir")
        row = dict(rec.get("row") or {})
        row.update(path=task.path, output=task.stem, status="skipped", error="")
        return row

    def plan(self, paths: Sequence[str]) -> tuple[list[Task], list[Task], dict[int, dict]]:
        """``(all tasks, tasks still to do, index -> row of each complete one)``."""
        tasks = self.assign_stems(paths)
        self.check_inputs(tasks)
        done = {}
        for t in tasks:
            row = self.complete(t)
            if row is not None:
                done[t.index] = row
        return tasks, [t for t in tasks if t.index not in done], done

    def clean_temporaries(self) -> int:
        """Remove temporaries a killed run left behind (``.<name>.<random>.tmp``); returns how many."""
        removed = 0
        for folder in (self.root, self.records):
            if not folder.is_dir():
                continue
            for f in folder.iterdir():
                if f.name.startswith(TEMP_PREFIX) and f.name.endswith(".tmp") and f.is_file():
                    try:
                        f.unlink()
                        removed += 1
                    except OSError:
                        pass
        return removed

    def write(self, task: Task, heatmap: np.ndarray, picture: Callable[[Any], None], row: dict) -> None:
        """Write the picture and the map (together, atomically), then the record that marks them complete."""
        heat = np.ascontiguousarray(heatmap)
        write_atomically({self.png(task.stem): picture,
                          self.npy(task.stem): lambda f: np.save(f, heat)})
        self.records.mkdir(exist_ok=True)
        record = {"key": _key(task.path), "path": task.path, "settings": self.fingerprint, "row": row}
        write_atomically({self.record(task.stem): lambda f: f.write((json.dumps(record) + "\n").encode())})

    def write_summary(self, rows: Iterable[dict]) -> Path:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
        path = self.root / SUMMARY
        write_atomically({path: lambda f: f.write(buffer.getvalue().encode())})
        return path
