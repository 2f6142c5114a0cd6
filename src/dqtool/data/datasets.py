"""One dataset notion: an ordered, lazily loaded list of samples (image, labels or None, name, domain).

Readers for the layouts labs have (REFERENCE.md section 7); ``open_dataset`` picks one by layout:

- ``cellpose``: ``NNN_img.<ext>`` + ``NNN_masks.<ext>``, in the folder or in its ``train/`` / ``test/``.
- ``neurips``: ``images/<name>.<png|tif|tiff|bmp|jpg>`` + ``labels/<name>_label.tiff`` (NeurIPS 2022 CellSeg).
- ``monuseg``: ``Tissue Images/*.tif`` (or ``images/``) + ``Annotations/*.xml`` (or ``annotations/``),
  Aperio XML polygons rasterised into an instance map (see ``rasterise_monuseg``).
- ``generic``: an images folder (``images/``, ``imgs/``, ``img/``) and a labels folder (``labels/``,
  ``masks/``, ``gt/``, ``ground_truth/``); or a bare folder of images, with or without label files beside.

Which file is an image and which is the label of which image is :mod:`dqtool.data.naming`'s one rule
(label files and Cellpose outputs are never read as images; two label files for one image are an error).
Samples are read only when ``.image`` / ``.labels`` are touched. Labels come back as consecutive uint32.
A folder where some images have labels and others don't is an error naming the first image without one.

A **split file** (:func:`write_split`, JSON with the key ``"dqtool_split"``) names a dataset folder and the
images of it that one split takes (a study's fixed train/test split by image); ``open_dataset`` opens it
like a folder, with the samples in the file's order. Nothing is copied: the images stay where they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from dqtool.common.errors import InputError
from dqtool.common.files import file_sha256
from dqtool.data.io import check_image_array, read_image, read_labels, relabel_consecutive
from dqtool.data.naming import (IMAGE_DIRS, IMAGE_STEM_SUFFIX, IMAGE_SUFFIXES, LABEL_DIRS, LabelFolder, check_name,
                                image_key, input_images, is_image_file)

FORMATS = ("cellpose", "neurips", "monuseg", "generic")


@dataclass
class Sample:
    """One image and (optionally) its instance labels, read lazily from files."""

    name: str
    domain: str
    image_path: Path
    label_path: Path | None = None
    label_kind: str = "mask"  # "mask" (a label image) or "monuseg-xml" (polygons)

    @property
    def has_labels(self) -> bool:
        return self.label_path is not None

    @property
    def image(self) -> np.ndarray:
        return read_image(self.image_path)

    @property
    def labels(self) -> np.ndarray | None:
        if self.label_path is None:
            return None
        if self.label_kind == "monuseg-xml":
            shape = self.image.shape[:2]
            return rasterise_monuseg(self.label_path, shape)
        return read_labels(self.label_path)

    def fingerprint(self) -> str:
        """sha256 of the image and label file bytes (the cache's input hash uses it)."""
        lab = file_sha256(self.label_path) if self.label_path else "none"
        return f"{self.name}|{self.domain}|{file_sha256(self.image_path)}|{lab}"


@dataclass
class ArraySample:
    """A sample held in memory (tests, notebooks)."""

    name: str
    domain: str
    array: np.ndarray
    label_array: np.ndarray | None = None

    @property
    def image_path(self) -> str:
        return f"<array:{self.name}>"

    @property
    def label_path(self) -> str | None:
        return None if self.label_array is None else f"<array:{self.name}:labels>"

    @property
    def has_labels(self) -> bool:
        return self.label_array is not None

    @property
    def image(self) -> np.ndarray:
        return check_image_array(np.asarray(self.array), self.image_path)

    @property
    def labels(self) -> np.ndarray | None:
        return self.label_array

    def fingerprint(self) -> str:
        h = hashlib.sha256(np.ascontiguousarray(self.array).tobytes())
        h.update(str(self.array.shape).encode() + str(self.array.dtype).encode())
        if self.label_array is not None:
            h.update(np.ascontiguousarray(self.label_array).tobytes())
        return f"{self.name}|{self.domain}|{h.hexdigest()}"


@dataclass
class Dataset(Sequence):
    """An ordered list of samples from one folder, in one layout, for one domain."""

    samples: list = field(default_factory=list)
    root: Path = Path(".")
    format: str = "generic"

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]

    def __iter__(self) -> Iterator:
        return iter(self.samples)

    @property
    def has_labels(self) -> bool:
        return bool(self.samples) and all(s.has_labels for s in self.samples)

    @property
    def domains(self) -> list[str]:
        return sorted({s.domain for s in self.samples})


# ----------------------------------------------------------------------------------------------
# layout detection


def _find_dir(root: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return root / name
    lower = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    for name in names:
        if name.lower() in lower:
            return lower[name.lower()]
    return None


def _is_cellpose_image(path: Path) -> bool:
    return is_image_file(path) and path.stem.endswith(IMAGE_STEM_SUFFIX)


def _cellpose_root(root: Path, split: str) -> Path:
    if (root / split).is_dir() and any(p.name.rsplit(".", 1)[0].endswith(IMAGE_STEM_SUFFIX)
                                       for p in (root / split).iterdir()):
        return root / split
    return root


def detect_format(root: str | os.PathLike, split: str = "train") -> str:
    """Guess the layout of ``root`` (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder")
    ann = _find_dir(root, ("Annotations", "annotations"))
    if ann is not None and any(p.suffix.lower() == ".xml" for p in ann.iterdir()):
        return "monuseg"
    labels = _find_dir(root, ("labels",))
    if labels is not None and any(p.name.lower().endswith(("_label.tiff", "_label.tif", "_label.png"))
                                  for p in labels.iterdir()):
        return "neurips"
    croot = _cellpose_root(root, split)
    if any(_is_cellpose_image(p) for p in croot.iterdir()):
        return "cellpose"
    return "generic"


def default_domain(root: Path) -> str:
    """Domain name from a folder: its own name, or its parent's when it is a split (train/test/val)."""
    root = root.resolve()
    if root.name.lower() in ("train", "test", "val", "valid", "validation", "images") and root.parent.name:
        return root.parent.name
    return root.name


def open_dataset(root: str | os.PathLike, format: str | None = None, domain: str | None = None,
                 split: str = "train", level: int = 0) -> Dataset:
    """Open the dataset in ``root`` with the reader for its layout (or the one named by ``format``).

    ``split`` picks ``train/`` or ``test/`` for Cellpose-layout roots that have them. An OME-Zarr image
    (or a folder of ``*.zarr`` images) is read lazily at resolution ``level`` (:mod:`dqtool.data.ome_zarr`).
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder")
    if root.is_file() and root.suffix == ".json":
        return _open_split(root, format, domain, split, level)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: expected a dataset folder, got a file")
    if format is None:
        from dqtool.data.ome_zarr import find_ome_zarr_images, ome_zarr_samples

        if find_ome_zarr_images(root):
            dom = domain or default_domain(root).removesuffix(".zarr").removesuffix(".ome")
            return Dataset(samples=ome_zarr_samples(root, dom, level), root=root,
                           format="ome-zarr")
    fmt = format or detect_format(root, split)
    if fmt not in FORMATS:
        raise InputError(f"unknown dataset format {fmt!r}; expected one of {', '.join(FORMATS)}")
    given = root
    samples, root = _read_layout(given, fmt, domain, split)
    if not samples:
        raise InputError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} in the "
                         f"{fmt} layout)")
    if format and not any(s.has_labels for s in samples):
        _refuse_hidden_labels(given, fmt, domain, split)
    labelled = [s.has_labels for s in samples]
    if any(labelled) and not all(labelled):
        first = samples[labelled.index(False)]
        raise InputError(f"{first.image_path}: missing label file (other images in {root} have labels)")
    return Dataset(samples=samples, root=root, format=fmt)


def _read_layout(root: Path, fmt: str, domain: str | None, split: str) -> tuple[list, Path]:
    if fmt == "cellpose":
        root = _cellpose_root(root, split)
    reader = {"cellpose": _read_cellpose, "neurips": _read_neurips, "monuseg": _read_monuseg,
              "generic": _read_generic}[fmt]
    return reader(root, domain or default_domain(root)), root


def _refuse_hidden_labels(root: Path, fmt: str, domain: str | None, split: str) -> None:
    """``--format`` that reads a labelled folder as unlabelled is refused, never silently obeyed."""
    detected = detect_format(root, split)
    if detected == fmt:
        return
    try:
        samples, _ = _read_layout(root, detected, domain, split)
    except InputError:
        return
    found = next((s.label_path for s in samples if s.has_labels), None)
    if found is not None:
        raise InputError(f"{root}: --format {fmt} finds no labels, but the folder holds labels in the {detected} "
                         f"layout (e.g. {found}); pass --format {detected}, or move the labels away to read the "
                         "images unlabelled")


SPLIT_KEY = "dqtool_split"


def write_split(path: str | os.PathLike, root: str | os.PathLike, names: Sequence[str], format: str | None = None,
                split: str = "train") -> Path:
    """Write a split file: the images ``names`` of the dataset folder ``root`` (an absolute path is stored,
    so the file works from any working directory). Every name must be an image of ``root``."""
    root = Path(root).resolve()
    names = [str(n) for n in names]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"{path}: image {dupes[0]!r} named twice in one split")
    known = {s.name for s in open_dataset(root, format=format, split=split)}
    missing = [n for n in names if n not in known]
    if missing:
        raise InputError(f"{root}: no image named {missing[0]!r} (a split names images by their stem)")
    from dqtool.common.files import atomic_write_text

    record = {SPLIT_KEY: 1, "root": str(root), "format": format, "split": split, "names": names}
    return atomic_write_text(path, json.dumps(record, indent=1) + "\n")


def _open_split(path: Path, format: str | None, domain: str | None, split: str, level: int) -> Dataset:
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a dataset folder, and not a readable split file ({exc})") from None
    if not isinstance(record, dict) or SPLIT_KEY not in record:
        raise InputError(f"{path}: a JSON file that is not a dqtool split file (no {SPLIT_KEY!r} key)")
    whole = open_dataset(record["root"], format=format or record.get("format"), domain=domain,
                         split=record.get("split", split), level=level)
    by_name = {s.name: s for s in whole}
    names = list(record.get("names", []))
    missing = [n for n in names if n not in by_name]
    if missing:
        raise InputError(f"{path}: names {missing[0]!r}, which is not an image of {record['root']}")
    if len(set(names)) != len(names):
        raise InputError(f"{path}: an image is named twice")
    if not names:
        raise InputError(f"{path}: the split names no image")
    return Dataset(samples=[by_name[n] for n in names], root=whole.root, format=whole.format)


def check_distinct_sources(sources: Sequence[str | os.PathLike], datasets: Sequence[Dataset]) -> None:
    """Refuse one image read twice: a source folder given twice, or one folder inside another."""
    seen: dict[Path, str] = {}
    for src, ds in zip(sources, datasets):
        for sample in ds:
            key = Path(sample.image_path).resolve()
            if key in seen:
                where = (f"the source folder {src} given twice" if Path(seen[key]).resolve() == Path(src).resolve()
                         else f"from {seen[key]} and from {src}")
                raise InputError(f"{sample.image_path}: the same image read twice ({where}); give each folder once")
            seen[key] = str(src)


def _samples(images: Sequence[Path], labels: LabelFolder | None, domain: str, name=lambda p: p.stem) -> list[Sample]:
    return [Sample(name=name(p), domain=domain, image_path=p, label_path=labels.find(p) if labels else None)
            for p in images]


def _read_cellpose(root: Path, domain: str) -> list[Sample]:
    images = [p for p in input_images(root) if p.stem.endswith(IMAGE_STEM_SUFFIX)]
    return _samples(images, LabelFolder(root), domain, name=lambda p: image_key(p.stem))


def _read_neurips(root: Path, domain: str) -> list[Sample]:
    images = _find_dir(root, ("images",)) or root
    labels = _find_dir(root, ("labels",))
    return _samples(input_images(images), LabelFolder(labels) if labels else None, domain)


def _read_monuseg(root: Path, domain: str) -> list[Sample]:
    images = _find_dir(root, ("Tissue Images", "tissue_images", "images")) or root
    ann = _find_dir(root, ("Annotations", "annotations"))
    xmls: dict[str, Path] = {}
    for p in sorted(ann.iterdir()) if ann else []:
        if p.suffix.lower() == ".xml":
            if p.stem in xmls:
                raise InputError(f"{xmls[p.stem]} and {p}: two annotation files for the image {p.stem!r}; "
                                 "expected one (move or rename the other)")
            xmls[check_name(p).stem] = p
    return [Sample(name=p.stem, domain=domain, image_path=p, label_path=xmls.get(p.stem), label_kind="monuseg-xml")
            for p in input_images(images)]


def _read_generic(root: Path, domain: str) -> list[Sample]:
    images = _find_dir(root, IMAGE_DIRS)
    if images is None:  # a bare folder of images, with or without label files beside them
        return _samples(input_images(root), LabelFolder(root), domain)
    labels = _find_dir(root, LABEL_DIRS)
    return _samples(input_images(images), LabelFolder(labels) if labels else None, domain)


# ----------------------------------------------------------------------------------------------
# MoNuSeg XML


def read_monuseg_polygons(xml_path: str | os.PathLike) -> list[np.ndarray]:
    """Aperio XML -> list of (K, 2) float arrays of (row, col) vertices, one per ``Region``, in file order.

    Vertex ``X`` is the column and ``Y`` the row (REFERENCE.md section 7).
    """
    xml_path = Path(xml_path)
    try:
        tree = ET.parse(xml_path)
    except (ET.ParseError, OSError) as exc:
        raise InputError(f"{xml_path}: cannot parse MoNuSeg XML ({exc})") from exc
    polys = []
    for region in tree.getroot().iter("Region"):
        verts = [(float(v.get("Y")), float(v.get("X"))) for v in region.iter("Vertex")
                 if v.get("X") is not None and v.get("Y") is not None]
        if verts:
            polys.append(np.asarray(verts, dtype=np.float64))
    return polys


def rasterise_monuseg(xml_path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise MoNuSeg polygons into a consecutive uint32 instance map of ``shape``.

    A pixel belongs to a polygon when its centre lies inside it (``skimage.draw.polygon``); polygons
    are clipped to the image. Overlaps: polygons are painted from the largest area to the smallest, so
    the smaller polygon owns the shared pixels; a nucleus annotated inside a bigger one keeps its pixels.
    Every polygon that covers at least one pixel after clipping and is not wholly covered by smaller ones
    becomes one instance. Ids follow the polygons' order in the file (then renumbered consecutively).
    """
    from skimage.draw import polygon as draw_polygon

    polys = read_monuseg_polygons(xml_path)
    rasters = []
    for i, poly in enumerate(polys):
        rr, cc = draw_polygon(poly[:, 0], poly[:, 1], shape=shape)
        if rr.size:
            rasters.append((rr.size, i, rr, cc))
    out = np.zeros(shape, np.uint32)
    for _, i, rr, cc in sorted(rasters, key=lambda t: (-t[0], t[1])):
        out[rr, cc] = i + 1
    return relabel_consecutive(out)
