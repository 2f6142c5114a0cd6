"""Dask for work that splits into independent pieces (``--workers N`` / ``--scheduler ADDRESS``).

A command whose work is a list of independent tasks (one source image, one chunk of patches, one model and
image, one training) calls :func:`run_tasks` (all results at once) or :func:`iter_tasks` (streamed, a bounded
number in flight: a cache's patches or features, written as they come). :func:`connect` starts or joins the
cluster at the start of a command, so a wrong address fails before any long work. Without a cluster they
run the tasks in this process, in order, and
Dask is never imported: the serial path. With one, each task is a Dask future; results come back **in input
order**, so the caller writes exactly the bytes of the serial run. Rules every caller keeps:

- the split into tasks never depends on the number of workers (fixed chunk sizes, one task per item);
- a task's random seed comes from the run's seed and the task's identity (:func:`task_seed`), never from
  the worker or the order of completion;
- workers only read: the client (the caller) is the one writer of caches, models and tables, through the
  crash-safe writers of :mod:`dqtool.common.outputs` and :mod:`dqtool.common.files`;
- a task is small (file names, index ranges): the scheduler holds it and can rerun it anywhere; a task
  reads its large inputs (images, a chunk of a cache) from storage the workers share.

Faults: a worker that dies mid-task has the task rerun on another worker (Dask's ``allowed-failures``); a task that raises dqtool's own errors (``InputError``, ``FileNotFoundError``...) fails the
command with that error, one line naming the file, not a Dask traceback; a ``--scheduler`` that does not
answer within :data:`CONNECT_TIMEOUT_S` seconds is one ``InputError`` (:meth:`Cluster.probe` first: a plain
socket, before the command loads its libraries).

Test-only fault hook: with ``DQTOOL_TASK_DIE=NAME:FLAGFILE`` in the environment, the first task of the
named kind to start (on any worker) creates FLAGFILE and kills its own worker process (``os._exit``), once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from dqtool.common.errors import InputError
from dqtool.common.progress import bar, progress

T = TypeVar("T")
R = TypeVar("R")

#: Seconds a ``--scheduler`` address gets to answer before the command fails.
CONNECT_TIMEOUT_S = 5
#: Worker deaths a task survives (Dask's ``allowed-failures``: the task is rerun on another worker). A task
#: that *raises* is never rerun: dqtool's errors are deterministic (a corrupt file stays corrupt).
RETRIES = 2
_DIE_ENV = "DQTOOL_TASK_DIE"
#: Dask settings of every cluster dqtool starts or joins (a scheduler started elsewhere keeps its own
#: ``allowed-failures``; set it there, e.g. ``DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=3``).
SETTINGS = {"distributed.scheduler.allowed-failures": RETRIES + 1,
            "distributed.worker.daemon": False,  # a task may start processes (Cellpose, torch)
            "distributed.logging.distributed": "error",
            # Dask's nannies start workers with MALLOC_TRIM_THRESHOLD_=65536, which turns off glibc's dynamic
            # mmap threshold: every large torch tensor is then a fresh mmap + page faults. Measured on the 2-core
            # VM: an embedding chunk of 64 patches took 2.75 CPU s on a worker, 2.03 s in the client, 2.35 s
            # on a worker without it (the rest: two busy processes sharing two cores' caches)
            "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
            # single-threaded workers (Dask sets OMP/MKL/OPENBLAS to 1, not numba's own pool): a parallel numba
            # kernel (the batched consistency scores) would start one thread per core in every worker, and
            # their spinning took the cores from the other workers' Cellpose passes. Measured on the 2-core VM,
            # `dqtool rank` of the demo bank (4 models x 6 images) on 2 workers: 174 s, against 136 s on 1
            "distributed.nanny.pre-spawn-environ.NUMBA_NUM_THREADS": 1}


@dataclass(frozen=True)
class Cluster:
    """Where tasks run: ``workers`` local single-threaded worker processes, or an existing ``scheduler``.

    ``Cluster()`` (neither) is the serial path. ``resources`` are Dask worker resources a task asks for
    (for example ``{"GPU": 1}`` for a training on a worker started with ``--resources GPU=1``).
    """

    workers: int | None = None
    scheduler: str | None = None
    #: an open ``distributed.Client`` (:func:`connect`): tasks go there, no new cluster is started
    client: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.workers is not None and self.scheduler:
            raise InputError("give --workers or --scheduler, not both")
        if self.workers is not None and int(self.workers) < 1:
            raise InputError(f"--workers {self.workers}: expected a number of worker processes >= 1")
        if self.scheduler is not None and not str(self.scheduler).strip():
            raise InputError("--scheduler: empty address (expected e.g. tcp://host:8786)")

    @property
    def active(self) -> bool:
        return self.workers is not None or bool(self.scheduler) or self.client is not None

    def probe(self, timeout: float = CONNECT_TIMEOUT_S) -> None:
        """Fail now, in one line, when nothing speaks on the ``scheduler`` address (``tcp://host:port`` or
        ``host:port``): a plain socket, no Dask import, so a command started with a wrong address stops at
        once (refused) or after ``timeout`` seconds (a port that accepts and stays silent, where Dask's own
        handshake would wait without end). Other schemes (tls, ucx) are left to Dask's connection timeout."""
        if not self.scheduler:
            return
        import socket

        address = str(self.scheduler).strip()
        scheme, sep, rest = address.partition("://")
        if not sep:
            scheme, rest = "tcp", address
        host, _, port = rest.rstrip("/").rpartition(":")
        if scheme != "tcp" or not host or not port.isdigit():
            return
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
                sock.settimeout(timeout)
                greeting = sock.recv(1)  # a Dask scheduler speaks first (its handshake) on every connection
        except OSError as exc:
            why = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
            raise InputError(f"--scheduler {address}: no Dask scheduler answered within {timeout:g} s ({why}); "
                             "start one with `dask scheduler` or check the address") from None
        if not greeting:
            raise InputError(f"--scheduler {address}: no Dask scheduler answered (the connection was closed); "
                             "start one with `dask scheduler` or check the address")


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
    cluster.probe()  # a silent port would keep Dask's handshake waiting past its own timeout
    try:
        import dask  # noqa: F401
        from distributed import Client, LocalCluster
    except ImportError as exc:  # a dependency; only a broken install gets here
        raise InputError(f"--workers/--scheduler need dask[distributed] ({exc}); pip install 'dask[distributed]'") from exc

    import dask.config

    with dask.config.set(SETTINGS):
        local = None
        try:
            if cluster.scheduler:
                try:
                    client = Client(cluster.scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
                except (OSError, TimeoutError) as exc:
                    raise InputError(f"--scheduler {cluster.scheduler}: no Dask scheduler answered within "
                                     f"{CONNECT_TIMEOUT_S} s ({type(exc).__name__}); start one with "
                                     f"`dask scheduler` or check the address") from None
                except Exception as exc:  # something answered, but not a Dask scheduler (garbage handshake)
                    raise InputError(f"--scheduler {cluster.scheduler}: what answered is not a Dask scheduler "
                                     f"({type(exc).__name__}); check the address and port (default 8786)") from None
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


@contextlib.contextmanager
def connect(cluster: Cluster | None, quiet: bool = False) -> Iterator[Cluster]:
    """Start (``--workers``) or join (``--scheduler``) the cluster now and yield it bound to its client, so
    that every :func:`run_tasks` / :func:`iter_tasks` under the block uses that one client, and an
    unreachable scheduler fails the command before any long work (a pretraining) rather than after it.
    Serial (or already bound): yields ``cluster`` as it is (``SERIAL`` for None), importing nothing."""
    if cluster is None or not cluster.active or cluster.client is not None:
        yield cluster or SERIAL
        return
    with client_for(cluster, quiet=quiet) as client:
        yield replace(cluster, client=client)


def _task(fn: Callable[[T], R], kind: str, item: T, *after: Any) -> R:
    """Run one task on a worker (the test-only death hook first). ``after``: the results of the tasks it
    waited for (Dask hands them over; the task reads what they wrote from shared storage instead)."""
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
              client: Any = None, after: Sequence[Sequence[int]] | None = None) -> list[R]:
    """``[fn(item) for item in items]``, serially or as Dask tasks; results in the order of ``items``.

    ``after[i]``: indices (all < i) of the tasks item ``i`` needs finished first (it reads a file they
    write). Dask gets them as the task's dependencies (its futures passed to the task), so a task starts as
    soon as its own inputs exist, not when a whole batch is done; free workers take the ready task earliest
    in ``items`` (Dask priorities). Serially the items run in their order, which already respects ``after``.

    ``fn`` must be a module-level function (or a ``functools.partial`` of one) whose arguments pickle;
    ``kind`` names the task in Dask's keys, in the dashboard and in the test-only death hook. The first
    task that raises fails the whole call with that task's own exception (the others are cancelled).
    ``client`` reuses an open client (several calls under one cluster) instead of starting one.
    """
    items = list(items)
    if after is not None:
        after = [tuple(int(j) for j in deps) for deps in after]
        if len(after) != len(items):
            raise ValueError(f"after: {len(after)} entries for {len(items)} items")
        for i, deps in enumerate(after):
            if any(not 0 <= j < i for j in deps):
                raise ValueError(f"after[{i}] = {list(deps)}: a task waits only for tasks before it")
    client = client if client is not None else getattr(cluster, "client", None)
    if client is None and (cluster is None or not cluster.active):
        return [fn(item) for item in progress(items, total=len(items), desc=desc, quiet=quiet, unit=unit)]
    if client is not None:
        return _map_ordered(client, fn, items, kind, desc, quiet, unit, resources, after)
    with client_for(cluster, quiet=quiet) as c:
        return _map_ordered(c, fn, items, kind, desc, quiet, unit, resources, after)


def _map_ordered(client, fn, items, kind, desc, quiet, unit, resources, after=None) -> list:
    from distributed import as_completed

    if not items:
        return []
    # a fresh token per call: keys from id(items) came back for a later list at the same address, and Dask
    # then handed the new call the old call's results (still in memory) for the keys they shared
    token = uuid.uuid4().hex[:12]
    keys = [f"dqtool-{kind}-{token}-{i}" for i in range(len(items))]
    if after is None:
        futures = client.map(_task, [fn] * len(items), [kind] * len(items), items, key=keys, pure=False,
                             resources=resources)
    else:  # one submit each: its dependencies' futures as arguments, the earlier item the higher priority
        futures = []
        for i, item in enumerate(items):
            futures.append(client.submit(_task, fn, kind, item, *(futures[j] for j in after[i]), key=keys[i],
                                         pure=False, resources=resources, priority=len(items) - i))
    position = {f.key: i for i, f in enumerate(futures)}
    results: list = [None] * len(items)
    pbar = bar(len(items), desc=desc, quiet=quiet, unit=unit)
    try:
        for future in as_completed(futures):
            if future.status != "finished":
                error = _task_error(future, kind, position[future.key])  # before the cancel changes its status
                client.cancel(futures)
                raise error
            results[position[future.key]] = future.result()
            pbar.update(1)
    finally:
        pbar.close()
    return results


#: Tasks in flight (submitted, or done and not yet consumed) per worker thread in :func:`iter_tasks`.
AHEAD_PER_THREAD = 3


def iter_tasks(fn: Callable[[T], R], items: Iterable[T], cluster: Cluster | None = None, *, kind: str = "task",
               desc: str = "", quiet: bool = False, unit: str = "task", total: int | None = None,
               resources: dict | None = None, client: Any = None,
               progress_of: Callable[[T], int] | None = None) -> Iterator[R]:
    """``fn(item)`` for each item, yielded **in the order of ``items``**, serially or as Dask tasks.

    The streaming form of :func:`run_tasks`, for work whose inputs or results do not all fit in memory
    at once (a cache's patches, their features): ``items`` is consumed lazily and only a bounded number
    of tasks is in flight (:data:`AHEAD_PER_THREAD` per worker thread, at least 4), so the client holds
    a few inputs and a few results at a time and writes each result as soon as the ones before it are in.

    Keep items small (a file name, a range of indices): an item travels in the task itself, so the
    scheduler can rerun the task on another worker when one dies; data a worker holds alone (``scatter``)
    would die with it. Large inputs are read by the task from shared storage. ``progress_of``:
    the bar's step for an item (default 1; e.g. the number of patches in a chunk, with ``total`` in
    patches). Errors as in :func:`run_tasks`: the first failing task's own exception, the rest cancelled;
    a consumer that stops early (or raises) cancels what is still in flight.
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    step = progress_of or (lambda item: 1)
    client = client if client is not None else getattr(cluster, "client", None)
    if client is None and (cluster is None or not cluster.active):
        pbar = bar(total, desc=desc, quiet=quiet, unit=unit)
        try:
            for item in items:
                result = fn(item)
                pbar.update(step(item))
                yield result
        finally:
            pbar.close()
        return
    if client is not None:
        yield from _stream_ordered(client, fn, items, kind, desc, quiet, unit, total, resources, step)
        return
    with client_for(cluster, quiet=quiet) as c:
        yield from _stream_ordered(c, fn, items, kind, desc, quiet, unit, total, resources, step)


def _stream_ordered(client, fn, items, kind, desc, quiet, unit, total, resources, step):
    from distributed import as_completed

    token = uuid.uuid4().hex[:12]
    source = iter(enumerate(items))
    pending: dict[int, Any] = {}  # index -> future, submitted and not yet done
    ready: dict[int, Any] = {}  # index -> result, done and waiting for the ones before it
    index_of: dict[str, int] = {}
    weight: dict[int, int] = {}
    done = as_completed()
    exhausted = False
    next_out = 0
    pbar = bar(total, desc=desc, quiet=quiet, unit=unit)

    def submit_more() -> None:
        nonlocal exhausted
        if exhausted:
            return
        limit = max(4, AHEAD_PER_THREAD * sum(client.nthreads().values()))
        while len(pending) + len(ready) < limit:
            try:
                i, item = next(source)
            except StopIteration:
                exhausted = True
                return
            weight[i] = step(item)
            future = client.submit(_task, fn, kind, item, key=f"dqtool-{kind}-{token}-{i}", pure=False,
                                   resources=resources)
            index_of[future.key] = i
            pending[i] = future
            done.add(future)

    try:
        submit_more()
        while pending:
            future = next(done)
            i = index_of.pop(future.key)
            if future.status != "finished":
                raise _task_error(future, kind, i)
            ready[i] = future.result()
            del pending[i]
            pbar.update(weight.pop(i))
            while next_out in ready:
                result = ready.pop(next_out)
                next_out += 1
                yield result
            submit_more()
    finally:
        pbar.close()
        if pending:
            client.cancel(list(pending.values()))


def _task_error(future, kind: str, index: int) -> BaseException:
    """The exception to raise for a failed task: its own (dqtool's one-line errors stay one line), or one
    line for what Dask reports (a task whose workers kept dying, a cancelled task)."""
    if future.status == "error":
        exc = future.exception()
        if type(exc).__name__ == "KilledWorker":
            return InputError(f"dask: the workers running {kind} task #{index} died {RETRIES + 1} times "
                              "(out of memory? killed by the batch system?); see the workers' logs")
        return exc.with_traceback(None) if isinstance(exc, BaseException) else RuntimeError(str(exc))
    return InputError(f"dask: {kind} task #{index} was {future.status} (the scheduler or its workers went away)")
