"""Data commands: ``dqtool data`` (embedded default), ``dqtool patches`` (build a cache), ``dqtool info``.

The cache's option values (channel modes, normalisations, compressions) are read from
``dqtool.data.cache`` on first use, so ``dqtool data`` never imports h5py.
"""

from __future__ import annotations

import json

import click

from dqtool.data.datasets import FORMATS
from dqtool.data.patches import EDGE_MODES

from .common import LazyChoice, LibraryConstant, cluster_options, is_quiet, quiet_option, seed_option, user_errors


@click.command("data")
@click.argument("out_dir", type=click.Path(file_okay=False), default="data/default")
@seed_option("Seed of the generator.")
@click.option("--n-train", type=click.IntRange(1), default=12, show_default=True, help="Train images per domain.")
@click.option("--n-test", type=click.IntRange(1), default=6, show_default=True, help="Test images per domain.")
@click.option("--force", is_flag=True,
              help="Regenerate even when the folder's MANIFEST matches (a folder holding other files is refused).")
@quiet_option
@user_errors
def data_cmd(out_dir, seed, n_train, n_test, force, quiet):
    """Write the embedded default domains (fluo, histo, multi; train/test) to OUT_DIR."""
    from dqtool.data.synthetic import DOMAINS, generate

    out = generate(out_dir, seed=seed, n_train=n_train, n_test=n_test, force=force, quiet=is_quiet(quiet))
    click.echo(f"{out}: domains {', '.join(DOMAINS)} ({n_train} train + {n_test} test images each, seed {seed})")


@click.command("patches")
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Cache file (.h5) to write.")
@click.option("--domain", "domains", multiple=True, help="Domain name: once for all SRC, or once per SRC.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None, help="Layout (default: detected).")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True,
              help="Split folder to read in Cellpose-layout roots that have train/ and test/.")
@click.option("--size", type=click.IntRange(8), default=224, show_default=True, help="Patch size (px).")
@click.option("--stride", type=click.IntRange(1), default=112, show_default=True, help="Window stride (px).")
@click.option("--edge", type=click.Choice(EDGE_MODES), default="shift", show_default=True,
              help="shift: add edge-aligned windows; pad: zero-pad; drop: the paper's code (drops the strips).")
@click.option("--channels", type=LazyChoice("dqtool.data.cache:CHANNEL_MODES"), default="gray", show_default=True,
              help="gray: mean over colour channels (Cellpose channels [0,0]); rgb: keep 3 channels.")
@click.option("--norm", "normalisation", type=LazyChoice("dqtool.data.cache:NORMALISATIONS"), default="percentile",
              show_default=True, help="Per-image intensity normalisation to uint8.")
@click.option("--compression", type=LazyChoice("dqtool.data.cache:COMPRESSIONS"),
              default=LibraryConstant("dqtool.data.cache:DEFAULT_COMPRESSION"), show_default=True)
@click.option("--force", is_flag=True,
              help="Rebuild even when the cache matches, or when the rebuild drops its features, bins or subsets "
                   "(only a cache dqtool wrote is ever replaced).")
@click.option("--level", type=click.IntRange(0), default=0, show_default=True,
              help="OME-Zarr sources: the resolution level to cut (0 = full resolution).")
@cluster_options
@quiet_option
@user_errors
def patches_cmd(sources, out, domains, fmt, split, size, stride, edge, channels, normalisation, compression,
                force, quiet, level, cluster):
    """Cut sliding-window patches from image folders SRC... into an HDF5 cache."""
    from dqtool.data.cache_build import PatchOptions, build_cache_from_folders

    options = PatchOptions(size=size, stride=stride, edge=edge, channels=channels, normalisation=normalisation,
                           compression=compression)
    report = build_cache_from_folders(sources, out, domains=domains, format=fmt, split=split, options=options,
                                      force=force, quiet=is_quiet(quiet), level=level, cluster=cluster)
    per = ", ".join(f"{d}: {n}" for d, n in report.per_domain.items())
    why = f" ({report.reason})" if report.reason and report.action != "built" else ""
    click.echo(f"{report.path}: {report.action}{why}; {report.n_patches} patches [{per}]")


@click.command("info")
@click.argument("cache", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--sources/--no-sources", default=False, help="List patches per source image.")
@user_errors
def info_cmd(cache, as_json, sources):
    """Summarise a patch cache: patches per domain and source, shapes, dtypes, options."""
    from dqtool.data.cache import PatchCache

    with PatchCache(cache) as c:
        summary = c.summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{summary['path']}  (dqtool {summary['dqtool_version']}, hash {summary['content_hash']})")
    click.echo(f"  patches: {summary['n_patches']} from {summary['n_sources']} images, "
               f"labels: {'yes' if summary['has_labels'] else 'no'}")
    opts = summary["options"]
    click.echo("  options: " + ", ".join(f"{k}={v}" for k, v in opts.items()))
    for name, d in summary["datasets"].items():
        click.echo(f"  /{name}: {tuple(d['shape'])} {d['dtype']}, chunks {tuple(d['chunks'])}, {d['compression']}")
    click.echo("  per domain: " + ", ".join(f"{k}: {v}" for k, v in summary["patches_per_domain"].items()))
    if sources:
        for k, v in summary["patches_per_source"].items():
            click.echo(f"    {k}: {v}")
    if summary["derived"]:
        click.echo("  derived: " + ", ".join(summary["derived"]))
