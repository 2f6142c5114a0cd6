"""A study's independent trainings as tasks: one model a task, serially or on Dask (issue 16).

``experiment`` (its redundancy curve) and ``rank-study`` (its bank) train models that do not depend on each
other. Each study describes them as a list of jobs and a module-level task function (``job -> result``);
:func:`train_models` runs them in order without a cluster (the serial path, no Dask import) or as one Dask
task each (:func:`dqtool.common.cluster.run_tasks`), results back in the order of the jobs.

* **One writer per model.** A training task writes its own model and the files beside it, through
  :func:`dqtool.segmentation.train.train_patches` (the model's lock, temp file + rename, resumable
  checkpoints: a killed task leaves the old model or a resumable one) and, where the study scores it there,
  the evaluation records of that model's own stage. Each model has exactly one task and no two tasks share a
  file, so this is the one-writer rule kept per model; every table, figure and report is written by the
  client (the calling process) from the returned results.
* **Caches read only.** Tasks read the patch caches (HDF5, opened read-only); the client builds them, and
  embeds their features, before the tasks start and writes none while they run, so no file is opened
  for writing and reading at once (HDF5's file locking would refuse it).
* **Seeds.** Every job carries its :class:`~dqtool.segmentation.train.TrainConfig` and its seed, fixed by
  the study's seed and the job, never by the worker.
* **Threads.** A CPU training's weights depend on torch's thread count in the last bits (measured: the
  same 3-epoch training with 1 and 2 threads gives different model files; with 1 thread twice, identical
  ones). Dask's workers run one torch thread (``--workers``: single-threaded processes, and every task
  here sets ``torch.set_num_threads(1)``), so a run on any number of workers writes the models of a serial
  run with one torch thread (``OMP_NUM_THREADS=1``, as the demo runs); a serial run with more threads
  differs from them in the last bits.
* **Paths.** A task runs in the client's working folder, so the relative paths a study records (an
  ``--out`` given as ``study``) are the serial run's: the workers need the study's files at the same paths
  (one machine, or a shared file system), and one thread each (``dask worker --nthreads 1``; the working
  folder is the process's).
* **GPU workers.** ``resources`` (``--train-resources GPU=1``) are Dask worker resources every training
  asks for: trainings then run only on workers started with them (``dask worker --resources GPU=1``), one
  at a time per unit; without the option a training takes any worker. A cluster none of whose workers
  offers them is refused at once, never left waiting (a ``--workers`` cluster has no resources).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

from dqtool.common.cluster import Cluster, run_tasks
from dqtool.common.errors import InputError

__all__ = ["train_models", "parse_resources"]

def parse_resources(text: str | dict | None) -> dict | None:
    """``"GPU=1"`` or ``"GPU=1,MEM=4e9"`` (dask-worker's ``--resources`` syntax) -> {name: amount}."""
    if text is None or isinstance(text, dict):
        return text or None
    out = {}
    for part in (p.strip() for p in str(text).split(",")):
        name, sep, amount = part.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not sep or not name.strip() or not value > 0:
            raise InputError(f"resources {text!r}: expected NAME=AMOUNT[,NAME=AMOUNT], e.g. GPU=1")
        out[name.strip()] = value
    return out


def _as_task(fn: Callable, cwd: str, job):
    """``fn(job)`` on a worker: one torch thread (the models do not depend on the worker's threads), in the
    client's working folder (the paths a study records, relative to it, stay the serial run's)."""
    import torch

    try:
        here = os.getcwd()
    except OSError:  # the worker's own folder is gone; nothing to go back to
        here = None
    try:
        os.chdir(cwd)
    except OSError as exc:
        raise InputError(f"{cwd}: the client's working folder is not on this worker ({exc.strerror}); the workers "
                         "need the study's files at the same paths (a shared file system)") from None
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(job)
    finally:
        torch.set_num_threads(before)
        if here is not None:
            os.chdir(here)


def _check_resources(cluster: Cluster, resources: dict) -> None:
    client = getattr(cluster, "client", None)
    if client is None:
        return
    workers = client.scheduler_info().get("workers", {}).values()
    if not any(all(w.get("resources", {}).get(k, 0) >= v for k, v in resources.items()) for w in workers):
        wanted = ",".join(f"{k}={v:g}" for k, v in resources.items())
        raise InputError(f"--train-resources {wanted}: no worker of the cluster offers it (start workers with "
                         f"`dask worker ADDRESS --resources {wanted}`; a --workers cluster has none)")


def train_models(fn: Callable[[Any], Any], jobs: Sequence, cluster: Cluster | None = None, *, desc: str = "train",
                 quiet: bool = False, serial_bar: bool = False, resources: dict | None = None,
                 after: Sequence[Sequence[int]] | None = None) -> list:
    """``[fn(job) for job in jobs]``: serially, or one Dask task per job (kind ``train``) with one torch
    thread each and ``resources`` asked per training; results in the order of ``jobs``.

    ``fn`` is a module-level function whose job pickles; it trains (and may score) one model and writes
    only that model's files (module docs). ``serial_bar``: show a bar over the jobs on the serial path
    too (the trainings' own bars are the serial path's progress otherwise); on Dask the bar counts the
    finished trainings (unless ``quiet``), and the tasks' own bars are off. ``after[i]``: the jobs (earlier
    in ``jobs``) whose files job ``i`` reads, e.g. the model it starts from (:func:`~dqtool.common.cluster.
    run_tasks`): on Dask it starts as soon as they are done.
    """
    jobs = list(jobs)
    if cluster is None or not cluster.active:
        return run_tasks(fn, jobs, None, desc=desc, quiet=quiet or not serial_bar, unit="model", after=after)
    if resources:
        _check_resources(cluster, resources)
    return run_tasks(functools.partial(_as_task, fn, os.getcwd()), jobs, cluster, kind="train", desc=desc,
                     quiet=quiet, unit="model", resources=resources or None, after=after)
