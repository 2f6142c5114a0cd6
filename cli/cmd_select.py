"""Selection commands: ``dqtool select`` (dataset quantization subsets) and ``dqtool export`` (Cellpose files)."""

from __future__ import annotations

import click

from .common import LazyChoice, cluster_options, is_quiet, quiet_option, seed_option, user_errors


def _rates(ctx, param, value: str) -> list[float]:
    """The comma list as numbers; their range is the library's check (``quantize.check_rate``)."""
    rates = []
    for part in str(value).split(","):
        try:
            rates.append(float(part))
        except ValueError:
            raise click.BadParameter(f"{part!r} is not a number; expected rates such as 0.1 or 0.01,0.05,0.1") \
                from None
    return rates


@click.command("select")
@click.argument("cache", type=click.Path(dir_okay=False))
@click.option("--rate", required=True, callback=_rates,
              help="Fraction rho of patches to keep; several comma-separated (bins are formed once).")
@click.option("--bins", default=10, show_default=True, type=click.IntRange(min=1), help="Number of DQ bins.")
@click.option("--method", type=LazyChoice("dqtool.selection.quantize:SELECT_METHODS"), default="dq", show_default=True,
              help="dq; the random baseline of the same size; kcenter; uncertain: in each DQ bin, the patches on "
                   "which --model is least consistent under perturbation.")
@click.option("--model", type=click.Path(dir_okay=False), default=None,
              help="Cellpose model file whose label-free consistency ranks the patches (--method uncertain).")
@click.option("--no-bins", "no_bins", is_flag=True, default=False,
              help="--method uncertain: the least consistent patches overall, no DQ bins (no features needed).")
@click.option("--score", type=LazyChoice("dqtool.selection.uncertain:SCORES"), default=None,
              help="--method uncertain: uncertainty = 1 - this consistency [default: adapted_rand].")
@click.option("--gain", type=LazyChoice("dqtool.selection.quantize:GAINS"), default="paper", show_default=True,
              help="paper: eq. 1; dq: the original DQ code (GraphCut, 0.5+0.5cos); biomedseg: the seed's code.")
@click.option("--sampling", type=LazyChoice("dqtool.selection.quantize:SAMPLINGS"), default="random",
              show_default=True,
              help="random: eq. 2 with largest-remainder rounding; first: the seed's first-k of each bin.")
@seed_option("Sampling seed.")
@click.option("--memory", default=None, help="Budget for the N x N Gram matrix, e.g. 512MB, 2GB [default: 1GiB].")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Subset JSON (several rates: OUT_rate<r>.json).")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for PNGs: 2-D embedding (like Fig. 3) and patch grids (like Fig. 2).")
@quiet_option
@cluster_options
@user_errors
def select(cache, rate, bins, method, model, no_bins, score, gain, sampling, seed, memory, out, plot_dir, quiet,
           cluster):
    """Select a fraction of the patches in CACHE by dataset quantization (run `dqtool embed CACHE` first)."""
    from dqtool.selection.quantize import select_to_files
    from dqtool.selection.uncertain import scorer_for

    written = select_to_files(cache, rate, out, plot_dir=plot_dir, method=method, bins=None if no_bins else bins,
                              gain=gain, seed=seed, sampling=sampling, memory=memory, quiet=is_quiet(quiet),
                              scorer=scorer_for(model, score, cluster))
    for path, subset in written:
        cov, cfg = subset.coverage, subset.config
        if subset.method == "uncertain":
            _echo_uncertain(path, subset)
            continue
        click.echo(f"rate {subset.rate:g}: {subset.n_selected} of {subset.n_total} patches "
                   f"({subset.method}, gain {cfg['gain']}, {cfg['bins']} bins"
                   f"{', reused' if cfg['bins_reused'] else ''}) -> {path}")
        click.echo(f"  covering radius        dq {cov['dq']['covering_radius']:.4f}   "
                   f"random {cov['random']['covering_radius']:.4f}")
        click.echo(f"  mean nearest distance  dq {cov['dq']['mean_distance']:.4f}   "
                   f"random {cov['random']['mean_distance']:.4f}")
    if plot_dir is not None:
        click.echo(f"plots -> {plot_dir}")


def _echo_uncertain(path, subset) -> None:
    cov, cfg = subset.coverage, subset.config
    bins = f"{cfg['bins']} bins, gain {cfg['gain']}{', reused' if cfg['bins_reused'] else ''}" if cfg["bins"] \
        else "no bins"
    click.echo(f"rate {subset.rate:g}: {subset.n_selected} of {subset.n_total} patches (uncertain, {bins}) -> {path}")
    click.echo(f"  model {cfg['model']} (sha256 {cfg['model_sha256'][:12]}), patch scores "
               f"{'reused' if cfg['uncertainty_reused'] else 'computed'} ({cfg['uncertainty_group']})")
    click.echo(f"  mean uncertainty (1 - {cfg['score']})  selected {cfg['uncertainty_mean_selected']:.4f}   "
               f"all {cfg['uncertainty_mean_all']:.4f}")
    if cov is not None:
        click.echo(f"  covering radius        uncertain {cov['uncertain']['covering_radius']:.4f}   "
                   f"dq {cov['dq']['covering_radius']:.4f}   random {cov['random']['covering_radius']:.4f}")


@click.command("export")
@click.argument("subset", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--cache", "cache_path", type=click.Path(dir_okay=False), default=None,
              help="The cache the subset was selected on [default: the path stored in SUBSET].")
@click.option("--seed-masks", "seed_masks", type=click.Path(dir_okay=False), default=None, metavar="MODEL",
              help="Pre-fill NNN_img_seg.npy (Cellpose GUI files) with this Cellpose model's predictions, to correct "
                   "in the GUI (instead of NNN_masks.png).")
@quiet_option
@user_errors
def export(subset, out, cache_path, seed_masks, quiet):
    """Write the patches of SUBSET as Cellpose files (NNN_img.png, NNN_masks.png) plus a CSV back to sources."""
    from dqtool.selection.subsets import export_subset

    if seed_masks is None:
        csv_path = export_subset(subset, out, cache_path=cache_path, quiet=is_quiet(quiet))
    else:
        from dqtool.segmentation.seeds import export_with_seed_masks

        csv_path = export_with_seed_masks(subset, out, seed_masks, cache_path=cache_path, quiet=is_quiet(quiet))
    click.echo(f"exported -> {out} (index: {csv_path})")

