"""Ray (the ``krypton_fx[ray]`` extra): a local instance with 2 CPU workers gives the same maps, bit
for bit, as one process; a worker killed mid-run loses no image and duplicates none; the CLI's
``--ray`` writes the same folder as a run in one process, with none of Ray's own log lines on the terminal.
Skipped where Ray is not installed."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'krypton_fx[ray]')")
pytest.importorskip("ray.data", reason="Ray Data needs pandas and pyarrow (pip install 'krypton_fx[ray]')")

import krypton_fx  # noqa: E402
from krypton_fx import lesions  # noqa: E402
from krypton_fx.scale.cluster import explain_dataset  # noqa: E402
from krypton_fx.scale.files import default_reader  # noqa: E402

SIZE = 32
SETTINGS = dict(patch=8, stride=4)


def tiny_model():
    torch.manual_seed(0)
    return lesions.build_model("tiny").eval()


def write_images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    images, _, _ = lesions.make_dataset(n, SIZE, seed=21)
    paths = []
    for i, x in enumerate(images):
        path = folder / f"img{i}.png"
        Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def one_process_maps(paths) -> list[np.ndarray]:
    ex = krypton_fx.compile(tiny_model(), image_size=(SIZE, SIZE), **SETTINGS)
    return [ex(default_reader(p)[0]).heatmap.numpy() for p in paths]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def test_two_cpu_workers_give_the_maps_of_one_process_bit_for_bit(local_ray, tmp_path):
    paths = write_images(tmp_path / "in", 6)
    rows = sorted(explain_dataset(paths, tiny_model(), out_dir=str(tmp_path / "out"), workers=2,
                                  images_per_batch=2, **SETTINGS).iter_rows(), key=lambda r: r["index"])
    assert [r["index"] for r in rows] == list(range(6))
    assert {r["status"] for r in rows} == {"ok"}
    for row, path, expected in zip(rows, paths, one_process_maps(paths)):
        assert row["path"] == path
        np.testing.assert_array_equal(row["heatmap"], expected)
        np.testing.assert_array_equal(np.load(tmp_path / "out" / f"{row['output']}.npy"), expected)
        assert (tmp_path / "out" / f"{row['output']}.png").is_file()

    # Arrays instead of files: a dataset with an image column (uint8, as ray.data.read_images gives).
    arrays = [np.array(Image.open(p)) for p in paths[:3]]
    ds = ray.data.from_items([{"image": a} for a in arrays])
    rows = sorted(explain_dataset(ds, tiny_model(), workers=2, images_per_batch=2, **SETTINGS).iter_rows(),
                  key=lambda r: r["index"])
    for row, expected in zip(rows, one_process_maps(paths[:3])):
        np.testing.assert_array_equal(row["heatmap"], expected)


class DyingReader:
    """Reads like the default reader, but the first actor to reach its ``k``-th image dies there, once."""

    def __init__(self, marker: str, k: int):
        self.marker, self.k, self.calls = marker, k, 0

    def __call__(self, path):
        self.calls += 1
        if self.calls == self.k:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os._exit(1)  # the worker process dies mid-batch, as on a lost node
        return default_reader(path)


def test_a_worker_killed_mid_run_loses_no_image_and_duplicates_none(local_ray, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    paths = write_images(tmp_path / "in", 8)
    marker = tmp_path / "died"
    out = tmp_path / "out"
    ds = explain_dataset(paths, tiny_model(), out_dir=str(out), reader=DyingReader(str(marker), 3), workers=2,
                         images_per_batch=2, **SETTINGS)
    rows = list(ds.iter_rows())
    assert marker.exists(), "no worker died: the test did not test anything"
    assert sorted(r["index"] for r in rows) == list(range(8))  # none lost, none twice
    assert {r["status"] for r in rows} == {"ok"}
    assert sorted(p.name for p in out.glob("*.npy")) == sorted(f"img{i}.npy" for i in range(8))
    assert not list(out.rglob("*.tmp"))
    for path, expected in zip(paths, one_process_maps(paths)):
        np.testing.assert_array_equal(np.load(out / (Path(path).stem + ".npy")), expected)


def test_cli_ray_writes_what_one_process_writes(local_ray, tmp_path):
    write_images(tmp_path / "in", 4)
    (tmp_path / "tinynet.py").write_text("import torch\nfrom krypton_fx import lesions\n\n\ndef build():\n"
                                         "    torch.manual_seed(0)\n    return lesions.build_model('tiny').eval()\n")
    args = ["explain", "in", "--model", "tinynet:build", "--size", str(SIZE), "--mean", "0", "--std", "1",
            "--color", "0", "--patch", "8", "--stride", "4"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    ray_run = subprocess.run([sys.executable, "-m", "krypton_fx", *args, "--out-dir", "ray-out", "--ray", "auto",
                              "--workers", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert ray_run.returncode == 0, ray_run.stderr
    # The terminal holds the run's own lines only; Ray's (its C++ core's "core_worker.cc:...: Actor with
    # class name ...", its loggers, its progress bars) stay in its log folder, which the run names.
    ours = ("krypton-fx: ", "4 images: 4 explained", "wrote ray-out/summary.csv", "Ray's own logs: ")
    foreign = [line for line in (ray_run.stdout + ray_run.stderr).splitlines() if not line.startswith(ours)]
    assert not foreign, "\n".join(foreign)
    logs = Path(ray_run.stdout.split("Ray's own logs: ")[1].split("\n")[0])
    assert (logs / "krypton-fx-driver.err").is_file() and (logs / "ray-data").is_dir()
    one = subprocess.run([sys.executable, "-m", "krypton_fx", *args, "--out-dir", "one-out", "--device", "cpu"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr

    def rows(folder):
        with open(tmp_path / folder / "summary.csv", newline="") as f:
            return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]

    assert rows("ray-out") == rows("one-out")
    for i in range(4):
        np.testing.assert_array_equal(np.load(tmp_path / "ray-out" / f"img{i}.npy"),
                                      np.load(tmp_path / "one-out" / f"img{i}.npy"))
