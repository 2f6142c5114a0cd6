"""Dask scale-out of ``dqtool embed`` (issue 16): ratios in one run on this machine, and Dask's per-task cost.

Workload: a cache of ``BENCH_EMBED_PATCHES`` (default 4,000; rounded up to whole images of 64 patches: 4,032)
gray 224 x 224 patches cut from seeded synthetic disc images, embedded by a seeded ViT-Tiny MAE file (``--weights``: no pretraining, the same encoder in every
run) at the default batch size (64) and chunk (:data:`dqtool.features.embed.CHUNK_PATCHES` patches a task).

Measured, each once, in one run (``extra_info`` and printed):

* serial with 1 torch thread (``--threads 1``, the CLI default) vs ``--workers 2`` (1 thread each), the
  cluster's start included (what a user waits for): target speedup >= 1.7;
* the CPU seconds of each run (this process plus the workers'): other jobs on a shared machine take cores
  away from a parallel run, not CPU seconds from it, so 2 x serial CPU / workers' CPU bounds the speedup an
  idle 2-core machine would give;
* ``--workers 2`` vs serial with 2 torch threads (``--threads 2``): target no slower (ratio <= 1);
* the machine's own ceiling: two plain processes (no Dask), each embedding half the chunks, at once;
* whether the three runs stored the same feature bytes;
* Dask's per-task overhead: 400 empty tasks on the 2-worker cluster (wall x workers / tasks), and a task's
  own fixed cost (open the cache read-only, check its hash, read an empty range: ``embed_range``),
  both against the time of one task at the default chunk size (serial 1-thread time / chunks): target < 5 %.

The load average (``os.getloadavg``) before and after is recorded: this 2-core machine is shared.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

N_PATCHES = int(os.environ.get("BENCH_EMBED_PATCHES", "4000"))


def _noop(x):
    return x


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    from dqtool.data.cache_build import build_cache_from_arrays
    from dqtool.features.mae import MaskedAutoencoderViT
    from dqtool.features.pretrain import save_mae
    from factories import disc_images

    root = tmp_path_factory.mktemp("bench_dask")
    per_image = 8 * 8  # a 1008 x 1008 image: 8 x 8 windows of 224 at stride 112
    n_images = -(-N_PATCHES // per_image)
    images, _ = disc_images(n_images=n_images, size=1008, n_cells=400, radius=(8.0, 14.0), seed=0)
    cache = build_cache_from_arrays(root / "base.h5", images, None, [f"img{i:03d}" for i in range(n_images)],
                                    size=224, stride=112)
    weights = root / "mae.pt"
    save_mae(MaskedAutoencoderViT("mae_tiny_patch16", seed=0), weights, {})
    return root, cache, weights


def _worker_cpu(client) -> float:
    return sum(client.run(time.process_time).values()) if client is not None else 0.0


def _embed(workload, name, client=None, **kwargs):
    """(wall s, CPU s of this process and of the workers, features) of one ``embed_cache``."""
    from dqtool.features.embed import embed_cache

    root, cache, weights = workload
    path = root / f"{name}.h5"
    shutil.copyfile(cache, path)
    cpu0, workers0, t0 = time.process_time(), _worker_cpu(client), time.perf_counter()
    feats = embed_cache(path, weights=weights, batch_size=64, quiet=True, **kwargs)
    wall = time.perf_counter() - t0
    return wall, {"client": time.process_time() - cpu0, "workers": _worker_cpu(client) - workers0}, feats


_HALF = """
import sys, time
from dqtool.features.embed import embed_range
cache, content, weights, key, first, last, step = sys.argv[1:8]
for a in range(int(first), int(last), int(step)):
    embed_range((a, min(int(last), a + int(step))), cache, content, weights, key, batch_size=64, threads=1)
"""


def _two_plain_processes(cache, content, weights, key, n, step):
    """The machine's own ceiling: two independent processes, each embedding half the chunks, at once."""
    import resource
    import subprocess
    import sys

    half = -(-n // step // 2) * step
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", _HALF, str(cache), content, str(weights), key, str(a), str(b),
                               str(step)], env={**os.environ, "OMP_NUM_THREADS": "1"})
             for a, b in ((0, half), (half, n))]
    assert all(p.wait() == 0 for p in procs)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def test_embed_on_dask(benchmark, workload):
    from dqtool.common.cluster import Cluster, client_for, run_tasks
    from dqtool.data.cache import PatchCache
    from dqtool.features.embed import CHUNK_PATCHES, embed_range
    from dqtool.features.mae import FEATURE_RECIPE, encoder_hash
    from dqtool.features.pretrain import load_mae_weights

    root, cache, weights = workload
    with PatchCache(cache) as c:
        n, content = len(c), c.content_hash
    load_before = os.getloadavg()
    serial1_s, serial1_cpu, serial1 = _embed(workload, "serial1", threads=1)
    serial2_s, serial2_cpu, serial2 = _embed(workload, "serial2", threads=2)
    result = {}
    t0 = time.perf_counter()
    with client_for(Cluster(workers=2), quiet=True) as client:  # what --workers 2 starts, timed on its own
        client.wait_for_workers(2)
        start_s = time.perf_counter() - t0

        def on_two_workers():
            result["s"], result["cpu"], result["feats"] = _embed(workload, "workers2", client=client,
                                                                 cluster=Cluster(client=client))

        benchmark.pedantic(on_two_workers, rounds=1, iterations=1)
        workers2_s = result["s"] + start_s  # a user's `--workers 2` run: the cluster's start included

        # Dask's own cost per task on the same (warm) cluster
        run_tasks(_noop, list(range(20)), client=client, quiet=True)
        t0 = time.perf_counter()
        run_tasks(_noop, list(range(400)), client=client, quiet=True)
        dask_per_task = (time.perf_counter() - t0) * 2 / 400
    key = encoder_hash(load_mae_weights(weights), FEATURE_RECIPE)
    plain_s, plain_cpu = _two_plain_processes(cache, content, weights, key, n, CHUNK_PATCHES)
    embed_range((0, 0), str(cache), content, str(weights), key)  # loads the encoder once, as a worker does
    t0 = time.perf_counter()
    for _ in range(20):
        embed_range((0, 0), str(cache), content, str(weights), key)
    task_fixed = (time.perf_counter() - t0) / 20
    n_chunks = -(-n // CHUNK_PATCHES)
    chunk_s = serial1_s / n_chunks

    info = {
        "patches": n,
        "chunks (tasks)": n_chunks,
        "wall s": {"serial 1 thread": serial1_s, "serial 2 threads": serial2_s,
                   "workers 2 (start + run)": workers2_s, "of which the cluster's start": start_s},
        "CPU s": {"serial 1 thread": serial1_cpu["client"], "serial 2 threads": serial2_cpu["client"],
                  "workers 2": result["cpu"], "two plain processes": plain_cpu},
        "wall s of two plain processes at once (each half the chunks, no Dask)": plain_s,
        "speedup serial 1 thread / workers 2 (target >= 1.7)": serial1_s / workers2_s,
        "speedup serial 1 thread / two plain processes (the machine's ceiling)": serial1_s / plain_s,
        "workers 2 / serial 2 threads (target <= 1)": workers2_s / serial2_s,
        "idle-machine bound on the speedup, 2 x serial CPU / workers' CPU":
            2 * serial1_cpu["client"] / (result["cpu"]["client"] + result["cpu"]["workers"]),
        "same bytes serial 1 thread vs workers 2": serial1.tobytes() == result["feats"].tobytes(),
        "same bytes serial 1 thread vs 2 threads": serial1.tobytes() == serial2.tobytes(),
        "task at the default chunk (s)": chunk_s,
        "dask overhead per task (s)": dask_per_task,
        "task fixed cost: open + check + read nothing (s)": task_fixed,
        "overhead / task (target < 5 %)": (dask_per_task + task_fixed) / chunk_s,
        "load before": load_before,
        "load after": os.getloadavg(),
    }
    benchmark.extra_info.update({k: str(v) for k, v in info.items()})
    for k, v in info.items():
        print(f"{k}: {v}")
