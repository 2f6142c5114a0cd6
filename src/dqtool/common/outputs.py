"""What dqtool may write over, one writer at a time, and one line for every output fault.

Every command that writes (``patches``, ``embed``, ``select``, ``export``, ``train``, ``data``, ``experiment``,
``rank-study``, ``report``, ``export-model``; ``rank``, ``predict`` and ``eval`` through :func:`writes_folder`)
enters :func:`writing` for each output before it writes anything:

- **Never destroy what dqtool did not write.** An output that is one of the command's inputs is refused; so
  is an existing file that dqtool does not recognise as its own (:func:`is_dqtool_file`: a patch cache by
  its HDF5 attributes, a subset by its JSON keys, a model by its sidecar JSON, a dqtool JSON by its keys),
  and a non-empty folder without dqtool's marker file :data:`MARKER` (which names the command that wrote
  it). ``--force`` never lifts these refusals: it only lets a command replace what dqtool wrote.
- **One writer at a time.** An advisory lock (``filelock``, ``flock`` on Unix) on ``.NAME.lock`` beside the
  output; a second writer fails at once with the path and the pid holding it. Readers take no lock, and
  since every file is renamed into place whole, they keep reading the old file during a write.
- **Stale temp files** (``.NAME.tmp-PID...``, :func:`dqtool.common.files.temp_path`) of processes that are
  no longer alive are removed from the output's folder; a folder swap interrupted between its two renames
  (``.NAME.old-PID``) is put back.
- **Ordinary faults are one line**: a full or read-only disk, no permission, a file locked by HDF5 become
  an :class:`~dqtool.common.errors.InputError` naming the output.

:func:`kill_point` is a test hook: with ``DQTOOL_TEST_KILL_AT=name`` in the environment, the process kills
itself with SIGKILL at the point called ``name`` (the kill tests use it to stop a writer at a known step).
"""

from __future__ import annotations

import errno
import functools
import inspect
import json
import os
import re
import shutil
import signal
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dqtool.common.errors import InputError

#: File in every folder dqtool writes; names the command (and dqtool's version).
MARKER = ".dqtool-output.json"
#: Environment variable of the test hook :func:`kill_point`.
KILL_ENV = "DQTOOL_TEST_KILL_AT"

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)")


# ----------------------------------------------------------------------------------------------
# the test hook


def kill_point(name: str) -> None:
    """SIGKILL this process here when ``DQTOOL_TEST_KILL_AT`` names this point (tests only).

    ``NAME@FLAG``: only the first process to get here dies, the one that creates the file FLAG (a Dask worker
    killed mid-task, whose task then runs again on another worker and must not die there too)."""
    value = os.environ.get(KILL_ENV)
    if not value:
        return
    point, _, flag = value.partition("@")
    if point != name:
        return
    if flag:
        try:
            os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------------
# what dqtool wrote


def _json_object(path: Path) -> dict | None:
    try:
        if path.stat().st_size > 64 << 20:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_dqtool_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a file dqtool writes, recognised by its content, not its name.

    A patch cache (HDF5 with ``schema_version`` and ``dqtool_version`` attributes), a subset (JSON with
    ``indices`` and ``n_selected``), a model (its sidecar ``MODEL.json`` records ``model`` and ``identity``),
    a torch file with a ``dqtool`` entry (the default MAE), a JSON that dqtool marks (``dqtool_version``,
    ``generator: dqtool...``), a page of ``dqtool report`` (:func:`is_report_page`), or a bioimage.io package
    of ``dqtool export-model`` (a zip whose ``rdf.yaml`` has ``config: dqtool: version``).
    """
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head == b"\x89HDF\r\n\x1a\n":
        try:
            import h5py

            with h5py.File(path, "r") as h5:
                return "schema_version" in h5.attrs and "dqtool_version" in h5.attrs
        except OSError:
            return False
    sidecar = _json_object(path.with_name(path.name + ".json"))
    if sidecar is not None and "identity" in sidecar and Path(str(sidecar.get("model"))).name == path.name:
        return True
    if head[:1] in (b"{", b"[", b" ", b"\n"):
        data = _json_object(path)
        if data is not None:
            if "indices" in data and "n_selected" in data:
                return True
            if "dqtool_version" in data or str(data.get("generator", "")).startswith("dqtool"):
                return True
    if head.startswith(b"PK\x03\x04"):
        return _is_dqtool_package(path)
    if head.startswith((b"<!DOCTYP", b"# dqtool")):
        return is_report_page(path)
    return False


def is_report_page(path: str | os.PathLike) -> bool:
    """True when ``path`` is a page of ``dqtool report`` (any release): ``report.html`` by its title
    ``dqtool report: RUN`` and its section ``missing``, ``report.md`` by its first line ``# dqtool report: RUN``
    and its section "What is missing". (``dqtool experiment``'s ``report.md`` begins ``# dqtool study``.)"""
    try:
        with open(path, "rb") as fh:
            text = fh.read(256 << 20).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if text.startswith("<!DOCTYPE html>"):
        return "<title>dqtool report: " in text[:4096] and '<section id="missing">' in text
    return text.startswith("# dqtool report: ") and "\n## What is missing\n" in text


def _is_dqtool_package(path: Path) -> bool:
    """A bioimage.io package (zip) of ``dqtool export-model``: its ``rdf.yaml`` has ``config.dqtool.version``."""
    import zipfile

    import yaml  # PyYAML: a dependency of dask

    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo("rdf.yaml")
            if info.file_size > 16 << 20:
                return False
            rdf = yaml.safe_load(z.read(info))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, yaml.YAMLError, RuntimeError, EOFError):
        return False
    config = rdf.get("config") if isinstance(rdf, dict) else None
    dq = config.get("dqtool") if isinstance(config, dict) else None
    return rdf.get("type") == "model" and isinstance(dq, dict) and "version" in dq


def folder_marker(folder: str | os.PathLike) -> dict | None:
    """The marker dqtool left in ``folder`` (a dict naming the command), or None."""
    folder = Path(folder)
    data = _json_object(folder / MARKER)
    if data is not None and "command" in data:
        return data
    manifest = _json_object(folder / "MANIFEST.json")  # folders of `dqtool data` before the marker existed
    if manifest is not None and str(manifest.get("generator", "")).startswith("dqtool"):
        return {"command": "data", "legacy": "MANIFEST.json"}
    # study folders of earlier releases, by the record each one writes first
    record = _json_object(folder / "experiment.json")
    if record is not None and {"source", "train"} <= set(record):
        return {"command": "experiment", "legacy": "experiment.json"}
    record = _json_object(folder / "study_summary.json")
    if record is not None and {"target", "members"} <= set(record):
        return {"command": "rank-study", "legacy": "study_summary.json"}
    # `rank` and `eval` folders of earlier releases (a ranking of several perturbations: one folder each)
    for record_path in (folder / "rank.json", *sorted(folder.glob("*/rank.json"))):
        record = _json_object(record_path)
        if record is not None and {"ranking", "perturbation", "score"} <= set(record):
            return {"command": "rank", "legacy": str(record_path.relative_to(folder))}
    record = _json_object(folder / "summary.json")
    if record is not None and set(record) == {"thresholds", "summary", "problems"}:
        return {"command": "eval", "legacy": "summary.json"}
    return None


def marker_text(command: str, **extra) -> str:
    """The text of :data:`MARKER` for a folder written by ``dqtool <command>``."""
    from dqtool._version import __version__

    return json.dumps({"command": command, "dqtool_version": __version__, **extra}, indent=1, sort_keys=True) + "\n"


def write_marker(folder: str | os.PathLike, command: str, **extra) -> Path:
    """Write :data:`MARKER` into ``folder`` (temp file + rename)."""
    from dqtool.common.files import atomic_write_text

    return atomic_write_text(Path(folder) / MARKER, marker_text(command, **extra))


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output(path: str | os.PathLike, command: str, inputs: Iterable[str | os.PathLike | None] = (),
                 kind: str = "file") -> Path:
    """Refuse ``path`` as the output of ``dqtool <command>`` unless dqtool may write there; returns it.

    ``kind`` is ``file`` or ``folder``. Refused, with one line naming the path and what to do: an output
    that is one of ``inputs`` (or, for a folder, holds one), an existing file dqtool did not write, a
    folder where a file is expected and the reverse, a non-empty folder without dqtool's marker.
    """
    path = Path(path)
    for item in inputs:
        if item is None:
            continue
        item = Path(item)
        if _same(path, item):
            raise InputError(f"{path}: is also an input of `dqtool {command}`; choose another output path")
        if kind == "folder" and path.exists():
            try:
                item.resolve().relative_to(path.resolve())
            except ValueError:
                continue
            raise InputError(f"{path}: holds {item}, an input of `dqtool {command}`; choose another output folder")
    if kind == "file":
        if path.is_dir():
            raise InputError(f"{path}: is a folder; `dqtool {command}` writes a file here, give a file path")
        if path.exists() and not is_dqtool_file(path):
            raise InputError(f"{path}: exists and was not written by dqtool; dqtool will not overwrite it "
                             "(not even with --force): choose another output path or move the file away")
    else:
        if path.exists() and not path.is_dir():
            raise InputError(f"{path}: is a file; `dqtool {command}` writes a folder here, give a folder path")
        if path.is_dir() and any(path.iterdir()) and folder_marker(path) is None:
            raise InputError(f"{path}: folder is not empty and was not written by dqtool (no {MARKER}); "
                             "dqtool will not write into it: choose a new or empty folder")
    return path


# ----------------------------------------------------------------------------------------------
# stale temp files


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a pid of another user's process counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_held(output: Path) -> bool:
    """Whether another process holds the lock of ``output`` now (its writer may run on another machine of a
    shared file system, where its pid means nothing here)."""
    import filelock

    lock_file = lock_path(output)
    if not lock_file.exists():
        return False
    lock = filelock.FileLock(str(lock_file), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        return True
    except OSError:
        return False
    lock.release()
    return False


def clean_stale(folder: str | os.PathLike, name: str | None = None, held: str | None = None) -> list[Path]:
    """Remove the temp files of dead processes in ``folder`` (only those for output ``name``, if given).

    ``.NAME.tmp-PID*`` (files or folders) whose PID is not alive, and whose output's lock no one holds,
    are removed; ``.NAME.old-PID`` (the old folder of an interrupted swap) is renamed back to ``NAME``
    when ``NAME`` is missing, else removed. ``held``: the output whose lock this process holds (its
    temp files of other pids are stale). Returns what was removed or restored.
    """
    folder = Path(folder)
    done: list[Path] = []
    if not folder.is_dir():
        return done
    for entry in folder.iterdir():
        m = _TEMP_RE.match(entry.name)
        if m is None or (name is not None and not m.group("name").startswith(name)):
            continue
        pid = int(m.group("pid"))
        if pid == os.getpid() or pid_alive(pid):
            continue
        owner = m.group("name")
        if owner != held and any(_lock_held(folder / cand) for cand in {owner, owner.split(".mae-")[0] + ".h5"}):
            continue
        try:
            if ".old-" in entry.name and not (folder / m.group("name")).exists():
                os.replace(entry, folder / m.group("name"))
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:
            continue  # another run cleaned it first
        done.append(entry)
    return done


# ----------------------------------------------------------------------------------------------
# one writer at a time


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of output ``path``: ``.NAME.lock`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the advisory lock of output ``path``; a second writer fails at once (InputError with the pid)."""
    import filelock

    path = Path(path)
    lock_file = lock_path(path)
    lock = filelock.FileLock(str(lock_file), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        holder = ""
        try:
            pid = lock_file.read_text().strip()
            holder = f" (process {pid})" if pid.isdigit() else ""
        except OSError:
            pass
        raise InputError(f"{path}: another dqtool process{holder} is writing this output; wait for it to "
                         "finish, or choose another output path") from None
    except OSError as exc:
        raise output_error(path, exc) from exc
    try:
        # the pid goes into the lock file itself: a writer that fails to lock does not truncate it
        fd = os.open(lock_file, os.O_WRONLY)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)  # flock belongs to filelock's own descriptor: closing this one keeps the lock
        yield lock_file
    finally:
        lock.release()


# ----------------------------------------------------------------------------------------------
# faults


_FAULTS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
           errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
           errno.EPERM: "permission denied", errno.EAGAIN: "the file is locked by another process",
           errno.EFBIG: "the file is too large for the file system"}


def fault_code(exc: BaseException) -> int | None:
    """The errno of an output fault (full or read-only disk, permissions, a lock), or None for anything else.

    h5py raises OSError without an errno, or RuntimeError when a flush fails on close; their message
    carries the cause (libhdf5 quotes the system's error text).
    """
    code = getattr(exc, "errno", None)
    if code in _FAULTS:
        return code
    text = str(exc).lower()
    for probe, c in (("no space left", errno.ENOSPC), ("read-only file system", errno.EROFS),
                     ("permission denied", errno.EACCES), ("unable to lock file", errno.EAGAIN),
                     ("disk quota", errno.EDQUOT), ("errno = 28", errno.ENOSPC), ("errno = 30", errno.EROFS)):
        if probe in text:
            return c
    return None


def output_error(path: str | os.PathLike, exc: BaseException) -> InputError:
    """The one-line error for an OS fault while writing ``path``."""
    code = fault_code(exc)
    what = _FAULTS[code] if code is not None else (str(exc).splitlines() or [type(exc).__name__])[0]
    return InputError(f"{path}: cannot write ({what}); nothing was replaced")


@contextmanager
def writing(path: str | os.PathLike, command: str, inputs: Iterable[str | os.PathLike | None] = (),
            kind: str = "file", check: bool = True) -> Iterator[Path]:
    """Check, lock, clean and guard one output of ``dqtool <command>``: the context every writer enters.

    :func:`check_output` first (before any lock file is made beside a refused path), then the lock, then
    :func:`clean_stale` for this output and a second check (another writer may have finished meanwhile);
    OS faults inside (full or read-only disk, permissions) become one :class:`InputError` line.
    ``check=False`` skips :func:`check_output`, for a writer that refuses foreign outputs its own way.
    """
    path = Path(path)
    inputs = list(inputs)
    if check:
        check_output(path, command, inputs, kind)
    if not path.parent.exists():
        raise InputError(f"{path.parent}: output folder does not exist")
    with output_lock(path):
        clean_stale(path.parent, held=path.name)
        if kind == "folder":
            clean_stale(path)
        if check:
            check_output(path, command, inputs, kind)
        try:
            yield path
        except InputError:
            raise
        except (OSError, RuntimeError) as exc:  # libhdf5 reports a failed flush on close as RuntimeError
            if fault_code(exc) is None:
                raise
            raise output_error(path, exc) from exc


@contextmanager
def writing_folder(path: str | os.PathLike, command: str,
                   inputs: Iterable[str | os.PathLike | None] = ()) -> Iterator[Path]:
    """:func:`writing` for a folder that a command fills file by file as it goes (``rank``, ``predict``, ``eval``).

    Refused as :func:`check_output` says (an input, a file, a lab's non-empty folder), before anything is made.
    A missing folder is made (its parents too), and a new or empty one gets :data:`MARKER` before anything
    else is written, so a run killed half-way leaves a folder that its rerun may write into. A command that
    fails before writing anything else leaves the folder as it found it (one it made is removed again).
    """
    path = Path(path)
    inputs = list(inputs)
    check_output(path, command, inputs, kind="folder")  # before a parent folder or a lock file is made
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(path, exc) from exc
    with writing(path, command, inputs, kind="folder"):
        made = not path.exists()
        marked = folder_marker(path) is None  # writing() refused a non-empty folder without one
        if marked:
            path.mkdir(exist_ok=True)
            write_marker(path, command)
        try:
            yield path
        except BaseException:
            if marked:
                try:
                    if [p.name for p in path.iterdir()] == [MARKER]:
                        (path / MARKER).unlink()
                        if made:
                            path.rmdir()
                except OSError:
                    pass  # the original error is the one to report
            raise


def writes_folder(command: str, out: str, inputs: tuple[str, ...] = ()):
    """Decorator: a call of the function writes the folder its argument ``out`` names (when not None) inside
    :func:`writing_folder`, with the arguments named in ``inputs`` as the command's inputs, for the whole call."""

    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def gated(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            folder = bound.arguments[out]
            if folder is None:
                return fn(*args, **kwargs)
            with writing_folder(folder, command, [bound.arguments[name] for name in inputs]):
                return fn(*args, **kwargs)

        return gated

    return wrap


# ----------------------------------------------------------------------------------------------
# folders written whole


def swap_folder(tmp: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Put the finished folder ``tmp`` at ``out``: ``out`` -> ``.out.old-PID``, ``tmp`` -> ``out``, old removed.

    A kill between the two renames leaves ``.out.old-PID``, which :func:`clean_stale` renames back on the
    next run; at every moment either the old folder or the new one is (or can be put back) whole.
    """
    tmp, out = Path(tmp), Path(out)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
        kill_point("swap_folder")
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)
    return out


__all__ = [
    "KILL_ENV",
    "MARKER",
    "check_output",
    "clean_stale",
    "fault_code",
    "folder_marker",
    "is_dqtool_file",
    "is_report_page",
    "kill_point",
    "lock_path",
    "marker_text",
    "output_error",
    "output_lock",
    "pid_alive",
    "swap_folder",
    "write_marker",
    "writes_folder",
    "writing",
    "writing_folder",
]
