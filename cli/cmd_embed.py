"""``dqtool embed CACHE.h5``: MAE features of every patch, stored in the cache."""

from __future__ import annotations

import click

from .common import cluster_options, is_quiet, quiet_option, seed_option, user_errors


@click.command("embed")
@click.argument("cache", type=click.Path(exists=True, dir_okay=False))
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="MAE checkpoint with the official names (e.g. mae_pretrain_vit_base.pth). "
                   "Default: a small MAE pretrained on the cache's own patches, saved beside it.")
@click.option("--features", "features_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Your own (N, D) features instead of an encoder: .npy or HDF5 ('features' dataset).")
@click.option("--epochs", type=click.IntRange(1), default=None,
              help="Pretraining epochs of the default MAE  [default: ceil(2000 / N) in 1..15]")
@seed_option("Seed of the default MAE's pretraining.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True,
              help="Patches per forward pass.")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True,
              help="CPU threads for torch (more: faster on an idle machine, last bits may change); with "
                   "--workers/--scheduler, per task.")
@cluster_options
@quiet_option
@user_errors
def embed_cmd(cache, weights, features_file, epochs, seed, batch_size, threads, quiet, cluster):
    """Compute deterministic MAE features (mean over patch tokens, no masking) of every patch in CACHE
    and store them in it; reused while cache and encoder are unchanged."""
    from dqtool.features.embed import embed_cache

    feats = embed_cache(cache, weights=weights, features_file=features_file, epochs=epochs, seed=seed,
                        batch_size=batch_size, quiet=is_quiet(quiet), threads=threads, cluster=cluster)
    source = weights or features_file or "default self-trained MAE"
    click.echo(f"{cache}: features {feats.shape[0]} x {feats.shape[1]} ({source}) stored in group 'features'")
