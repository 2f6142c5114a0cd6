"""``dqtool predict MODEL IMAGES``: Cellpose instance masks of images (library: dqtool.segmentation.predict)."""

from __future__ import annotations

import click

from .common import channels_option, cluster_options, is_quiet, quiet_option, user_errors


@click.command("predict")
@click.argument("model", type=click.Path())
@click.argument("images", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for <name>_cp_masks.tif (.ome.zarr for OME-Zarr images).")
@channels_option
@click.option("--diameter", type=float, default=None, help="Cell diameter in px (default: the model's).")
@click.option("--flow-threshold", type=float, default=0.4, show_default=True)
@click.option("--cellprob-threshold", type=float, default=0.0, show_default=True)
@click.option("--level", type=click.IntRange(0), default=0, show_default=True,
              help="OME-Zarr images: the resolution level to segment (0 = full resolution).")
@click.option("--tile", type=click.IntRange(64), default=1024, show_default=True,
              help="OME-Zarr images: tile size (px); tiles overlap by --tile-overlap and are stitched.")
@click.option("--tile-overlap", type=click.IntRange(0), default=128, show_default=True,
              help="OME-Zarr images: overlap of neighbouring tiles (px), at least twice the largest cell diameter.")
@cluster_options
@quiet_option
@user_errors
def predict_cmd(model, images, out, channels, diameter, flow_threshold, cellprob_threshold, level, tile,
                tile_overlap, quiet, cluster):
    """Segment IMAGES (a file or a folder) with a Cellpose MODEL file."""
    from dqtool.segmentation.predict import PredictOptions, predict

    options = PredictOptions(channels=channels, diameter=diameter, flow_threshold=flow_threshold,
                             cellprob_threshold=cellprob_threshold)
    written = predict(model, images, out, options, quiet=is_quiet(quiet), level=level, tile=tile,
                      overlap=tile_overlap, cluster=cluster)
    if not is_quiet(quiet):
        click.echo(f"{len(written)} masks written to {out}")
