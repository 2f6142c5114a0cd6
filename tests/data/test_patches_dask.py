"""``dqtool patches`` on Dask (issue 16): one source image a task, the client the one writer; the cache is
the serial run's, byte for byte, also when a worker dies mid-task; a corrupt image is one line naming it."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from dqtool.data.io import write_image_png
from dqtool_cli.main import cli
from factories import disc_images


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("patches_dask") / "imgs"
    root.mkdir()
    images, labels = disc_images(n_images=5, size=96, seed=4)
    for i, (image, label) in enumerate(zip(images, labels)):
        write_image_png(root / f"{i:03d}_img.png", image)
        write_image_png(root / f"{i:03d}_masks.png", label.astype(np.uint16))
    return root


def contents(path) -> dict:
    """Every dataset (bytes, dtype, shape, chunks, compression) and attribute of an HDF5 file, by name."""
    out = {}
    with h5py.File(path, "r") as h5:
        out["/"] = sorted((k, str(v)) for k, v in h5.attrs.items())

        def visit(name, obj):
            attrs = sorted((k, str(v)) for k, v in obj.attrs.items())
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                out[name] = (data.tobytes() if data.dtype.kind != "O" else repr(data.tolist()), str(obj.dtype),
                             obj.shape, obj.chunks, obj.compression, attrs)
            else:
                out[name] = attrs

        h5.visititems(visit)
    return out


def patches(folder, out, *extra):
    result = CliRunner().invoke(cli, ["--quiet", "patches", str(folder), "--out", str(out), "--size", "48",
                                      "--stride", "32", *extra])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def serial(folder):
    return patches(folder, folder.parent / "serial.h5")


def test_the_cache_equals_the_serial_one(folder, serial, dask_scheduler, tmp_path):
    distributed = patches(folder, tmp_path / "c.h5", "--scheduler", dask_scheduler)
    assert contents(distributed) == contents(serial)
    assert distributed.read_bytes() == serial.read_bytes()  # the same writes in the same order: the same file


def test_a_worker_that_dies_mid_task_changes_nothing(folder, serial, dask_scheduler, worker_death, tmp_path):
    flag = worker_death("patches")
    distributed = patches(folder, tmp_path / "c.h5", "--scheduler", dask_scheduler)
    assert flag.exists()  # a worker did die running a task
    assert distributed.read_bytes() == serial.read_bytes()


def test_ome_zarr_bands_give_the_serial_cache(dask_scheduler, tmp_path, monkeypatch):
    pytest.importorskip("ome_zarr.writer", reason="needs the extra dqtool[zarr]")
    import dqtool.data.cache_build as cache_build
    from test_ome_zarr import write_ome_zarr

    images, labels = disc_images(n_images=1, size=200, n_cells=20, seed=2)
    source = tmp_path / "zarrs"
    source.mkdir()
    write_ome_zarr(source / "a.ome.zarr", images[0], labels[0], chunks=40)
    serial = patches(source, tmp_path / "s.h5")
    monkeypatch.setattr(cache_build, "BAND_ROWS", 1)  # one task per chunk row: several bands per image
    samples = cache_build.open_dataset(source).samples
    assert len(cache_build._pieces(samples, cache_build.PatchOptions(size=48, stride=32))) > 2
    distributed = patches(source, tmp_path / "d.h5", "--scheduler", dask_scheduler)
    assert contents(distributed) == contents(serial)


def test_a_corrupt_image_is_one_line_naming_it(folder, tmp_path):
    """Through ``--workers 2`` (a LocalCluster of its own): the task's InputError, not a Dask traceback."""
    import shutil

    bad = tmp_path / "imgs"
    shutil.copytree(folder, bad)
    (bad / "003_img.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png" * 10)
    result = subprocess.run([sys.executable, "-m", "dqtool", "--quiet", "patches", str(bad), "--out",
                             str(tmp_path / "c.h5"), "--size", "48", "--workers", "2"], capture_output=True, text=True,
                            timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "003_img.png" in lines[0], lines
    assert not (tmp_path / "c.h5").exists()
