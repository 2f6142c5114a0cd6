"""Dask for work that splits into independent pieces (``--workers N`` / ``--scheduler ADDRESS``).

A command whose work is a list of independent tasks (one source image, one chunk of patches, one model and
image, one training) calls :func:`run_tasks`. Without a cluster it runs them in this process, in order, and
Dask is never imported: the serial path. With one, each task is a Dask future; results come back **in input
order**, so the caller writes exactly the bytes of the serial run. Rules every caller keeps:

- the split into tasks never depends on the number of workers (fixed chunk sizes, one task per item);
- a task's random seed comes from the run's seed and the task's identity (:func:`task_seed`), never from
  the worker or the order of completion;
- workers only read: the client (the caller) is the one writer of caches, models and tables, through the
  crash-safe writers of :mod:`dqtool.common.outputs` and :mod:`dqtool.common.files`.

Faults: a worker that dies mid-task has the task rerun on another worker (Dask's ``allowed-failures``); a task that raises dqtool's own errors (``InputError``, ``FileNotFoundError``...) fails the
command with that error, one line naming the file, not a Dask traceback; a ``--scheduler`` that does not
answer within :data:`CONNECT_TIMEOUT_S` seconds is one ``InputError``.

Test-only fault hook: with ``DQTOOL_TASK_DIE=NAME:FLAGFILE`` in the environment, the first task of the
named kind to start (on any worker) creates FLAGFILE and kills its own worker process (``os._exit``), once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

from dqtool.common.errors import InputError
from dqtool.common.progress import bar, progress

T = TypeVar("T")
R = TypeVar("R")

#: Seconds a ``--scheduler`` address gets to answer before the command fails.
CONNECT_TIMEOUT_S = 8
#: Worker deaths a task survives (Dask's ``allowed-failures``: the task is rerun on another worker). A task
#: that *raises* is never rerun: dqtool's errors are deterministic (a corrupt file stays corrupt).
RETRIES = 2
_DIE_ENV = "DQTOOL_TASK_DIE"


@dataclass(frozen=True)
class Cluster:
    """Where tasks run: ``workers`` local single-threaded worker processes, or an existing ``scheduler``.

    ``Cluster()`` (neither) is the serial path. ``resources`` are Dask worker resources a task asks for
    (for example ``{"GPU": 1}`` for a training on a worker started with ``--resources GPU=1``).
    """

    workers: int | None = None
    scheduler: str | None = None

    def __post_init__(self):
        if self.workers is not None and self.scheduler:
            raise InputError("give --workers or --scheduler, not both")
        if self.workers is not None and int(self.workers) < 1:
            raise InputError(f"--workers {self.workers}: expected a number of worker processes >= 1")
        if self.scheduler is not None and not str(self.scheduler).strip():
            raise InputError("--scheduler: empty address (expected e.g. tcp://host:8786)")

    @property
    def active(self) -> bool:
        return self.workers is not None or bool(self.scheduler)


SERIAL = Cluster()


def task_seed(run_seed: int, *identity: Any) -> int:
    """The seed of one task: ``sha256(run_seed, identity...)`` truncated to 63 bits.

    It depends on the run's seed and on what the task is (an image's name, a model's path, a chunk's
    index), never on the worker that runs it or on the number of workers.
    """
    text = repr((int(run_seed),) + tuple(str(x) for x in identity)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def client_for(cluster: Cluster, quiet: bool = False) -> Iterator[Any]:
    """A ``dask.distributed.Client`` for ``cluster`` (a new ``LocalCluster`` of ``workers`` single-threaded
    processes, or a connection to ``scheduler``); prints the dashboard address unless ``quiet``."""
    if not cluster.active:
        raise ValueError("client_for needs --workers or --scheduler")
    try:
        import dask  # noqa: F401
        from distributed import Client, LocalCluster
    except ImportError as exc:  # a dependency; only a broken install gets here
        raise InputError(f"--workers/--scheduler need dask[distributed] ({exc}); pip install 'dask[distributed]'") from exc

    import dask.config

    settings = {"distributed.scheduler.allowed-failures": RETRIES + 1,
                "distributed.worker.daemon": False,  # a task may start processes (Cellpose, torch)
                "distributed.logging.distributed": "error"}
    with dask.config.set(settings):
        local = None
        try:
            if cluster.scheduler:
                try:
                    client = Client(cluster.scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
                except (OSError, TimeoutError) as exc:
                    raise InputError(f"--scheduler {cluster.scheduler}: no Dask scheduler answered within "
                                     f"{CONNECT_TIMEOUT_S} s ({type(exc).__name__}); start one with "
                                     f"`dask scheduler` or check the address") from None
            else:
                local = LocalCluster(n_workers=int(cluster.workers), threads_per_worker=1, processes=True,
                                     dashboard_address=":0", silence_logs=logging.CRITICAL)
                client = Client(local)
            try:
                if not quiet:
                    link = getattr(client, "dashboard_link", None)
                    print(f"dask: {len(client.scheduler_info().get('workers', {}))} workers; dashboard {link}",
                          file=sys.stderr)
                yield client
            finally:
                client.close()
        finally:
            if local is not None:
                local.close()


def _task(fn: Callable[[T], R], kind: str, item: T) -> R:
    """Run one task on a worker (the test-only death hook first)."""
    hook = os.environ.get(_DIE_ENV)
    if hook:
        name, _, flag = hook.partition(":")
        if name == kind and flag:
            try:
                fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                os._exit(17)  # the worker process dies mid-task, once
    return fn(item)


def run_tasks(fn: Callable[[T], R], items: Sequence[T], cluster: Cluster | None = None, *, kind: str = "task",
              desc: str = "", quiet: bool = False, unit: str = "task", resources: dict | None = None,
              client: Any = None) -> list[R]:
    """``[fn(item) for item in items]``, serially or as Dask tasks; results in the order of ``items``.

    ``fn`` must be a module-level function (or a ``functools.partial`` of one) whose arguments pickle;
    ``kind`` names the task in Dask's keys, in the dashboard and in the test-only death hook. The first
    task that raises fails the whole call with that task's own exception (the others are cancelled).
    ``client`` reuses an open client (several calls under one cluster) instead of starting one.
    """
    items = list(items)
    if client is None and (cluster is None or not cluster.active):
        return [fn(item) for item in progress(items, total=len(items), desc=desc, quiet=quiet, unit=unit)]
    if client is not None:
        return _map_ordered(client, fn, items, kind, desc, quiet, unit, resources)
    with client_for(cluster, quiet=quiet) as c:
        return _map_ordered(c, fn, items, kind, desc, quiet, unit, resources)


def _map_ordered(client, fn, items, kind, desc, quiet, unit, resources) -> list:
    from distributed import as_completed

    if not items:
        return []
    token = hashlib.sha256(repr((kind, os.getpid(), id(items))).encode()).hexdigest()[:8]
    keys = [f"dqtool-{kind}-{token}-{i}" for i in range(len(items))]
    futures = client.map(_task, [fn] * len(items), [kind] * len(items), items, key=keys, pure=False,
                         resources=resources)
    position = {f.key: i for i, f in enumerate(futures)}
    results: list = [None] * len(items)
    pbar = bar(len(items), desc=desc, quiet=quiet, unit=unit)
    try:
        for future in as_completed(futures):
            if future.status == "error":
                exc = future.exception()
                client.cancel(futures)
                raise exc.with_traceback(None) if isinstance(exc, BaseException) else RuntimeError(str(exc))
            results[position[future.key]] = future.result()
            pbar.update(1)
    finally:
        pbar.close()
    return results
