"""Writing a patch cache: cut a dataset into windows, normalise, and write the HDF5 file crash-safely.

The schema and the reading side are in :mod:`dqtool.data.cache`. A cache is written to ``.CACHE.h5.tmp-<pid>``
and renamed onto ``CACHE.h5`` only when complete (attribute ``complete`` = 1 set last); an existing cache whose
content hash (inputs + options) matches is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from dqtool._version import __version__
from dqtool.common.cluster import connect
from dqtool.common.errors import InputError
from dqtool.common.files import atomic_write
from dqtool.common.outputs import kill_point, writing
from dqtool.common.progress import bar
from dqtool.data.cache import (CHANNEL_MODES, COMPRESSIONS, DEFAULT_COMPRESSION, NORMALISATIONS, SCHEMA_VERSION, _STR, PatchCache, label_dtype)
from dqtool.data.datasets import ArraySample, Dataset, Sample, check_distinct_sources, open_dataset
from dqtool.data.io import normalise_percentile, relabel_consecutive, to_gray
from dqtool.data.patches import EDGE_MODES, count_windows, iter_patches, window_starts


@dataclass(frozen=True)
class PatchOptions:
    """Everything that changes the bytes of a cache besides its inputs."""

    size: int = 224
    stride: int = 112
    edge: str = "shift"
    channels: str = "gray"
    normalisation: str = "percentile"
    compression: str = DEFAULT_COMPRESSION

    def __post_init__(self):
        if self.size < 8:
            raise ValueError(f"patch size must be >= 8, got {self.size}")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        for name, value, allowed in (("edge", self.edge, EDGE_MODES), ("channels", self.channels, CHANNEL_MODES),
                                     ("normalisation", self.normalisation, NORMALISATIONS),
                                     ("compression", self.compression, COMPRESSIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")

    def to_dict(self) -> dict:
        return {"size": self.size, "stride": self.stride, "edge": self.edge, "channels": self.channels,
                "normalisation": self.normalisation, "compression": self.compression}


# ----------------------------------------------------------------------------------------------
# intensity handling


def prepare_image(image: np.ndarray, channels: str = "gray", normalisation: str = "percentile") -> np.ndarray:
    """Source image -> uint8 (H, W, C) as stored in the cache.

    channels: ``gray`` = mean over colour channels (Cellpose's channels [0, 0]); ``rgb`` = keep 3 channels,
    grayscale replicated. normalisation, per source image and channel: ``percentile`` maps the 1st
    percentile to 0 and the 99.8th to 255 (clipped); ``minmax`` maps min..max to 0..255; ``none`` keeps
    8-bit values and scales 16-bit (and wider) by 255 / 65535.
    """
    image = np.asarray(image)
    if channels == "gray":
        img = to_gray(image)[..., None]
    else:
        img = image.astype(np.float32)
        img = np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img
    if normalisation == "percentile":
        out = normalise_percentile(img, 1.0, 99.8)
    elif normalisation == "minmax":
        lo = img.min(axis=(0, 1), keepdims=True)
        hi = img.max(axis=(0, 1), keepdims=True)
        out = np.where(hi > lo, (img - lo) / np.where(hi > lo, hi - lo, 1), 0.0)
    else:
        scale = 1.0 if image.dtype == np.uint8 or (image.dtype.kind == "f" and image.max() <= 255) else 255.0 / 65535.0
        out = np.clip(img * scale, 0, 255) / 255.0
    return np.round(out * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# hashing


def input_hash(samples: Sequence[Sample]) -> str:
    """sha256 over, in order, each sample's fingerprint: name, domain, bytes of its image and label files."""
    h = hashlib.sha256()
    for s in samples:
        h.update(s.fingerprint().encode())
    return h.hexdigest()


def content_hash(input_digest: str, options: PatchOptions) -> str:
    """Identity of a cache: its inputs and every option that changes its bytes."""
    payload = json.dumps({"inputs": input_digest, "options": options.to_dict(), "schema": SCHEMA_VERSION},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------
# writing


@dataclass
class BuildReport:
    """What ``build_cache`` did: 'built', 'reused' or 'rebuilt', and why."""

    path: Path
    action: str
    reason: str = ""
    n_patches: int = 0
    per_domain: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "action": self.action, "reason": self.reason,
                "n_patches": self.n_patches, "per_domain": self.per_domain, "skipped": self.skipped}


def _why_stale(path: Path, new_hash: str, new_inputs: str, options: PatchOptions) -> str | None:
    """None if the cache at ``path`` is complete and matches; otherwise a sentence saying why not."""
    try:
        with h5py.File(path, "r") as h5:
            attrs = h5.attrs
            if int(attrs.get("complete", 0)) != 1:
                return "the existing file is incomplete (an earlier build was interrupted)"
            if str(attrs.get("content_hash", "")) == new_hash:
                return None
            old = json.loads(attrs.get("options", "{}"))
            diffs = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in options.to_dict().items() if old.get(k) != v]
            if diffs:
                return "options changed: " + ", ".join(diffs)
            if str(attrs.get("input_hash", "")) != new_inputs:
                return "the input images or labels changed"
            return "the cache was written by another schema"
    except OSError:
        return "the existing file is not a readable HDF5 cache (truncated or corrupt)"


def build_cache(datasets: Sequence[Dataset] | Dataset, out: str | os.PathLike, options: PatchOptions | None = None,
                force: bool = False, quiet: bool = False, cluster=None) -> BuildReport:
    """Cut every sample of ``datasets`` into patches and write the cache at ``out``.

    Reuses an existing complete cache whose content hash matches (inputs + options); otherwise builds a
    new one beside it and renames it into place, so the old file is replaced only by a complete one.
    ``cluster`` (a :class:`dqtool.common.cluster.Cluster`): images are read and cut by Dask tasks, one
    image (or one band of an OME-Zarr image) a task; this process alone writes the cache, the same bytes.
    """
    options = options or PatchOptions()
    if isinstance(datasets, Dataset):
        datasets = [datasets]
    samples: list[Sample] = [s for ds in datasets for s in ds]
    if not samples:
        raise InputError("no images to cut into patches: " + ", ".join(str(ds.root) for ds in datasets))
    out = Path(out)
    if not out.parent.exists():
        raise FileNotFoundError(f"{out.parent}: output folder does not exist")
    inputs = [ds.root for ds in datasets if ds.format != "arrays"]
    inputs += [p for s in samples for p in (s.image_path, s.label_path) if isinstance(p, Path)]
    # connect first: an unreachable --scheduler fails before the inputs are hashed
    with writing(out, "patches", inputs), connect(cluster, quiet) as cluster:
        digest = input_hash(samples)
        chash = content_hash(digest, options)
        reason = "new cache"
        if out.exists():
            reason = _why_stale(out, chash, digest, options)
            if reason is None and not force:
                with PatchCache(out) as cache:
                    summ = cache.summary()
                return BuildReport(out, "reused", "inputs and options match the existing cache (hash match)",
                                   summ["n_patches"], summ["patches_per_domain"])
            dropped = derived_work(out)
            if dropped and not force:
                raise InputError(f"{out}: a rebuild ({reason or 'asked for'}) would drop {', '.join(dropped)}; "
                                 "pass --force to rebuild, or write the new cache to another --out")
            reason = "--force" if reason is None else reason
        with atomic_write(out) as tmp:
            per_domain = _write(samples, tmp, options, digest, chash, quiet, cluster)
            kill_point("patches:written")
    action = "built" if reason == "new cache" else "rebuilt"
    return BuildReport(out, action, reason, sum(per_domain.values()), per_domain)


def derived_work(path: str | os.PathLike) -> list[str]:
    """What rebuilding the cache at ``path`` would drop: its derived groups (features, bins) and the subset
    files beside it selected on its content. Empty for a file that is not a readable cache."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as h5:
            chash = str(h5.attrs.get("content_hash", ""))
            groups: list[str] = []
            if "derived" in h5:
                h5["derived"].visititems(lambda n, o: groups.append(n) if isinstance(o, h5py.Group)
                                         and "complete" in o.attrs and not n.rpartition("/")[2].startswith(".")
                                         else None)
    except OSError:
        return []
    out = [f"/derived/{g}" for g in groups]
    for candidate in sorted(path.parent.glob("*.json")):
        try:
            if candidate.stat().st_size > (16 << 20):
                continue
            data = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "indices" in data and chash and data.get("cache_hash") == chash:
            out.append(f"subset {candidate.name}")
    return out


def _windows(sample, options: PatchOptions, has_labels: bool, ys: Sequence[int] | None = None):
    """(shape, windows) of one sample: ``windows`` yields (y, x, uint8 patch, label patch or None) in the
    cache's order. ``ys``: only the window rows starting there (an OME-Zarr band; None = all)."""
    size, stride, edge = options.size, options.stride, options.edge
    if getattr(sample, "lazy", False):  # OME-Zarr: cut band by band, never loaded whole
        shape = sample.shape
        ys = window_starts(shape[0], size, stride, edge) if ys is None else list(ys)
        windows = sample.iter_windows(ys, window_starts(shape[1], size, stride, edge), size, options.channels,
                                      options.normalisation, relabel_consecutive if has_labels else None)
        return shape, windows
    img = sample.image
    lab = sample.labels if has_labels else None
    if lab is not None and lab.shape != img.shape[:2]:
        raise InputError(f"{sample.label_path}: label shape {lab.shape} does not match image "
                         f"{sample.image_path} shape {img.shape[:2]}")
    shape = img.shape[:2]
    return shape, iter_patches(prepare_image(img, options.channels, options.normalisation), lab, size, stride, edge)


#: Window rows per task when an OME-Zarr image is cut on a cluster (at least one chunk row of the image).
BAND_ROWS = 8


def _pieces(samples: Sequence[Sample], options: PatchOptions) -> list[tuple[int, list[int] | None]]:
    """The tasks of a distributed ``patches``: (sample index, None) per image read whole; an OME-Zarr image
    one task per band of window rows (whole chunk rows of its array, at least :data:`BAND_ROWS` window
    rows), so no task holds a whole slide. Depends on the inputs and options only, never on the workers."""
    pieces: list[tuple[int, list[int] | None]] = []
    for si, sample in enumerate(samples):
        if not getattr(sample, "lazy", False):
            pieces.append((si, None))
            continue
        ys = window_starts(sample.shape[0], options.size, options.stride, options.edge)
        chunk = max(int(sample.chunks[0]), options.size)
        bands: list[list[int]] = []
        for y in ys:
            if bands and (y // chunk == bands[-1][-1] // chunk or len(bands[-1]) < BAND_ROWS):
                bands[-1].append(y)
            else:
                bands.append([y])
        pieces += [(si, band) for band in bands] or [(si, [])]
    return pieces


def _cut_piece(item, options: PatchOptions, has_labels: bool):
    """A task of a distributed ``patches`` (runs on a worker): read one image (or one OME-Zarr band) and cut
    it; returns (shape, offsets (k, 2), patches (k, S, S, C) uint8, label patches (k, S, S) or None). The
    worker only reads the source files; the client writes the cache."""
    sample, ys = item
    shape, windows = _windows(sample, options, has_labels, ys)
    offsets, patches, labels = [], [], []
    for y, x, ip, lp in windows:
        offsets.append((y, x))
        patches.append(ip)
        labels.append(lp)
    n_chan = 1 if options.channels == "gray" else 3
    stack = np.stack(patches) if patches else np.zeros((0, options.size, options.size, n_chan), np.uint8)
    lab = np.stack(labels) if patches and has_labels else None
    return tuple(shape), offsets, stack, lab


def _portable(sample):
    """``sample`` with absolute file paths, for a worker on another machine (another working directory)."""
    import dataclasses

    if not dataclasses.is_dataclass(sample):
        return sample
    names = {f.name for f in dataclasses.fields(sample)}
    change = {k: Path(getattr(sample, k)).absolute() for k in ("image_path", "label_path")
              if k in names and isinstance(getattr(sample, k), Path)}
    return dataclasses.replace(sample, **change) if change else sample


def _cut_on_cluster(samples, options: PatchOptions, has_labels: bool, cluster, quiet: bool):
    """(sample index, shape, windows) per sample, in order, cut by Dask tasks (:func:`_pieces`)."""
    import functools

    from dqtool.common.cluster import iter_tasks

    pieces = _pieces(samples, options)
    per_sample = [0] * len(samples)
    for si, _ in pieces:
        per_sample[si] += 1
    portable: dict[int, object] = {}  # one copy per sample, however many bands it has
    items = ((portable.setdefault(si, _portable(samples[si])) if si not in portable else portable[si], ys)
             for si, ys in pieces)
    stream = iter_tasks(functools.partial(_cut_piece, options=options, has_labels=has_labels), items, cluster,
                        kind="patches", desc="patches", quiet=quiet,
                        unit="img" if len(pieces) == len(samples) else "task", total=len(pieces))

    def windows(first, more: int):
        # the caller writes every window of one sample before it asks for the next sample
        piece = first
        while True:
            _, offsets, patches, labels = piece
            for j, (y, x) in enumerate(offsets):
                yield y, x, patches[j], None if labels is None else labels[j]
            if more == 0:
                return
            more -= 1
            piece = next(stream)

    try:
        for si in range(len(samples)):
            first = next(stream)
            yield si, first[0], windows(first, per_sample[si] - 1)
    finally:
        stream.close()


def _write(samples: Sequence[Sample], tmp: Path, options: PatchOptions, digest: str, chash: str,
           quiet: bool, cluster=None) -> dict:
    size, stride, edge = options.size, options.stride, options.edge
    n_chan = 1 if options.channels == "gray" else 3
    labelled = [s.has_labels for s in samples]
    has_labels = all(labelled)
    if any(labelled) and not has_labels:
        missing = [s.name for s in samples if not s.has_labels][:3]
        raise InputError(f"some images have labels and some don't (e.g. {', '.join(missing)}): a cache is "
                         "either fully labelled or unlabelled; pass them as separate runs")
    domains = sorted({s.domain for s in samples}, key=[s.domain for s in samples].index)
    comp = None if options.compression == "none" else options.compression
    comp_opts = 1 if comp == "gzip" else None
    per_domain = {d: 0 for d in domains}
    # rdcc_nbytes=0: no raw-data chunk cache (a patch is one chunk, written once, so it never helped). With
    # one, a write that fails on a full disk leaves dirty chunks that libhdf5 evicts on close and crashes
    # (SIGSEGV, rc 139); without it the failure is an OSError here and the close is clean (issue 19).
    with h5py.File(tmp, "w", rdcc_nbytes=0) as h5:
        h5.attrs["complete"] = 0
        images = h5.create_dataset("images", (0, size, size, n_chan), np.uint8, maxshape=(None, size, size, n_chan),
                                   chunks=(1, size, size, n_chan), compression=comp, compression_opts=comp_opts)
        labels = None
        if has_labels:
            labels = h5.create_dataset("labels", (0, size, size), label_dtype(size), maxshape=(None, size, size),
                                       chunks=(1, size, size), compression=comp, compression_opts=comp_opts)
        p_src, p_dom, p_off, shapes = [], [], [], []
        n = 0
        distributed = cluster is not None and cluster.active
        progress = bar(len(samples), desc="patches", quiet=quiet or distributed, unit="img")
        cut = _cut_on_cluster(samples, options, has_labels, cluster, quiet) if distributed else \
            ((si, *_windows(sample, options, has_labels)) for si, sample in enumerate(samples))
        try:
            for si, shape, windows in cut:
                sample = samples[si]
                shapes.append(shape)
                k = count_windows(shape, size, stride, edge)
                if k == 0:  # only --edge drop gives none; a silently missing image is a lost annotation
                    raise InputError(f"{sample.image_path}: image {shape[0]}x{shape[1]} is smaller than the "
                                     f"{size}-px window with --edge {edge}, so it gives no patch; use --edge shift or "
                                     "pad, or a smaller --size")
                images.resize(n + k, axis=0)
                if labels is not None:
                    labels.resize(n + k, axis=0)
                for j, (y, x, ip, lp) in enumerate(windows):
                    images[n + j] = ip
                    if labels is not None:
                        labels[n + j] = lp
                    p_off.append((y, x))
                p_src += [si] * k
                p_dom += [domains.index(sample.domain)] * k
                per_domain[sample.domain] += k
                n += k
                progress.update(1)
                kill_point("patches:image")
        finally:
            cut.close()  # on an error: the Dask tasks still in flight and the cluster end here
        progress.close()
        h5.create_dataset("patch_source", data=np.asarray(p_src, np.int32))
        h5.create_dataset("patch_domain", data=np.asarray(p_dom, np.int32))
        h5.create_dataset("patch_offset", data=np.asarray(p_off, np.int32).reshape(-1, 2))
        h5.create_dataset("sources", data=[str(s.image_path) for s in samples], dtype=_STR)
        h5.create_dataset("source_labels", data=[str(s.label_path or "") for s in samples], dtype=_STR)
        h5.create_dataset("source_shape", data=np.asarray(shapes, np.int32).reshape(-1, 2))
        h5.create_dataset("source_domain", data=np.asarray([domains.index(s.domain) for s in samples], np.int32))
        h5.create_dataset("domains", data=domains, dtype=_STR)
        attrs = {"dqtool_version": __version__, "schema_version": SCHEMA_VERSION, "patch_size": size,
                 "stride": stride, "edge": edge, "channels": options.channels,
                 "normalisation": options.normalisation, "compression": options.compression,
                 "input_hash": digest, "options": json.dumps(options.to_dict(), sort_keys=True),
                 "content_hash": chash, "n_patches": n, "has_labels": has_labels}
        for key, value in attrs.items():
            h5.attrs[key] = value
        h5.flush()
        h5.attrs["complete"] = 1
    return per_domain


def build_cache_from_arrays(path: str | os.PathLike, images: Sequence[np.ndarray],
                            labels: Sequence[np.ndarray] | None, names: Sequence[str], domain: str = "default",
                            size: int = 224, stride: int = 112, edge: str = "shift", channels: str = "gray",
                            quiet: bool = True) -> Path:
    """Build a cache from in-memory arrays (tests and notebooks); same schema and rules as files."""
    if labels is not None and len(labels) != len(images):
        raise InputError(f"{len(images)} images but {len(labels)} label maps")
    samples = [ArraySample(name=n, domain=domain, array=np.asarray(im),
                           label_array=None if labels is None else relabel_consecutive(
                               np.asarray(labels[i])))
               for i, (im, n) in enumerate(zip(images, names))]
    ds = Dataset(samples=samples, root=Path(str(path)), format="arrays")
    build_cache([ds], path, PatchOptions(size=size, stride=stride, edge=edge, channels=channels), quiet=quiet,
                force=True)
    return Path(path)


def build_cache_from_folders(sources: Sequence[str | os.PathLike], out: str | os.PathLike,
                             domains: Sequence[str] | None = None, format: str | None = None,
                             split: str = "train", options: PatchOptions | None = None, force: bool = False,
                             quiet: bool = False, level: int = 0, cluster=None) -> BuildReport:
    """Open each folder with its layout's reader and build one cache (what ``dqtool patches`` runs).

    ``domains``: none (each folder's own name, or its parent's for train/test folders), one name for
    all folders, or one name per folder.
    """
    if not sources:
        raise InputError("no input folders given")
    domains = list(domains or [])
    if len(domains) not in (0, 1, len(sources)):
        raise InputError(f"give --domain once, or once per input folder ({len(sources)}), not {len(domains)} times")
    if len(domains) == 1:
        domains = domains * len(sources)
    datasets = [open_dataset(src, format=format, domain=domains[i] if domains else None, split=split, level=level)
                for i, src in enumerate(sources)]
    check_distinct_sources(sources, datasets)
    return build_cache(datasets, out, options, force=force, quiet=quiet, cluster=cluster)
