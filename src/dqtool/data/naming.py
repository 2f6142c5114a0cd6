"""Which files are images, which are labels, and which label file belongs to which image: the one rule.

Every reader and command asks here: the dataset layouts (``open_dataset``), ``dqtool eval``,
``dqtool predict`` and ``dqtool rank``. Suffixes are matched without regard to case; keys keep it.

- An **image file** is a file with one of :data:`IMAGE_SUFFIXES` whose name does not start with a dot.
- A **label file** is an image file whose stem ends with one of :data:`LABEL_SUFFIXES`: ``_cp_masks``
  (Cellpose's predictions), ``_masks`` (Cellpose's ground truth), ``_mask``, ``_labels``, ``_label``
  (NeurIPS 2022 CellSeg) or ``_gt``; and the Cellpose GUI's ``<image stem>_seg.npy`` (:data:`SEG_SUFFIX`, a
  pickled dict whose ``masks`` is the instance map; read by ``dqtool.data.io.read_labels``), so a folder the
  GUI annotated is a labelled folder.
- A **Cellpose output** that is neither ends with one of :data:`OUTPUT_SUFFIXES` (the names
  ``cellpose.io.get_image_files`` skips).
- An **input image** is an image file that is neither a label file nor a Cellpose output.

Keys pair them. An image's key is its stem without a trailing ``_img`` (the Cellpose layout's
``NNN_img``); a label's key is its stem without its label suffix and then without ``_img``. So
``001_img.png``, ``001_masks.png``, ``001_img_cp_masks.tif``, ``001_img_seg.npy`` and ``001.tif`` all have the
key ``001``.

:func:`find_label_file` gives the label file of an image in a folder: the label file with the image's
key; in a folder other than the image's own, a plain image file with that key (``labels/x.tif`` for
``images/x.tif``) when no label file has it. Two candidates are refused with both names, never one
picked: the rule cannot know which of ``x_masks.png`` and ``x_label.tif`` is the truth.
"""

from __future__ import annotations

import os
from pathlib import Path

from dqtool.common.errors import InputError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
#: Longest first, so ``x_cp_masks`` loses ``_cp_masks``, not ``_masks``.
LABEL_SUFFIXES = ("_cp_masks", "_labels", "_masks", "_label", "_mask", "_gt")
OUTPUT_SUFFIXES = ("_cp_output", "_cellprob", "_flows_0", "_flows_1", "_flows_2", "_flows", "_seg")
IMAGE_STEM_SUFFIX = "_img"
#: The Cellpose GUI's annotation file, ``<image stem>_seg.npy`` (``cellpose.io.masks_flows_to_seg``).
SEG_SUFFIX = "_seg.npy"
#: Folder names that hold images (never labels) and labels, lower case.
IMAGE_DIRS = ("images", "imgs", "img", "tissue images", "tissue_images")
LABEL_DIRS = ("labels", "masks", "gt", "ground_truth")


def is_image_file(path: str | os.PathLike) -> bool:
    """A tif/tiff/png/jpg/jpeg/bmp file that is not hidden (the extension decides, not the content)."""
    path = Path(path)
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def _label_suffix(stem: str) -> str:
    low = stem.lower()
    return next((s for s in LABEL_SUFFIXES if low.endswith(s) and len(stem) > len(s)), "")


def is_seg_file(path: str | os.PathLike) -> bool:
    """The Cellpose GUI's ``<image stem>_seg.npy`` (not hidden)."""
    name = Path(path).name
    return not name.startswith(".") and name.lower().endswith(SEG_SUFFIX) and len(name) > len(SEG_SUFFIX)


def is_label_file(path: str | os.PathLike) -> bool:
    """A label file: an image file named as a label (``<key>_masks.png``, ``<key>_cp_masks.tif``,
    ``<key>_label.tiff``...) or the Cellpose GUI's ``<image stem>_seg.npy``."""
    return is_seg_file(path) or (is_image_file(path) and bool(_label_suffix(Path(path).stem)))


def is_cellpose_output(path: str | os.PathLike) -> bool:
    """A Cellpose output that is neither an image nor a label (``_flows.tif``, ``_cp_output.png``, ...)."""
    return not is_seg_file(path) and Path(path).stem.lower().endswith(OUTPUT_SUFFIXES)


def is_input_image(path: str | os.PathLike) -> bool:
    """An image file to segment or train on: not a label file, not a Cellpose output."""
    return is_image_file(path) and not is_label_file(path) and not is_cellpose_output(path)


def image_key(stem: str) -> str:
    """'001_img' -> '001'; 'cell_00001' -> 'cell_00001'."""
    if stem.lower().endswith(IMAGE_STEM_SUFFIX) and len(stem) > len(IMAGE_STEM_SUFFIX):
        return stem[: -len(IMAGE_STEM_SUFFIX)]
    return stem


def label_key(stem: str) -> str:
    """'001_img_cp_masks' -> '001'; '001_masks' -> '001'; 'cell_00001_label' -> 'cell_00001'; '001' -> '001';
    '001_img_seg' (the stem of the GUI's ``001_img_seg.npy``) -> '001'."""
    if stem.lower().endswith("_seg") and len(stem) > 4:
        stem = stem[:-4]
    return image_key(stem[: len(stem) - len(_label_suffix(stem))])


def printable(path: str | os.PathLike) -> str:
    """A path as text that can always be printed: bytes that are not UTF-8 shown as ``\\xNN``."""
    return os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")


def check_name(path: str | os.PathLike) -> Path:
    """Refuse a file name that is not valid UTF-8: caches, subsets and tables store names as UTF-8 text."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{printable(path)}: the file name is not valid UTF-8; rename it (dqtool stores file "
                         "names as UTF-8 text)") from None
    return Path(path)


def input_images(folder: str | os.PathLike) -> list[Path]:
    """The input images of a folder (not recursive), sorted by name.

    Two images with one key (``a.tif`` and ``a.png``, or ``001_img.png`` and ``001.tif``) are refused:
    both would pair with the same label file and write the same output name.
    """
    files = sorted(check_name(p) for p in Path(folder).iterdir() if p.is_file() and is_input_image(p))
    seen: dict[str, Path] = {}
    for p in files:
        key = image_key(p.stem)
        if key in seen:
            raise InputError(f"{seen[key]} and {p}: two images with the key {key!r} in one folder; expected one "
                             "(both would pair with one label file and one output name): rename or move one")
        seen[key] = p
    return files


def list_input_images(images: str | os.PathLike) -> list[Path]:
    """One image file (taken as named), or the input images of a folder; ``dqtool predict`` and ``rank``."""
    root = Path(images)
    if not root.exists():
        raise FileNotFoundError(f"{images}: no such file or folder")
    if root.is_file():
        if not is_image_file(root):
            raise InputError(f"{images}: not an image file (expected {'/'.join(IMAGE_SUFFIXES)})")
        return [root]
    files = input_images(root)
    if not files:
        raise InputError(f"{images}: no images found (expected {'/'.join(IMAGE_SUFFIXES)} files; label files "
                         "and Cellpose outputs such as *_masks, *_cp_masks, *_flows are skipped)")
    return files


class LabelFolder:
    """The label files of one folder, indexed by key (the folder is listed once)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._labels: dict[str, list[Path]] = {}
        self._plain: dict[str, list[Path]] = {}
        for p in sorted(self.folder.iterdir()):
            if not p.is_file():
                continue
            if is_label_file(p) or is_image_file(p):
                check_name(p)
            if is_label_file(p):
                self._labels.setdefault(label_key(p.stem), []).append(p)
            elif is_image_file(p) and not is_cellpose_output(p):
                self._plain.setdefault(image_key(p.stem), []).append(p)

    def find(self, image: str | os.PathLike) -> Path | None:
        """The label file of ``image`` in this folder, or None (see the module docstring)."""
        image = Path(image)
        key = image_key(image.stem)
        found = self._labels.get(key, [])
        if not found and image.parent.resolve() != self.folder.resolve():
            found = [p for p in self._plain.get(key, []) if p.resolve() != image.resolve()]
        if len(found) > 1:
            raise InputError(f"{' and '.join(str(p) for p in found)}: {len(found)} label files for the image "
                             f"{image.name} (key {key!r}); expected one (move or rename the others)")
        return found[0] if found else None


def find_label_file(image: str | os.PathLike, folder: str | os.PathLike) -> Path | None:
    """The label file of ``image`` in ``folder``, or None; two candidates are an InputError naming both."""
    return LabelFolder(folder).find(image)
