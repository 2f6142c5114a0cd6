"""Reading images and instance label maps from the files microscopy labs have.

Images: tif/tiff (tifffile, LZW via imagecodecs), png/jpg/jpeg/bmp (Pillow); 8 or 16 bit; grayscale,
RGB or RGBA (alpha is dropped). Labels: 2-D integer instance maps, 0 = background, returned as
consecutive ``uint32`` ids 1..n (order of first appearance is not kept; ids are renumbered in
ascending order of the original id). Which files are images and labels: :mod:`dqtool.data.naming`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dqtool.common.errors import InputError
from dqtool.common.files import atomic_write
from dqtool.data.naming import is_seg_file


#: TIFF axes (tifffile's series axes) that hold planes of a stack, not colour channels.
_STACK_AXES = {"Z": "Z planes", "T": "time points", "I": "pages", "R": "tiles", "E": "lambda planes",
               "H": "lifetime bins", "O": "positions", "V": "views", "A": "angles", "P": "phases"}


def _read_tiff(path: Path) -> tuple[np.ndarray, str, bool]:
    """(array, tifffile series axes, whether a 4th sample is named as alpha by the file's tags)."""
    import logging

    import tifffile

    # tifffile logs what it finds wrong with a file on stderr; the failure it leads to is our one line
    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL + 1)
    try:
        with tifffile.TiffFile(str(path)) as tif:
            series = tif.series[0]
            page = tif.pages[0]
            if getattr(page, "bitspersample", 8) == 1 and getattr(page, "samplesperpixel", 1) > 1:
                # tifffile 2026.3.3 reads these back scrambled (found by tests/data/test_reader_properties.py)
                raise InputError(f"{path}: {page.samplesperpixel} samples of 1 bit per pixel; dqtool cannot read "
                                 "1-bit colour reliably: save the image as 8-bit")
            alpha = any(int(e) in (1, 2) for e in (getattr(page, "extrasamples", ()) or ()))
            return series.asarray(), series.axes, alpha
    finally:
        log.setLevel(level)


def _read_pil(path: Path) -> tuple[np.ndarray, str, bool]:
    from PIL import Image

    with Image.open(path) as im:
        mode = im.mode
        if mode in ("I;16", "I;16B", "I;16L"):
            return np.array(im, dtype=np.uint16), "YX", False
        if mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            return np.array(im), "YXS", im.mode == "RGBA"
        if mode in ("LA", "La", "PA"):
            arr = np.array(im.convert("RGBA" if mode == "PA" else "LA"))
            return (arr, "YXS", True) if mode == "PA" else (arr[..., 0], "YX", False)
        if mode not in ("1", "L", "I", "F", "RGB", "RGBA", "RGBa"):
            raise InputError(f"{path}: pixel mode {mode} (e.g. CMYK or YCbCr) has no one reading as gray, RGB "
                             "or RGBA here; save the image as grayscale or RGB")
        return np.array(im), ("YXS" if mode.startswith("RGB") else "YX"), mode in ("RGBA", "RGBa")


def _read_raw(path: Path, with_axes: bool = False):
    """The file's pixels (and, with ``with_axes``, its axes letters and whether it names an alpha channel).

    Every failure to decode a file that exists (truncated, corrupt, not an image) is one InputError.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            arr, axes, alpha = _read_tiff(path)
        else:
            arr, axes, alpha = _read_pil(path)
    except InputError:
        raise
    except MemoryError as exc:
        raise InputError(f"{path}: cannot read image (it asks for more memory than there is: {exc})") from exc
    except Exception as exc:  # Pillow, tifffile and imagecodecs raise many types for corrupt files
        raise InputError(f"{path}: cannot read image ({type(exc).__name__}: {_one_line(exc)})") from exc
    arr = np.asarray(arr)
    if arr.size == 0:
        raise InputError(f"{path}: image is empty (shape {arr.shape})")
    if len(axes) != arr.ndim:  # tifffile names every axis; be safe with odd files
        axes = "Q" * (arr.ndim - 2) + "YX"
    return (arr, axes, alpha) if with_axes else arr


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def check_image_array(arr: np.ndarray, name: str = "image") -> np.ndarray:
    """Refuse pixel values the pipeline would silently turn into something else: NaN or inf."""
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            where = tuple(int(v) for v in np.argwhere(bad)[0])
            raise InputError(f"{name}: {int(bad.sum())} NaN or inf pixel values (first at {where}, "
                             f"{arr[where]}); expected finite intensities")
    return arr


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as (H, W) or (H, W, 3) in its native dtype.

    What a file's channels mean must be certain, else it is refused (an InputError naming the file):

    - 1 channel: grayscale. 3: RGB. 2: Cellpose's two-channel convention (channel 1 and 2 become R and G,
      B is zero). 4: only when the file names the 4th as alpha (PNG RGBA, TIFF ExtraSamples = alpha),
      which is dropped; any other 4-channel file is refused (it cannot be told which 3 are colour).
    - Channel-first arrays (a TIFF ``CYX``/``SYX``, or a plain (C, H, W) stack of 2-4) are moved to last.
    - TIFF stacks (Z planes, time points, untagged multi-page files) are refused: one 2-D plane per file.
    - Float pixels must be finite (NaN or inf would become a blank patch that keeps its labels).
    """
    path = Path(path)
    arr, axes, alpha = _read_raw(path, with_axes=True)
    keep = [i for i, n in enumerate(arr.shape) if n != 1]
    if len(keep) < 2:
        raise InputError(f"{path}: expected a 2-D image, got shape {arr.shape}")
    arr = arr.reshape([arr.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if arr.ndim > 3:
        raise InputError(f"{path}: expected a 2-D image (grayscale, RGB or RGBA), got shape {arr.shape} "
                         f"(axes {axes})")
    if arr.ndim == 3:
        if "S" in axes:
            channel = axes.index("S")
        elif axes[0] in _STACK_AXES or axes[-1] in _STACK_AXES:
            letter = axes[0] if axes[0] in _STACK_AXES else axes[-1]
            raise InputError(f"{path}: a stack of {arr.shape[axes.index(letter)]} {_STACK_AXES[letter]} "
                             f"(axes {axes}, shape {arr.shape}); dqtool reads one 2-D plane per file")
        elif arr.shape[0] in (2, 3, 4) and arr.shape[-1] > 4:
            channel = 0
        elif arr.shape[-1] in (2, 3, 4):
            channel = 2
        else:
            raise InputError(f"{path}: shape {arr.shape} (axes {axes}) has no axis that is certainly colour "
                             "channels; expected (H, W), (H, W, 2-4) or (2-4, H, W)")
        arr = np.moveaxis(arr, channel, -1)
        n = arr.shape[-1]
        if n == 4:
            if not alpha:
                raise InputError(f"{path}: 4 channels that the file does not name as RGBA (no alpha tag; axes "
                                 f"{axes}); dqtool cannot tell which 3 are colour: save it as RGB or grayscale")
            arr = arr[..., :3]
        elif n == 2:
            arr = np.concatenate([arr, np.zeros_like(arr[..., :1])], axis=-1)
        elif n != 3:
            raise InputError(f"{path}: {n} channels (shape {arr.shape}); expected grayscale, 2 channels, RGB "
                             "or RGBA")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"{path}: unsupported pixel type {arr.dtype}")
    check_image_array(arr, str(path))
    return np.ascontiguousarray(arr)


def check_label_array(arr: np.ndarray, name: str = "labels", negative_ids: bool = True) -> np.ndarray:
    """Validate an instance label map: 2-D, integer (or bool), non-negative. Returns it as (H, W).

    A trailing channel axis of 1 is dropped; bool becomes uint32. ``negative_ids=False`` skips the
    search for negative ids (a pass over the pixels) for callers whose kernels find them anyway.
    """
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise InputError(f"{name}: expected a 2-D instance label map, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.uint32)
    if np.issubdtype(arr.dtype, np.floating):
        raise InputError(
            f"{name}: labels are floating point ({arr.dtype}); expected an integer instance map "
            "(0 = background, one id per object)")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{name}: unsupported label type {arr.dtype}; expected integers")
    if negative_ids and np.issubdtype(arr.dtype, np.signedinteger) and arr.size and arr.min() < 0:
        raise InputError(f"{name}: labels contain negative ids (min {int(arr.min())}); expected ids >= 0")
    return arr


def relabel_consecutive(labels: np.ndarray) -> np.ndarray:
    """Renumber an instance map to consecutive uint32 ids 1..n in ascending order of the old id.

    The library's one renumbering (readers, patches, caches, predictions). Works on a copy: the input
    is never changed (Cellpose renumbers in place; we don't).
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        return labels.astype(np.uint32)
    flat = labels.ravel()
    ids = np.unique(flat)
    ids = ids[ids != 0]
    if ids.size == 0:
        return np.zeros(labels.shape, np.uint32)
    if ids[-1] == ids.size:  # already 1..n
        return labels.astype(np.uint32, copy=True)
    lut_size = int(ids[-1]) + 1
    if lut_size <= 4 * flat.size + 1024:
        lut = np.zeros(lut_size, np.uint32)
        lut[ids] = np.arange(1, ids.size + 1, dtype=np.uint32)
        return lut[labels]
    out = np.searchsorted(ids, flat).astype(np.uint32) + 1
    out[flat == 0] = 0
    return out.reshape(labels.shape)


def read_seg_masks(path: str | os.PathLike) -> np.ndarray:
    """The ``masks`` instance map of a Cellpose GUI ``<name>_seg.npy`` file, unchanged.

    The file is a pickled dict (``cellpose.io.masks_flows_to_seg``), so it is loaded with
    ``allow_pickle=True``: open only ``_seg.npy`` files you trust, as the Cellpose GUI does.
    Anything else (not a dict, no ``masks``, masks not a 2-D integer map) is an InputError.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        obj = np.load(path, allow_pickle=True)
    except Exception as exc:  # numpy / pickle raise many types for a file that is not .npy
        raise InputError(f"{path}: cannot read the Cellpose _seg.npy file ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.ndim == 0:
        obj = obj.item()
    if not isinstance(obj, dict) or "masks" not in obj:
        what = f"a dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict) else (
            f"an array of shape {obj.shape} and dtype {obj.dtype}" if isinstance(obj, np.ndarray) else type(obj).__name__)
        raise InputError(f"{path}: not a Cellpose GUI _seg.npy file: got {what}; expected a pickled dict whose "
                         "'masks' is a 2-D integer instance map")
    masks = np.asarray(obj["masks"])
    if masks.ndim != 2 or not (np.issubdtype(masks.dtype, np.integer) or masks.dtype == bool):
        raise InputError(f"{path}: 'masks' has shape {masks.shape} and dtype {masks.dtype}; expected a 2-D integer "
                         "instance map (0 = background)")
    return masks


def write_seg_file(path: str | os.PathLike, masks: np.ndarray, image_name: str, diameter: float = 30.0) -> Path:
    """Write ``masks`` as a Cellpose GUI ``<name>_seg.npy`` for an annotator to open and correct.

    The dict layout of ``cellpose.io.masks_flows_to_seg`` (``masks``, ``outlines``, ``chan_choose``, ``ismanual``,
    ``filename``, ``diameter``) without ``flows``, which the GUI treats as optional; ``image_name`` is the
    image beside the file (the GUI looks for it there). Written through a temp file and a rename.
    """
    from cellpose.utils import masks_to_outlines

    masks = relabel_consecutive(check_label_array(masks, name=str(path)))
    dtype = np.uint16 if masks.max(initial=0) < 2**16 - 1 else np.uint32
    outlines = masks * masks_to_outlines(masks)
    dat = {"outlines": outlines.astype(dtype), "masks": masks.astype(dtype), "chan_choose": [0, 0],
           "ismanual": np.zeros(int(masks.max(initial=0)), bool), "filename": str(image_name),
           "diameter": float(diameter)}
    with atomic_write(path, ".npy") as tmp:
        np.save(tmp, dat, allow_pickle=True)
    return Path(path)


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Read an instance label map as consecutive uint32 ids (0 = background).

    A label image (tif/png/...) or the Cellpose GUI's ``<name>_seg.npy`` (its ``masks``).
    """
    path = Path(path)
    if is_seg_file(path):
        return check_instance_map(relabel_consecutive(check_label_array(read_seg_masks(path), name=str(path))),
                                  str(path))
    arr = _read_raw(path)
    arr = check_label_array(np.squeeze(arr) if arr.ndim > 2 else arr, name=str(path))
    return check_instance_map(relabel_consecutive(arr), str(path))


def check_instance_map(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    """Refuse a binary (semantic) mask given as an instance map; returns ``labels`` unchanged.

    A map whose only non-zero id covers two or more separate regions (8-connected) is a mask of
    "cell" pixels, not one id per cell. It is refused, not split into connected components: touching
    cells would merge into one component without a word, and training on merged cells teaches Cellpose
    to merge them. A map with one region (one cell) or with two or more ids is an instance map.
    """
    if labels.size == 0 or labels.max() != 1:
        return labels
    from scipy import ndimage

    _, n = ndimage.label(labels != 0, structure=np.ones((3, 3), bool))
    if n > 1:
        raise InputError(f"{name}: a binary mask (one id, {n} separate regions), not an instance map; expected one "
                         "id per object (if no objects touch, number them, e.g. skimage.measure.label)")
    return labels


def write_labels(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Write a label map as a compressed TIFF (uint16 when it fits, else uint32), via temp + rename."""
    import tifffile

    labels = np.asarray(labels)
    dtype = np.uint16 if labels.size == 0 or labels.max() < 65536 else np.uint32
    with atomic_write(path, ".tif") as tmp:
        tifffile.imwrite(str(tmp), labels.astype(dtype), compression="zlib")


def write_image_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a uint8/uint16 image as PNG via temp + rename."""
    from PIL import Image

    with atomic_write(path, ".png") as tmp:  # the suffix tells Pillow the format
        Image.fromarray(np.ascontiguousarray(image)).save(tmp)


def to_gray(image: np.ndarray) -> np.ndarray:
    """Mean over colour channels as float32 (Cellpose's grayscale convention for channels [0, 0])."""
    image = np.asarray(image)
    if image.ndim == 3:
        return image.astype(np.float32).mean(axis=-1)
    return image.astype(np.float32)


def normalise_percentile(image: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Map the ``low``-th percentile to 0 and the ``high``-th to 1, per channel, clipped to [0, 1].

    A flat channel (high == low) maps to 0. Output float32.
    """
    img = np.asarray(image, dtype=np.float32)
    chans = img[..., None] if img.ndim == 2 else img
    out = np.empty_like(chans)
    for c in range(chans.shape[-1]):
        lo, hi = np.percentile(chans[..., c], [low, high])
        if hi > lo:
            out[..., c] = np.clip((chans[..., c] - lo) / (hi - lo), 0.0, 1.0)
        else:
            out[..., c] = 0.0
    return out[..., 0] if img.ndim == 2 else out
