"""Cellpose on an image too large for memory: tile by tile with overlap, instances stitched across tiles.

The image (an OME-Zarr level, :mod:`dqtool.data.ome_zarr`) is cut into tiles of ``tile`` px that
overlap by ``overlap`` px; each tile is segmented on its own (:func:`dqtool.segmentation.predict.segment`).
Stitching is by ownership, the rule of StarDist's and Cellpose's distributed block-wise prediction: the
overlap between two neighbouring tiles is split at its middle, so every pixel of the image lies in the
*core* of exactly one tile, and a tile keeps those of its instances whose centroid lies in its core,
whole (pixels in the overlap included). A cell narrower than ``overlap / 2`` is seen whole by the tile
that owns it, so it comes out as it would from the whole image; pixels already claimed by a neighbour's
instance stay with it. Ids are consecutive over the image in tile order. The label image is written
region by region into an OME-Zarr array: memory is a few tiles, never the image.

Tiles are segmented independently, so ``predict --workers/--scheduler`` runs one tile a Dask task (the
worker opens the image read-only and reads its region); this process stitches them in tile order and is the
only writer, so the label image is the serial run's, byte for byte.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from dqtool.common.errors import InputError


def tile_cores(length: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(start, stop, core_start, core_stop) of the tiles along one axis; the cores partition [0, length)."""
    if tile <= overlap:
        raise InputError(f"--tile {tile}: expected more than the overlap ({overlap} px)")
    if length <= tile:
        return [(0, length, 0, length)]
    starts = list(range(0, length - tile, tile - overlap)) + [length - tile]
    starts = sorted(set(starts))
    out = []
    for i, s in enumerate(starts):
        lo = 0 if i == 0 else (s + starts[i - 1] + tile) // 2
        hi = length if i == len(starts) - 1 else (starts[i + 1] + s + tile) // 2
        out.append((s, s + tile, lo, hi))
    return out


def owned_instances(masks: np.ndarray, core: tuple[int, int, int, int]) -> np.ndarray:
    """Ids (sorted) of the instances in ``masks`` whose centroid lies in ``core`` = (y0, y1, x0, x1), tile frame."""
    ids = np.unique(masks)
    ids = ids[ids > 0]
    if ids.size == 0:
        return ids
    centroids = np.asarray(ndi.center_of_mass(np.ones_like(masks, np.uint8), masks, ids)).reshape(-1, 2)
    y0, y1, x0, x1 = core
    keep = (centroids[:, 0] >= y0) & (centroids[:, 0] < y1) & (centroids[:, 1] >= x0) & (centroids[:, 1] < x1)
    return ids[keep]


def tile_boxes(shape: tuple[int, int], tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of every tile of an image of ``shape``, in stitching order (rows, then columns)."""
    rows, cols = tile_cores(shape[0], tile, overlap), tile_cores(shape[1], tile, overlap)
    return [(ys, ye, xs, xe) for ys, ye, _, _ in rows for xs, xe, _, _ in cols]


def stitch_masks(tile_masks, out_array, tile: int = 1024, overlap: int = 128, progress=None) -> int:
    """Fill ``out_array`` ((H, W) uint32, zeros) from the masks of each tile of :func:`tile_boxes`, given in
    that order (an iterable: a tile's masks may arrive from a Dask worker); returns how many instances.

    Ids are given in tile order, so the result depends only on the masks, never on where they were computed.
    """
    height, width = out_array.shape
    rows, cols = tile_cores(height, tile, overlap), tile_cores(width, tile, overlap)
    cores = [(ys, ye, xs, xe, cy0, cy1, cx0, cx1) for ys, ye, cy0, cy1 in rows for xs, xe, cx0, cx1 in cols]
    next_id = 1
    seen = 0
    for (ys, ye, xs, xe, cy0, cy1, cx0, cx1), masks in zip(cores, tile_masks):
        seen += 1
        masks = np.asarray(masks)
        if masks.shape != (ye - ys, xe - xs):
            raise ValueError(f"tile {seen}: masks of shape {masks.shape}, expected {(ye - ys, xe - xs)}")
        ids = owned_instances(masks, (cy0 - ys, cy1 - ys, cx0 - xs, cx1 - xs))
        if ids.size:
            lut = np.zeros(int(masks.max()) + 1, np.int64)
            lut[ids] = np.arange(1, ids.size + 1)
            owned = lut[masks]
            region = np.asarray(out_array[ys:ye, xs:xe])
            free = (region == 0) & (owned > 0)
            got = np.unique(owned[free])  # an instance a neighbour fully claimed gets no id
            final = np.zeros(ids.size + 1, np.uint32)
            final[got] = np.arange(next_id, next_id + got.size, dtype=np.uint32)
            region[free] = final[owned[free]]
            out_array[ys:ye, xs:xe] = region
            next_id += got.size
        if progress is not None:
            progress.update(1)
    if seen != len(cores):
        raise ValueError(f"{seen} tiles of masks for {len(cores)} tiles")
    return next_id - 1


def stitch_tiles(segment, read_image, out_array, tile: int = 1024, overlap: int = 128, progress=None) -> int:
    """Fill ``out_array`` ((H, W) uint32, zeros) with the stitched instances; returns how many there are.

    ``segment(region) -> masks`` segments one tile; ``read_image(y0, y1, x0, x1)`` reads one region of
    the input. ``out_array`` is anything with NumPy slicing (a Zarr array, a NumPy array).
    """
    boxes = tile_boxes(out_array.shape, tile, overlap)
    return stitch_masks((segment(read_image(*box)) for box in boxes), out_array, tile, overlap, progress)


def cellpose_lowhigh(image, channels: tuple[int, int]) -> np.ndarray:
    """Cellpose's normalisation bounds (1st and 99th percentile) of the whole image, per network channel.

    Computed on :meth:`~dqtool.data.ome_zarr.OmeZarrImage.overview` (the level itself when it has at most
    2048 x 2048 pixels). Shape (2, 2): the cytoplasm/gray channel and the nucleus channel, [0, 1] for a
    channel Cellpose fills with zeros (so it stays zero, as in whole-image normalisation).
    """
    view = image.overview().astype(np.float32)
    view = view[..., None] if view.ndim == 2 else view
    bounds = []
    for c in channels:
        if c == 0 and channels[0] == 0 and not bounds:
            plane = view.mean(axis=-1) if view.shape[-1] > 1 else view[..., 0]
        elif c == 0:
            bounds.append([0.0, 1.0])
            continue
        else:
            plane = view[..., c - 1]
        lo, hi = np.percentile(plane, [1.0, 99.0])
        bounds.append([float(lo), float(hi) if hi > lo else float(lo) + 1.0])
    return np.asarray(bounds)


def predict_ome_zarr(segment_tiles, image_path: str | os.PathLike, out_dir: str | os.PathLike,
                     channels: tuple[int, int] = (0, 0), level: int = 0, tile: int = 1024, overlap: int = 128
                     ) -> Path:
    """Segment an OME-Zarr image into ``out_dir/<name>_cp_masks.ome.zarr``, an OME-Zarr label image.

    ``segment_tiles(boxes, channels, normalize)`` yields the masks of each tile box ``(y0, y1, x0, x1)`` of
    :func:`tile_boxes`, in that order (``dqtool predict`` runs Cellpose's eval on each, in this process or
    as one Dask task a tile, :func:`dqtool.segmentation.predict.predict`); ``normalize`` is Cellpose's
    ``{"lowhigh": ...}`` from the whole image (:func:`cellpose_lowhigh`), so that every tile is normalised
    as the whole image would be. This process alone writes the output, stitching in tile order.
    Channels: a single-channel image is read as grayscale (channels 0,0); with several channels,
    ``channels`` (Cellpose's 1-based cytoplasm, nucleus pair) must choose them, else the error names the
    file. The output has the level's scale and is renamed into place when whole.
    """
    from dqtool.data.ome_zarr import finish_ome_zarr, open_ome_zarr, write_ome_zarr_labels

    image = open_ome_zarr(image_path, level)
    n_chan = image.channels
    chosen = [c for c in channels if c > 0]
    if n_chan > 1 and not chosen:
        raise InputError(f"{image_path}: image has {n_chan} channels (axes {''.join(image.axes)}); choose them with "
                         "--channels CYTO,NUCLEUS (1-based channel numbers)")
    if any(c > n_chan for c in chosen):
        raise InputError(f"{image_path}: --channels {','.join(map(str, channels))} names a channel beyond its "
                         f"{n_chan}")
    channels = tuple(channels) if n_chan > 1 else (0, 0)
    name = Path(image_path).name.removesuffix(".zarr").removesuffix(".ome")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{name}_cp_masks.ome.zarr"
    scale = [image.scale[image.axes.index(a)] for a in ("y", "x")]
    out_array, tmp = write_ome_zarr_labels(target, image.shape, scale=scale, chunks=min(tile, 1024))
    masks_of = None
    try:
        normalize = {"lowhigh": cellpose_lowhigh(image, channels)}
        masks_of = segment_tiles(tile_boxes(image.shape, tile, overlap), channels, normalize)
        stitch_masks(masks_of, out_array, tile, overlap)
        return finish_ome_zarr(tmp, target)
    finally:
        if masks_of is not None and hasattr(masks_of, "close"):
            masks_of.close()  # ends the Dask tasks still in flight (on an error)
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
