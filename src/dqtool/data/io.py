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


def _read_raw(path: Path) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(str(path))
        else:
            from PIL import Image

            with Image.open(path) as im:
                if im.mode in ("I;16", "I;16B", "I;16L"):
                    arr = np.array(im, dtype=np.uint16)
                elif im.mode == "P":
                    arr = np.array(im.convert("RGBA" if "transparency" in im.info else "RGB"))
                else:
                    arr = np.array(im)
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:  # tifffile raises its own error types for corrupt files
        raise InputError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    arr = np.asarray(arr)
    if arr.size == 0:
        raise InputError(f"{path}: image is empty (shape {arr.shape})")
    return arr


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as (H, W) or (H, W, 3) in its native dtype; RGBA loses its alpha channel.

    Channel-first TIFFs with 2-4 channels, (C, H, W), are moved to channel-last.
    """
    path = Path(path)
    arr = _read_raw(path)
    arr = np.squeeze(arr)
    if arr.ndim == 3 and arr.shape[0] in (2, 3, 4) and arr.shape[-1] > 4:
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3:
        if arr.shape[-1] == 4:
            arr = arr[..., :3]
        elif arr.shape[-1] == 2:
            arr = np.concatenate([arr, np.zeros_like(arr[..., :1])], axis=-1)
        elif arr.shape[-1] != 3:
            raise InputError(f"{path}: expected a 2-D image or (H, W, 1-4) channels, got shape {arr.shape}")
    elif arr.ndim != 2:
        raise InputError(f"{path}: expected a 2-D image (grayscale, RGB or RGBA), got shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"{path}: unsupported pixel type {arr.dtype}")
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


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Read an instance label map as consecutive uint32 ids (0 = background)."""
    path = Path(path)
    arr = _read_raw(path)
    arr = check_label_array(np.squeeze(arr) if arr.ndim > 2 else arr, name=str(path))
    return relabel_consecutive(arr)


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
