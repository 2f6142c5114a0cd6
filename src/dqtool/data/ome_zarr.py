"""OME-Zarr (NGFF) images from local folders, read lazily at one resolution level.

An OME-Zarr image is a Zarr group whose ``multiscales`` metadata (NGFF 0.4: in the group's attributes;
0.5: under ``ome``) lists its levels, finest first, and its axes (``t``, ``c``, ``z``, ``y``, ``x``, any
subset in that order). dqtool reads 2-D images: ``t`` and ``z`` must have one element; ``c`` one channel,
three (read as RGB by ``dqtool patches``), or any number with a Cellpose ``--channels`` choice (``dqtool
predict``). Instance labels are the image's ``labels/<name>`` group (NGFF's image-label), at the same level.

Nothing is read until asked: :meth:`OmeZarrImage.read` returns one region, decoding only the Zarr chunks
it touches, so patches (:meth:`OmeZarrSample.iter_windows`) and tiled prediction (``dqtool.segmentation.
tiled``) hold a band of chunks, never the whole image. Intensity statistics for normalisation come from
the finest level with at most :data:`STATS_PIXELS` pixels (every NGFF pyramid ends in a small level).
Requires the extra ``dqtool[zarr]``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from dqtool.common.errors import InputError, require_extra

#: The most pixels read at once to compute a whole image's intensity statistics (a 2048 x 2048 level).
STATS_PIXELS = 2048 * 2048

_METADATA_FILES = ("zarr.json", ".zattrs", ".zgroup")


def is_ome_zarr(path: str | os.PathLike) -> bool:
    """True for a folder that is a Zarr group (``zarr.json`` or ``.zgroup``/``.zattrs``)."""
    path = Path(path)
    return path.is_dir() and any((path / f).is_file() for f in _METADATA_FILES)


def _open_group(path: Path):
    zarr = require_extra("zarr", "zarr", "reading OME-Zarr images")
    require_extra("ome_zarr", "zarr", "reading OME-Zarr images")
    try:
        return zarr.open_group(str(path), mode="r")
    except Exception as exc:
        raise InputError(f"{path}: not a Zarr group ({type(exc).__name__}: {exc})") from exc


def _ngff_attrs(group) -> dict:
    attrs = dict(group.attrs)
    return dict(attrs.get("ome", attrs))  # NGFF 0.5 nests its metadata under "ome"


@dataclass
class OmeZarrImage:
    """One level of an OME-Zarr image, opened lazily. ``shape`` is (height, width); ``channels`` the c size."""

    path: Path
    level: int
    n_levels: int
    axes: list[str]
    array: object = field(repr=False)  # zarr.Array of the level
    levels: list = field(repr=False, default_factory=list)  # every level's zarr.Array, finest first
    scale: list = field(default_factory=list)  # the level's coordinate scale, one per axis

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(self.array.shape[self.axes.index(a)]) for a in ("y", "x"))

    @property
    def channels(self) -> int:
        return int(self.array.shape[self.axes.index("c")]) if "c" in self.axes else 1

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def chunks(self) -> tuple[int, int]:
        return tuple(int(self.array.chunks[self.axes.index(a)]) for a in ("y", "x"))

    def read(self, y0: int = 0, y1: int | None = None, x0: int = 0, x1: int | None = None,
             array=None, step: int = 1) -> np.ndarray:
        """Rows y0:y1, columns x0:x1 as (h, w) for one channel or (h, w, c); only touched chunks are decoded."""
        array = self.array if array is None else array
        index = []
        for a in self.axes:
            if a == "y":
                index.append(slice(y0, y1, step))
            elif a == "x":
                index.append(slice(x0, x1, step))
            elif a == "c":
                index.append(slice(None))
            else:
                index.append(0)
        region = np.asarray(array[tuple(index)])
        kept = [a for a in self.axes if a in ("c", "y", "x")]
        region = np.moveaxis(region, [kept.index(a) for a in ("y", "x")], [0, 1])
        return region[..., 0] if region.ndim == 3 and region.shape[2] == 1 else region

    def overview(self) -> np.ndarray:
        """The whole image at the finest level with at most :data:`STATS_PIXELS` pixels (a strided read
        of the coarsest level if none is that small): what intensity statistics are computed on."""
        for array in self.levels[self.level:]:
            h, w = (int(array.shape[self.axes.index(a)]) for a in ("y", "x"))
            if h * w <= STATS_PIXELS:
                return self.read(array=array)
        array = self.levels[-1]
        h, w = (int(array.shape[self.axes.index(a)]) for a in ("y", "x"))
        step = int(np.ceil(np.sqrt(h * w / STATS_PIXELS)))
        return self.read(array=array, step=step)


def open_ome_zarr(path: str | os.PathLike, level: int = 0) -> OmeZarrImage:
    """Open level ``level`` of the OME-Zarr image at ``path`` (checks metadata, level, 2-D-ness)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such OME-Zarr folder")
    group = _open_group(path)
    multiscales = _ngff_attrs(group).get("multiscales")
    if not multiscales:
        raise InputError(f"{path}: no OME-Zarr multiscales metadata (a Zarr group, but not an OME-Zarr image)")
    meta = multiscales[0]
    datasets = meta.get("datasets") or []
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in meta.get("axes", ["t", "c", "z", "y", "x"])]
    if "y" not in axes or "x" not in axes:
        raise InputError(f"{path}: axes {axes} have no y and x; dqtool reads 2-D images")
    if not 0 <= level < len(datasets):
        raise InputError(f"{path}: --level {level} does not exist; the image has levels 0..{len(datasets) - 1}")
    try:
        levels = [group[d["path"]] for d in datasets]
    except KeyError as exc:
        raise InputError(f"{path}: multiscales lists level {exc} but the array is missing") from exc
    array = levels[level]
    if array.ndim != len(axes):
        raise InputError(f"{path}: level {level} has {array.ndim} dimensions but the axes are {axes}")
    for a in ("t", "z"):
        if a in axes and array.shape[axes.index(a)] != 1:
            raise InputError(f"{path}: {a} has {array.shape[axes.index(a)]} elements (axes {''.join(axes)}); "
                             "dqtool reads 2-D images, one t and one z")
    scale = [1.0] * len(axes)
    for transform in datasets[level].get("coordinateTransformations", []):
        if transform.get("type") == "scale":
            scale = [float(s) for s in transform["scale"]]
    return OmeZarrImage(path=path, level=level, n_levels=len(datasets), axes=axes, array=array, levels=levels,
                        scale=scale)


def label_names(path: str | os.PathLike) -> list[str]:
    """The label images an OME-Zarr image lists in its ``labels/`` group (NGFF), [] if none."""
    labels = Path(path) / "labels"
    if not is_ome_zarr(labels):
        return []
    return [str(n) for n in _ngff_attrs(_open_group(labels)).get("labels", [])]


def open_ome_zarr_labels(path: str | os.PathLike, level: int = 0, name: str | None = None) -> OmeZarrImage | None:
    """The instance labels of an OME-Zarr image (``labels/<name>``, the first listed by default), or None."""
    names = label_names(path)
    if not names:
        return None
    if name is not None and name not in names:
        raise InputError(f"{path}: no label image {name!r}; labels/ lists {', '.join(names)}")
    labels = open_ome_zarr(Path(path) / "labels" / (name or names[0]), level)
    if labels.dtype.kind not in "iu":
        raise InputError(f"{labels.path}: labels of type {labels.dtype}; expected integer instance ids")
    return labels


def _gray(image: np.ndarray) -> np.ndarray:
    """``dqtool.data.io.to_gray`` (mean over colour channels, float32), repeated here to keep this module
    on the lowest import floor (the dataset reader imports it)."""
    image = np.asarray(image)
    return image.astype(np.float32).mean(axis=-1) if image.ndim == 3 else image.astype(np.float32)


def _prepare(region: np.ndarray, channels: str, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``cache_build.prepare_image`` with the whole image's (lo, hi) per channel: uint8 (h, w, C)."""
    img = _gray(region)[..., None] if channels == "gray" else region.astype(np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    span = np.where(hi > lo, hi - lo, 1.0)
    out = np.where(hi > lo, np.clip((img - lo) / span, 0.0, 1.0), 0.0)
    return np.round(out * 255.0).astype(np.uint8)


def intensity_range(image: OmeZarrImage, channels: str = "gray", normalisation: str = "percentile"):
    """(lo, hi) per stored channel mapping intensities to 0..1, from :meth:`OmeZarrImage.overview`."""
    view = image.overview()
    img = _gray(view)[..., None] if channels == "gray" else view.astype(np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    flat = img.reshape(-1, img.shape[-1])
    if normalisation == "percentile":
        lo, hi = np.percentile(flat, [1.0, 99.8], axis=0)
    elif normalisation == "minmax":
        lo, hi = flat.min(axis=0), flat.max(axis=0)
    else:
        eight_bit = image.dtype == np.uint8 or (image.dtype.kind == "f" and float(flat.max()) <= 255)
        lo, hi = np.zeros(flat.shape[1]), np.full(flat.shape[1], 255.0 if eight_bit else 65535.0)
    return lo.astype(np.float32), hi.astype(np.float32)


@dataclass
class OmeZarrSample:
    """An OME-Zarr image (and its labels) as a dataset sample, cut into patches without loading it whole."""

    name: str
    domain: str
    image_path: Path
    level: int = 0
    label_name: str | None = None
    lazy = True

    def __post_init__(self):
        self._image = open_ome_zarr(self.image_path, self.level)
        if self._image.channels not in (1, 3):
            raise InputError(f"{self.image_path}: image has {self._image.channels} channels (axes "
                             f"{''.join(self._image.axes)}); dqtool patches reads 1 or 3 (RGB) channels: write the "
                             "channel to cut as its own OME-Zarr image")
        self._labels = open_ome_zarr_labels(self.image_path, self.level, self.label_name)
        if self._labels is not None and self._labels.shape != self._image.shape:
            raise InputError(f"{self._labels.path}: label shape {self._labels.shape} at level {self.level} does "
                             f"not match the image's {self._image.shape}")

    @property
    def label_path(self) -> Path | None:
        return None if self._labels is None else self._labels.path

    @property
    def has_labels(self) -> bool:
        return self._labels is not None

    @property
    def shape(self) -> tuple[int, int]:
        return self._image.shape

    @property
    def chunks(self) -> tuple[int, int]:
        """The level's chunk (height, width): a cluster cuts an image in bands of whole chunk rows."""
        return self._image.chunks

    @property
    def image(self) -> np.ndarray:
        """The whole level in memory (small images only; patches never call it)."""
        return self._image.read()

    @property
    def labels(self) -> np.ndarray | None:
        return None if self._labels is None else self._labels.read()

    def fingerprint(self) -> str:
        """sha256 of the metadata and every chunk file of the level read (image and labels), with the level."""
        h = hashlib.sha256(f"level {self.level}".encode())
        for image in (self._image, self._labels):
            if image is None:
                continue
            for meta in _METADATA_FILES:
                if (image.path / meta).is_file():
                    h.update((image.path / meta).read_bytes())
            level_dir = image.path / str(image.array.path).split("/")[-1]
            for f in sorted(p for p in level_dir.rglob("*") if p.is_file()):
                h.update(str(f.relative_to(level_dir)).encode())
                with open(f, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
        return f"{self.name}|{self.domain}|{h.hexdigest()}"

    def iter_windows(self, ys: list[int], xs: list[int], size: int, channels: str, normalisation: str,
                     relabel=None) -> Iterator[tuple[int, int, np.ndarray, np.ndarray | None]]:
        """(y, x, uint8 patch, label patch) for windows at rows ``ys`` x columns ``xs`` (``iter_patches``' order).

        The window rows whose start falls in one chunk row are cut from one read of rows [first start,
        last start + size): memory is one band of chunks across the image, never the image. Label
        patches (when ``relabel``, the cache's renumbering, is given) come from the labels' same band.
        """
        height = self.shape[0]
        lo, hi = intensity_range(self._image, channels, normalisation)
        chunk = max(self._image.chunks[0], size)
        groups: dict[int, list[int]] = {}
        for y in ys:
            groups.setdefault(y // chunk, []).append(y)
        for rows in groups.values():
            y0, y1 = rows[0], min(rows[-1] + size, height)
            band = self._image.read(y0, y1)  # raw: each window is normalised on its own (no float band)
            band_labels = self._labels.read(y0, y1) if relabel is not None and self._labels is not None else None
            for y in rows:
                for x in xs:
                    patch = _window(_prepare(band[y - y0:y - y0 + size, x:x + size], channels, lo, hi), 0, 0, size)
                    lab = None if band_labels is None else relabel(_window(band_labels, y - y0, x, size))
                    yield y, x, patch, lab


def _window(band: np.ndarray, y: int, x: int, size: int) -> np.ndarray:
    """band[y:y+size, x:x+size], zero-padded at the bottom/right where it runs past the band."""
    win = band[y:y + size, x:x + size]
    if win.shape[:2] == (size, size):
        return win
    out = np.zeros((size, size) + band.shape[2:], band.dtype)
    out[:win.shape[0], :win.shape[1]] = win
    return out


def find_ome_zarr_images(root: str | os.PathLike) -> list[Path]:
    """``root`` itself if it is an OME-Zarr image, else the OME-Zarr images directly inside it (sorted)."""
    root = Path(root)
    if is_ome_zarr(root):
        return [root]
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.suffix == ".zarr" and is_ome_zarr(p))


def ome_zarr_samples(root: str | os.PathLike, domain: str, level: int = 0) -> list[OmeZarrSample]:
    """One :class:`OmeZarrSample` per OME-Zarr image at or in ``root``."""
    return [OmeZarrSample(name=p.name.removesuffix(".zarr").removesuffix(".ome"), domain=domain, image_path=p,
                          level=level) for p in find_ome_zarr_images(root)]


def write_ome_zarr_labels(path: str | os.PathLike, shape: tuple[int, int], scale=(1.0, 1.0),
                          chunks: int = 1024):
    """Create an empty single-level OME-Zarr label image (uint32, axes y, x) at a temp path beside ``path``.

    Returns (zarr array, temp folder); the caller fills the array region by region and renames the
    temp folder onto ``path`` when whole (:func:`finish_ome_zarr`).
    """
    zarr = require_extra("zarr", "zarr", "writing OME-Zarr labels")
    require_extra("ome_zarr", "zarr", "writing OME-Zarr labels")
    from ome_zarr.writer import write_multiscales_metadata

    from dqtool.common.files import temp_path

    tmp = temp_path(path)
    group = zarr.open_group(str(tmp), mode="w")
    array = group.create_array("0", shape=tuple(shape), chunks=(min(chunks, shape[0]), min(chunks, shape[1])),
                               dtype="uint32", fill_value=0)
    write_multiscales_metadata(group, [{"path": "0", "coordinateTransformations": [
        {"type": "scale", "scale": [float(scale[0]), float(scale[1])]}]}],
        axes=[{"name": "y", "type": "space"}, {"name": "x", "type": "space"}], name="labels")
    return array, tmp


def finish_ome_zarr(tmp: Path, path: str | os.PathLike) -> Path:
    """Rename a completely written OME-Zarr folder onto ``path`` (replacing an older one)."""
    import shutil

    path = Path(path)
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    return path
