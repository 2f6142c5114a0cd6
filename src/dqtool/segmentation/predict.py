"""Cellpose inference with a model file: ``<name>_cp_masks.tif`` per image (Cellpose's own naming).

The model path is checked before Cellpose sees it (a missing path would make Cellpose download cyto3)
and passed as ``str``; builtin model names are refused. The network runs on the CPU unless a CUDA
device is present. Masks are consecutive ``uint32`` ids, 0 = background.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from dqtool.common.errors import InputError
from dqtool.common.notices import known_notices_hidden
from dqtool.common.outputs import writes_folder
from dqtool.common.progress import progress
from dqtool.data.io import read_image, relabel_consecutive, write_labels
from dqtool.data.naming import list_input_images


@dataclass(frozen=True)
class PredictOptions:
    """Cellpose ``eval`` settings (its defaults). ``diameter`` None uses the model's training diameter."""

    channels: tuple[int, int] = (0, 0)
    diameter: float | None = None
    flow_threshold: float = 0.4
    cellprob_threshold: float = 0.0
    batch_size: int = 8

    def __post_init__(self):
        import math

        if self.diameter is not None and not (math.isfinite(self.diameter) and self.diameter > 0):
            raise InputError(f"--diameter {self.diameter}: expected a cell diameter in pixels > 0 (or none for the "
                             "model's own)")
        for name in ("flow_threshold", "cellprob_threshold"):
            if not math.isfinite(getattr(self, name)):
                raise InputError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected a finite number")
        if self.batch_size < 1:
            raise InputError(f"batch size {self.batch_size}: expected >= 1")


def load_model(model: str | os.PathLike):
    """A ``CellposeModel`` from a checked Cellpose 3 model file (never a download).

    A built-in model's file in Cellpose's model folder (``cyto3``, ``nucleitorch_0``, ...) is loaded as
    Cellpose loads it, with its fixed diameter and size model (:func:`~dqtool.segmentation.model_files.
    load_cellpose_model`).
    """
    from dqtool.segmentation.model_files import load_cellpose_model

    return load_cellpose_model(model)


def segment(model, image: np.ndarray, options: PredictOptions = PredictOptions(), normalize=True) -> np.ndarray:
    """Instance masks of one image ((H, W) or (H, W, 3)) with a loaded ``CellposeModel``.

    ``normalize``: Cellpose's ``normalize`` argument (a tile of a large image passes the whole image's
    ``{"lowhigh": ...}``, so that every tile is normalised alike).
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2 and list(options.channels) != [0, 0]:
        raise InputError(f"channels {list(options.channels)}: the image is grayscale; use channels 0,0")
    with known_notices_hidden():  # torch's sparse-invariant notice from Cellpose's mask dynamics
        masks = model.eval(image, channels=list(options.channels), channel_axis=2 if image.ndim == 3 else None,
                           diameter=options.diameter, flow_threshold=options.flow_threshold,
                           cellprob_threshold=options.cellprob_threshold, batch_size=options.batch_size,
                           normalize=normalize)[0]
    return relabel_consecutive(np.asarray(masks))


def mask_name(image_path: str | os.PathLike) -> str:
    """``<name>_cp_masks.tif`` for an image ``<name>.<ext>`` (a Cellpose-layout ``NNN_img`` keeps its stem)."""
    return f"{Path(image_path).stem}_cp_masks.tif"


def predict_arrays(model, images: Iterable[np.ndarray], options: PredictOptions = PredictOptions(),
                   total: int | None = None, quiet: bool = True, desc: str = "predict") -> Iterable[np.ndarray]:
    """Masks of each image in ``images`` (lazy)."""
    for image in progress(images, total=total, desc=desc, quiet=quiet, unit="img"):
        yield segment(model, image, options)


@writes_folder("predict", out="out_dir", inputs=("model", "images"))  # refused, marked, locked
def predict(model: str | os.PathLike, images: str | os.PathLike, out_dir: str | os.PathLike,
            options: PredictOptions = PredictOptions(), quiet: bool = False, level: int = 0,
            tile: int = 1024, overlap: int = 128, cluster=None) -> list[Path]:
    """``dqtool predict``: segment every image and write ``out_dir/<name>_cp_masks.tif``; returns the paths.

    OME-Zarr images (``images`` is one, or a folder of ``*.zarr``) are read at ``level`` and segmented tile
    by tile into ``out_dir/<name>_cp_masks.ome.zarr`` (:mod:`dqtool.segmentation.tiled`). ``out_dir`` is one
    of dqtool's output folders (:func:`dqtool.common.outputs.writing_folder`: never the images' folder or a
    lab's non-empty folder; one writer at a time).
    """
    from dqtool.data.ome_zarr import find_ome_zarr_images

    if zarr_images := find_ome_zarr_images(images):
        return _predict_ome_zarr_images(model, zarr_images, out_dir, options, quiet, level, tile, overlap, cluster)
    files = list_input_images(images)
    if cluster is not None and cluster.active:  # one image a Dask task; this process writes every mask
        import functools

        from dqtool.common.cluster import iter_tasks
        from dqtool.segmentation.model_files import load_state_dict

        load_state_dict(model)  # a bad model file is one error here, not one per task
        # absolute paths: a worker on another machine does not share this process's working directory
        masks_of = iter_tasks(functools.partial(predict_file, model=str(Path(model).absolute()), options=options),
                              [Path(f).absolute() for f in files], cluster, kind="predict", desc="predict",
                              quiet=quiet, unit="img")
    else:
        net = load_model(model)
        masks_of = predict_arrays(net, (read_image(f) for f in files), options, total=len(files), quiet=quiet)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        for path, masks in zip(files, masks_of):
            target = out_dir / mask_name(path)
            write_labels(target, masks)
            written.append(target)
    finally:
        masks_of.close()  # ends the Dask tasks still in flight (on an error) and the cluster
    return written


def _predict_ome_zarr_images(model, zarr_images, out_dir, options, quiet, level, tile, overlap, cluster):
    """Each OME-Zarr image tile by tile (:func:`dqtool.segmentation.tiled.predict_ome_zarr`); with a cluster,
    one tile a Dask task (the worker reads its region from the image and segments it), and this process
    stitches the tiles in order and writes the labels: the serial run's bytes."""
    import dataclasses
    import functools

    from dqtool.common.cluster import connect, iter_tasks
    from dqtool.segmentation.tiled import predict_ome_zarr

    model = str(Path(model).absolute())
    if cluster is not None and cluster.active:
        from dqtool.segmentation.model_files import load_state_dict

        load_state_dict(model)  # a bad model file is one error here, not one per task
    else:
        worker_net(model)  # the same check; the tiles then reuse the loaded network
    written = []
    try:
        with connect(cluster, quiet) as bound:
            for path in zarr_images:
                def segment_tiles(boxes, channels, normalize, path=Path(path).absolute()):
                    task = functools.partial(predict_tile, image=str(path), level=level, model=model,
                                             options=dataclasses.replace(options, channels=channels),
                                             normalize=normalize)
                    return iter_tasks(task, boxes, bound, kind="predict-tile", desc="tiles", quiet=quiet,
                                      unit="tile")

                written.append(predict_ome_zarr(segment_tiles, path, out_dir, options.channels, level=level,
                                                tile=tile, overlap=overlap))
    finally:
        release_worker_net()  # the serial run's network is not kept in the caller's process afterwards
    return written


_WORKER_NET: dict = {}  # in a Dask worker (or this process): the last model loaded, by path and content


def worker_net(model: str | os.PathLike, identity=None):
    """The network of the model file ``model``, loaded once per process (a Dask worker, or this one) and kept
    until another model is asked for. ``identity`` names the file's content (its sha256, say); by default its
    (size, mtime), so a file replaced in place is loaded again."""
    path = Path(model).resolve()
    if identity is None:
        stat = path.stat()
        identity = (stat.st_size, stat.st_mtime_ns)
    key = (str(path), identity)
    net = _WORKER_NET.get(key)
    if net is None:
        _WORKER_NET.clear()
        net = _WORKER_NET[key] = load_model(str(model))
    return net


def release_worker_net() -> None:
    """Forget the network :func:`worker_net` keeps (this process no longer holds it)."""
    _WORKER_NET.clear()


def predict_file(path: str | os.PathLike, model: str, options: PredictOptions = PredictOptions()) -> np.ndarray:
    """Masks of the image file ``path`` (a Dask task of ``predict --workers``; the worker reads the image and
    loads the model once, the client writes the masks): what the serial loop computes for it."""
    return segment(worker_net(model), read_image(path), options)


def predict_tile(box: tuple[int, int, int, int], image: str, level: int, model: str, options: PredictOptions,
                 normalize) -> np.ndarray:
    """Masks of the region ``box`` = (y0, y1, x0, x1) of the OME-Zarr ``image`` at ``level``, normalised with
    the whole image's bounds ``normalize`` (one tile of ``predict`` on an OME-Zarr image: a Dask task, or the
    serial loop's step; the image is opened read-only, the client stitches and writes)."""
    from dqtool.data.ome_zarr import open_ome_zarr

    return segment(worker_net(model), open_ome_zarr(image, level).read(*box), options, normalize=normalize)
