"""The HDF5 patch cache: sliding-window patches of a dataset, readable with h5py alone.

Schema (``schema_version`` 1; N patches of S x S with C channels, M source images, K domains)::

    /images          uint8  (N, S, S, C)  per-source-image normalised intensities, one patch per chunk
    /labels          uint16 (N, S, S)     consecutive instance ids per patch, 0 = background (if labelled);
                                          uint16 when S * S < 65536 (ids <= S * S), else uint32. Caches
                                          written before stored uint32 for every S; readers cast to uint32.
    /patch_source    int32  (N,)          index into /sources
    /patch_domain    int32  (N,)          index into /domains
    /patch_offset    int32  (N, 2)        (y, x) of the patch's top-left corner in its source image
    /sources         str    (M,)          source image paths
    /source_labels   str    (M,)          label file per source ("" when unlabelled)
    /source_shape    int32  (M, 2)        (H, W) of each source image
    /source_domain   int32  (M,)          index into /domains
    /domains         str    (K,)          domain names
    /derived/<name>/ groups added later (features, bins), each with attribute complete = 1
    attributes: dqtool_version, schema_version, patch_size, stride, edge, channels, normalisation,
                compression, input_hash, options (JSON), content_hash, n_patches, has_labels, complete

Reading: with one patch per chunk and a gzip (deflate only) or no filter, ``PatchCache`` reads each
chunk's stored bytes (``read_direct_chunk``) and inflates them with libdeflate (imagecodecs; zlib if
missing) in a small thread pool (both release the GIL; HDF5's filter pipeline runs serially); other
layouts (lzf, shuffle, a chunk stored unfiltered) go through h5py. Both give the same bytes. The label
dtype change kept ``schema_version`` 1: every reader casts to uint32, so old and new files read alike.

Crash safety: a cache is written to ``.CACHE.h5.tmp-<pid>`` (:mod:`dqtool.data.cache_build`) and renamed onto ``CACHE.h5`` only when
complete (attribute ``complete`` = 1 set last), so a killed run never leaves a file that reads as a
complete cache, and an older cache at that path survives until the new one is whole. Derived groups are
written with a completion flag set last; a group without it reads back as missing.
"""


from __future__ import annotations

import errno
import json
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from dqtool.common.errors import InputError

SCHEMA_VERSION = 1
CHANNEL_MODES = ("gray", "rgb")
NORMALISATIONS = ("percentile", "minmax", "none")
COMPRESSIONS = ("lzf", "gzip", "none")
DEFAULT_COMPRESSION = "gzip"  # level 1; chosen by benchmarks/bench_cache.py::test_codec_* (README, "Patch cache")
_STR = h5py.string_dtype(encoding="utf-8")
READ_THREADS = max(1, min(4, os.cpu_count() or 1))  # inflation threads per open cache
#: How long a reader waits for a writer's HDF5 file lock (a derived group being swapped in), and a writer for
#: the readers', before it gives up (seconds; ``DQTOOL_LOCK_WAIT_S`` in the environment sets it).
LOCK_WAIT_S = float(os.environ.get("DQTOOL_LOCK_WAIT_S", "30"))

try:  # libdeflate (via imagecodecs, a dependency) inflates ~2-3x faster than zlib; zlib is the fallback
    import imagecodecs as _imagecodecs

    _deflate_decode = _imagecodecs.deflate_decode if _imagecodecs.DEFLATE.available else None
except Exception:  # pragma: no cover - imagecodecs without libdeflate
    _deflate_decode = None


def _corrupt(path, dataset: str, which: str, exc: BaseException) -> InputError:
    """The one line for a chunk HDF5 cannot read back (a corrupt or truncated file)."""
    return InputError(f"{path}: cannot read {dataset} ({which}): a corrupt or truncated chunk "
                      f"({' '.join(str(exc).split())}); rebuild the cache with dqtool patches")


def label_dtype(size: int) -> np.dtype:
    """Stored label dtype for S x S patches: ids are consecutive per patch, so id <= S * S."""
    return np.dtype(np.uint16) if size * size < 65536 else np.dtype(np.uint32)


def _raw_codec(dset: h5py.Dataset) -> str | None:
    """'gzip' or 'none' when ``dset``'s chunks can be read raw and decoded here, else None.

    Requires one leading-axis item per chunk and a filter pipeline that is empty or deflate alone.
    """
    if dset.chunks is None or tuple(dset.chunks) != (1,) + tuple(dset.shape[1:]):
        return None
    if dset.dtype.kind not in "uif" or dset.dtype.hasobject:
        return None
    plist = dset.id.get_create_plist()
    filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    if not filters:
        return "none"
    if filters == [h5py.h5z.FILTER_DEFLATE]:
        return "gzip"
    return None


# ----------------------------------------------------------------------------------------------
# reading


def _locked(exc: OSError) -> bool:
    """libhdf5's "file is locked by another process" (errno 11, EAGAIN/EWOULDBLOCK), not a lasting lock error
    such as ENOLCK on a file system without locks."""
    return getattr(exc, "errno", None) == errno.EAGAIN or ("unable to lock file" in str(exc)
                                                           and f"errno = {errno.EAGAIN}," in str(exc))


def _open_waiting(path: Path, mode: str, wait_s: float | None, **kwargs) -> h5py.File:
    """``h5py.File(path, mode)``, retried every 0.2 s for up to ``wait_s`` (default :data:`LOCK_WAIT_S`) while
    libhdf5's file lock says another process holds the file in a conflicting mode; then one line."""
    wait_s = LOCK_WAIT_S if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return h5py.File(path, mode, **kwargs)
        except OSError as exc:
            if not _locked(exc):
                raise InputError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {exc}") from exc
            if time.monotonic() >= deadline:
                held = "for writing " if mode == "r" else ""
                raise InputError(f"{path}: held open {held}by another process for over {wait_s:g} s "
                                 "(a dqtool run, or another HDF5 program); try again when it has finished") \
                    from exc
            time.sleep(0.2)


def open_for_reading(path: Path, wait_s: float | None = None) -> h5py.File:
    """``h5py.File(path, "r")``, waiting up to ``wait_s`` (default :data:`LOCK_WAIT_S`) while another process
    holds the file open for writing (libhdf5's file lock, held while ``embed``/``select`` write a derived
    group): a reader keeps working through a write. Then, or for a file HDF5 cannot read, one line."""
    return _open_waiting(path, "r", wait_s)


class PatchCache:
    """Read-only view of a complete cache. Use as a context manager or call ``close()``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such cache file")
        self._h5 = open_for_reading(self.path)
        try:
            self._check()
        except Exception:
            self._h5.close()
            raise

    def _check(self):
        attrs = self._h5.attrs
        if "schema_version" not in attrs or "images" not in self._h5:
            raise InputError(f"{self.path}: not a dqtool patch cache (no schema_version/images)")
        if int(attrs.get("complete", 0)) != 1:
            raise InputError(f"{self.path}: cache is incomplete (a build was interrupted); rebuild it with "
                             "`dqtool patches`")
        if int(attrs["schema_version"]) > SCHEMA_VERSION:
            raise InputError(f"{self.path}: cache schema {int(attrs['schema_version'])} is newer than this "
                             f"dqtool understands ({SCHEMA_VERSION})")
        n = int(attrs["n_patches"])
        if self._h5["images"].shape[0] != n:
            raise InputError(f"{self.path}: images hold {self._h5['images'].shape[0]} patches, header says {n}")

    # the index arrays are read on first use (opening a cache for a patch read then costs ~0.1 ms, not ~0.8)
    def _read(self, name: str) -> np.ndarray:
        if self._h5.id.valid:
            return self._h5[name][()]
        with open_for_reading(self.path) as h5:  # first use after close()
            return h5[name][()]

    def _strings(self, name: str) -> np.ndarray:
        return np.array([s.decode() if isinstance(s, bytes) else s for s in self._read(name)], dtype=object)

    @cached_property
    def sources(self) -> np.ndarray:
        return self._strings("sources")

    @cached_property
    def domains(self) -> np.ndarray:
        return self._strings("domains")

    @cached_property
    def patch_source(self) -> np.ndarray:
        return self._read("patch_source")

    @cached_property
    def patch_domain(self) -> np.ndarray:
        return self._read("patch_domain")

    @cached_property
    def offsets(self) -> np.ndarray:
        return self._read("patch_offset")

    @cached_property
    def source_shape(self) -> np.ndarray:
        return self._read("source_shape")

    # metadata --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._h5.attrs["n_patches"])

    @property
    def attrs(self) -> dict:
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in self._h5.attrs.items()}

    @property
    def patch_size(self) -> int:
        return int(self._h5.attrs["patch_size"])

    @property
    def stride(self) -> int:
        return int(self._h5.attrs["stride"])

    @property
    def n_channels(self) -> int:
        return int(self._h5["images"].shape[-1])

    @property
    def has_labels(self) -> bool:
        return bool(self._h5.attrs["has_labels"])

    @property
    def content_hash(self) -> str:
        return str(self._h5.attrs["content_hash"])

    @property
    def options(self) -> dict:
        return json.loads(self._h5.attrs["options"])

    @property
    def domain_of_patch(self) -> np.ndarray:
        return self.domains[self.patch_domain]

    @property
    def source_of_patch(self) -> np.ndarray:
        return self.sources[self.patch_source]

    # arrays ----------------------------------------------------------------------------------
    def _take(self, name: str, indices, dtype=None) -> np.ndarray:
        """Patches ``indices`` (any order, repeats allowed) of dataset ``name`` as ``dtype`` (default: stored)."""
        idx = np.asarray(indices, dtype=np.int64).ravel()
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = int(idx[(idx < 0) | (idx >= n)][0])
            raise InputError(f"{self.path}: patch index {bad} is outside the cache (0..{n - 1})")
        dset = self._h5[name]
        dtype = np.dtype(dset.dtype if dtype is None else dtype)
        out = np.empty((idx.size,) + dset.shape[1:], dset.dtype)  # stored dtype; one cast at the end
        codec = _raw_codec(dset)
        try:
            if idx.size == 0:
                pass
            elif codec is not None:
                self._take_raw(dset, codec, idx, out)
            else:
                # h5py's fancy indexing is slow (a point selection); one chunk (= one patch) per read is not.
                uniq = np.unique(idx)
                if uniq.size > 64 and uniq[-1] - uniq[0] + 1 <= 2 * uniq.size:  # dense ranges: one slab read
                    out = dset[int(uniq[0]):int(uniq[-1]) + 1][idx - uniq[0]]
                else:
                    for k, i in enumerate(idx):
                        dset.read_direct(out, np.s_[int(i)], np.s_[k])
        except (OSError, RuntimeError, KeyError) as exc:  # HDF5's errors for a corrupt or truncated chunk
            which = f"patch {int(idx[0])}" if idx.size == 1 else f"one of {idx.size} patches from {int(idx.min())}"
            raise _corrupt(self.path, dset.name, which, exc) from exc
        return out if out.dtype == dtype else out.astype(dtype)

    def _pool(self) -> ThreadPoolExecutor:
        if getattr(self, "_executor", None) is None:
            self._executor = ThreadPoolExecutor(max_workers=READ_THREADS - 1, thread_name_prefix="dqtool-cache")
        return self._executor

    def _take_raw(self, dset: h5py.Dataset, codec: str, idx: np.ndarray, out: np.ndarray) -> None:
        """Fill ``out[k]`` (of ``dset``'s dtype) with patch ``idx[k]``.

        Each distinct patch's stored chunk is read once (``read_direct_chunk``; HDF5 reads serially), then
        the chunks are inflated straight into ``out`` by libdeflate (zlib if missing), split into
        ``READ_THREADS`` groups: ``READ_THREADS - 1`` in the pool and one in this thread (both codecs
        release the GIL). A chunk whose filter was skipped (filter mask != 0), or that does not inflate to
        exactly one patch, is read through h5py instead (which raises its own error on corrupt data).
        """
        nbytes = out[0].nbytes
        zeros = (0,) * (dset.ndim - 1)
        first: dict[int, int] = {}
        repeats, jobs, slow = [], [], []
        for k, i in enumerate(idx.tolist()):
            if i in first:
                repeats.append((k, first[i]))
                continue
            first[i] = k
            mask, raw = dset.id.read_direct_chunk((i,) + zeros)
            (slow if mask != 0 else jobs).append((k, i, raw))

        def decode(group) -> list:
            failed = []
            for k, i, raw in group:
                dst = out[k].reshape(-1).view(np.uint8)
                try:
                    if codec == "none":
                        ok = len(raw) == nbytes
                        if ok:
                            dst[:] = np.frombuffer(raw, np.uint8)
                    elif _deflate_decode is not None:
                        ok = len(_deflate_decode(raw, out=dst)) == nbytes
                    else:
                        data = zlib.decompress(raw, 15, nbytes)
                        ok = len(data) == nbytes
                        if ok:
                            dst[:] = np.frombuffer(data, np.uint8)
                except Exception:  # corrupt or oversized chunk
                    ok = False
                if not ok:
                    failed.append((k, i, raw))
            return failed

        n_groups = min(READ_THREADS, len(jobs)) if codec == "gzip" else 1
        groups = [jobs[g::n_groups] for g in range(n_groups)] if jobs else []
        futures = [self._pool().submit(decode, g) for g in groups[1:]]
        if groups:
            slow += decode(groups[0])
        for fut in futures:
            slow += fut.result()
        for k, i, _ in slow:
            try:
                dset.read_direct(out, np.s_[i], np.s_[k])
            except (OSError, RuntimeError) as exc:
                raise _corrupt(self.path, dset.name, f"patch {i}", exc) from exc
        for k, src in repeats:
            out[k] = out[src]

    def images(self, indices) -> np.ndarray:
        """uint8 (n, S, S, C) patches in the order of ``indices``."""
        return self._take("images", indices)

    def images_float(self, indices) -> np.ndarray:
        """float32 (n, S, S, C) in [0, 1]."""
        return self.images(indices).astype(np.float32) / 255.0

    def labels(self, indices) -> np.ndarray:
        """uint32 (n, S, S) label patches (consecutive ids per patch), whatever the stored dtype."""
        if not self.has_labels:
            raise InputError(f"{self.path}: this cache was built from unlabelled images")
        return self._take("labels", indices, np.uint32)

    def torch_images(self, indices):
        """torch float32 (n, C, S, S) in [0, 1]."""
        import torch

        return torch.from_numpy(self.images_float(indices)).permute(0, 3, 1, 2).contiguous()

    # derived groups -------------------------------------------------------------------------
    def _group(self, name: str):
        """The complete /derived/<name>, or the old copy a swap interrupted between its moves, or None."""
        derived = self._h5.get("derived")
        if derived is None:
            return None
        grp = derived.get(name)
        if grp is None:  # a write killed between moving the old group aside and the new one in
            parent, _, leaf = f"derived/{name}".rpartition("/")
            olds = sorted(k for k in self._h5[parent].keys() if k.startswith(f".{leaf}.old-")) \
                if parent in self._h5 else []
            grp = self._h5[f"{parent}/{olds[0]}"] if olds else None
        if grp is None or not isinstance(grp, h5py.Group) or int(grp.attrs.get("complete", 0)) != 1:
            return None
        return grp

    def read_group(self, name: str):
        """(arrays, attrs) of /derived/<name>, or None if missing or not completely written."""
        grp = self._group(name)
        if grp is None:
            return None
        arrays = {k: grp[k][()] for k in grp.keys() if isinstance(grp[k], h5py.Dataset)}
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in grp.attrs.items() if k != "complete"}
        return arrays, attrs

    def group_names(self) -> list[str]:
        if "derived" not in self._h5:
            return []
        out = []
        self._h5["derived"].visititems(
            lambda n, o: out.append(n) if isinstance(o, h5py.Group) and "complete" in o.attrs
            and not o.name.rpartition("/")[2].startswith(".") else None)
        return out

    def write_group(self, name: str, arrays: dict, attrs: dict | None = None) -> None:
        """Replace /derived/<name> with ``arrays`` and ``attrs``, all or nothing.

        The new group is written whole under a temporary name (``.<name>.tmp-<pid>``, completion flag
        last, flushed), then swapped in with two HDF5 moves (old group -> ``.<name>.old-<pid>``, new ->
        ``<name>``) and the old one deleted. A failure while writing (full disk, kill) leaves the previous
        group in place; a kill between the moves leaves the old copy, which :meth:`read_group` reads and
        the next write removes. Leftovers of dead writers are removed first. Patches are never touched.
        The read handle is closed and reopened around the write.
        """
        from dqtool.common.outputs import kill_point, pid_alive

        key = f"derived/{name}"
        parent, _, leaf = key.rpartition("/")
        tmp_key = f"{parent}/.{leaf}.tmp-{os.getpid()}"
        old_key = f"{parent}/.{leaf}.old-{os.getpid()}"
        self._h5.close()
        try:
            # A writer waits too, while another process (a training loading its patches) has the file open for
            # reading: libhdf5 refuses "r+" then. No chunk cache: see cache_build._write.
            with _open_waiting(self.path, "r+", None, rdcc_nbytes=0) as h5:
                grp_parent = h5.require_group(parent)
                for k in list(grp_parent.keys()):  # leftovers of killed writers of this group
                    for tag in (".tmp-", ".old-"):
                        if k.startswith(f".{leaf}{tag}") and k.rpartition("-")[2].isdigit() \
                                and (int(k.rpartition("-")[2]) == os.getpid()
                                     or not pid_alive(int(k.rpartition("-")[2]))):
                            if tag == ".old-" and leaf not in grp_parent:
                                grp_parent.move(k, leaf)
                            else:
                                del grp_parent[k]
                try:
                    grp = h5.create_group(tmp_key)
                    for k, v in arrays.items():
                        v = np.asarray(v)
                        if v.dtype.kind in "UO":
                            grp.create_dataset(k, data=np.asarray(v, dtype=object).astype(str).tolist(), dtype=_STR)
                        else:
                            grp.create_dataset(k, data=v)
                        kill_point("write_group:dataset")
                    for k, v in (attrs or {}).items():
                        grp.attrs[k] = json.dumps(v) if isinstance(v, (dict, list, tuple)) else v
                    grp.attrs["complete"] = 1
                    h5.flush()
                except BaseException:
                    if tmp_key in h5:
                        del h5[tmp_key]
                    raise
                kill_point("write_group:written")
                if key in h5:
                    h5.move(key, old_key)
                    h5.flush()
                    kill_point("write_group:moved_old")
                h5.move(tmp_key, key)
                h5.flush()
                if old_key in h5:
                    del h5[old_key]
                h5.flush()
        finally:
            self._h5 = h5py.File(self.path, "r")

    def summary(self) -> dict:
        """Patches per domain and per source, shapes, dtypes and options (what ``dqtool info`` prints)."""
        per_domain = {str(d): int((self.patch_domain == i).sum()) for i, d in enumerate(self.domains)}
        per_source = {str(s): int((self.patch_source == i).sum()) for i, s in enumerate(self.sources)}
        datasets = {k: {"shape": list(self._h5[k].shape), "dtype": str(self._h5[k].dtype),
                        "chunks": list(self._h5[k].chunks or []), "compression": self._h5[k].compression}
                    for k in ("images", "labels") if k in self._h5}
        return {"path": str(self.path), "n_patches": len(self), "n_sources": len(self.sources),
                "has_labels": self.has_labels, "patch_size": self.patch_size, "stride": self.stride,
                "options": self.options, "dqtool_version": str(self._h5.attrs["dqtool_version"]),
                "content_hash": self.content_hash, "patches_per_domain": per_domain,
                "patches_per_source": per_source, "datasets": datasets, "derived": self.group_names()}

    def close(self):
        executor, self._executor = getattr(self, "_executor", None), None
        if executor is not None:
            executor.shutdown(wait=True)
        if getattr(self, "_h5", None) is not None and self._h5.id.valid:
            self._h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass
