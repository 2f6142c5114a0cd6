"""Dask scale-out of ``dqtool rank`` (issue 16): ratios in one run on this machine, and the per-task time.

Workload: ``BENCH_RANK_DASK_MODELS`` (default 8) seeded random Cellpose 3 networks (``CPnet``, cell probability
shifted so that about 15 % of a field is foreground, as in ``bench_rank``) x ``BENCH_RANK_DASK_IMAGES`` (default
10) images of ``BENCH_RANK_DASK_SIZE`` px (default 224: one tile at the networks' diameter 30): crops of
the real BBBC039 fluorescence fields (``../shared/data/dev/cyto_bbbc039``) when they are here, else seeded
synthetic disc images. ``rank --perturb dropout`` (the default), outputs cache off, one task per (model, image).

Measured, each once, in one run (``extra_info`` and printed):

* serial with 1 torch thread vs ``--workers 2`` (1 thread each), the cluster's start included (what a user
  waits for): target speedup >= 1.7;
* ``--workers 2`` vs the serial default, 2 torch threads: target no slower (ratio <= 1);
* whether the three runs wrote the same ranking and per-image tables;
* the time of one task (one model x one image: serial 1-thread wall / pairs), and Dask's per-task overhead
  (400 empty tasks on a warm 2-worker cluster, wall x workers / tasks) against it: target < 5 %.

The load average before and after is recorded: this 2-core machine is shared.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

N_MODELS = int(os.environ.get("BENCH_RANK_DASK_MODELS", "8"))
N_IMAGES = int(os.environ.get("BENCH_RANK_DASK_IMAGES", "10"))
SIZE = int(os.environ.get("BENCH_RANK_DASK_SIZE", "224"))
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dev" / "cyto_bbbc039" / "images"
TABLES = ("ranking.csv", "per_image.csv")


def _noop(x):
    return x


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    import torch
    from cellpose.resnet_torch import CPnet

    from dqtool.data.io import read_image, write_image_png
    from dqtool.ranking import rank as R

    root = tmp_path_factory.mktemp("bench_rank_dask")
    images = root / "images"
    images.mkdir()
    if DATA.is_dir():
        source = "BBBC039 crops"
        for k, f in enumerate(sorted(DATA.iterdir())[:N_IMAGES]):
            field = read_image(f)
            y, x = (field.shape[0] - SIZE) // 2, (field.shape[1] - SIZE) // 2
            crop = field[y:y + SIZE, x:x + SIZE]
            write_image_png(images / f"f{k:02d}.png", crop)
    else:
        from factories import disc_images

        source = "synthetic discs"
        for k, im in enumerate(disc_images(n_images=N_IMAGES, size=SIZE, n_cells=30, seed=0)[0]):
            write_image_png(images / f"f{k:02d}.png", im)
    first = R.normalise_for_model(read_image(sorted(images.iterdir())[0]))
    models = root / "models"
    models.mkdir()
    x = torch.from_numpy(np.stack([first[:224, :224], np.zeros((224, 224), np.float32)])[None])
    for seed in range(N_MODELS):
        torch.manual_seed(seed)
        net = CPnet([2, 32, 64, 128, 256], 3, sz=3, mkldnn=False).eval()
        with torch.no_grad():
            cellprob = net(x)[0][0, 2]
            net.output[2].bias[2] -= torch.quantile(cellprob.flatten(), 0.85)
        net.save_model(str(models / f"random_{seed}.pth"))
    return root, models, images, source


def _rank(workload, name, threads, cluster=None):
    import torch

    from dqtool.ranking.rank import rank_bank

    root, models, images, _ = workload
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        rank_bank(models, images, out=root / name, cache=False, quiet=True, cluster=cluster)
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    return seconds, {t: (root / name / t).read_bytes() for t in TABLES}


def test_rank_on_dask(benchmark, workload):
    from dqtool.common.cluster import Cluster, client_for, run_tasks

    pairs = N_MODELS * N_IMAGES
    load_before = os.getloadavg()
    serial1_s, serial1 = _rank(workload, "serial1", threads=1)
    serial2_s, serial2 = _rank(workload, "serial2", threads=2)
    result = {}

    def on_two_workers():
        result["s"], result["tables"] = _rank(workload, "workers2", threads=1, cluster=Cluster(workers=2))

    benchmark.pedantic(on_two_workers, rounds=1, iterations=1)
    workers2_s = result["s"]

    with client_for(Cluster(workers=2), quiet=True) as client:
        client.wait_for_workers(2)
        run_tasks(_noop, list(range(20)), client=client, quiet=True)  # warm
        t0 = time.perf_counter()
        run_tasks(_noop, list(range(400)), client=client, quiet=True)
        dask_per_task = (time.perf_counter() - t0) * 2 / 400
    task_s = serial1_s / pairs

    info = {
        "workload": f"{N_MODELS} random CPnets x {N_IMAGES} {workload[3]} of {SIZE} px, --perturb dropout",
        "tasks (model x image)": pairs,
        "seconds": {"serial 1 thread": serial1_s, "serial 2 threads": serial2_s, "workers 2": workers2_s},
        "speedup serial 1 thread / workers 2 (target >= 1.7)": serial1_s / workers2_s,
        "workers 2 / serial 2 threads (target <= 1)": workers2_s / serial2_s,
        "same tables serial 1 thread vs workers 2": serial1 == result["tables"],
        "same tables serial 1 thread vs 2 threads": serial1 == serial2,
        "task: one model x one image (s)": task_s,
        "dask overhead per task (s)": dask_per_task,
        "overhead / task (target < 5 %)": dask_per_task / task_s,
        "load before": load_before,
        "load after": os.getloadavg(),
    }
    benchmark.extra_info.update({k: str(v) for k, v in info.items()})
    for k, v in info.items():
        print(f"{k}: {v}")
