"""Ranking command: ``dqtool rank`` (label-free model ranking by consistency, CTE)."""

from __future__ import annotations

import click

from dqtool.ranking.perturb import (DEFAULT_DROPOUT_DRAW, DEFAULT_DROPOUT_SITE, DEFAULT_STRENGTH, DROPOUT_DRAWS,
                                   DROPOUT_SITES, PERTURBATIONS)

from .common import (LazyChoice, LibraryConstant, cluster_options, is_quiet, quiet_option, seed_option,
                     train_resources_option, user_errors)

_STRENGTHS = ", ".join(f"{k} {v:g}" for k, v in DEFAULT_STRENGTH.items())


class PerturbationList(click.ParamType):
    """``dropout,noise``: known perturbations, each listed once (the library's check, exit 2 here)."""

    name = "LIST"

    def convert(self, value, param, ctx):
        from dqtool.common.errors import InputError
        from dqtool.ranking.rank import parse_perturbations

        if isinstance(value, tuple):
            return value
        try:
            return parse_perturbations(value)
        except InputError as exc:
            self.fail(str(exc), param, ctx)


@click.command("rank")
@click.argument("models_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--images", required=True, type=click.Path(exists=True),
              help="Unlabelled target images (a folder of one bit depth, any sizes, or one file).")
@click.option("--labels", type=click.Path(exists=True, file_okay=False), default=None,
              help="Optional label folder: validates the ranking against F1 and mean accuracy.")
@click.option("--perturb", "perturbations", type=PerturbationList(), default="dropout", show_default=True,
              help=f"One or a comma list of {', '.join(PERTURBATIONS)}; dropout: channel dropout at CPnet's "
                   "bottleneck, others perturb the normalised input. A list shares the network passes and "
                   "writes one ranking per perturbation into OUT/<perturbation>/.")
@click.option("--strength", default=None,
              help=f"Perturbation strength, one per perturbation, comma-separated (defaults: {_STRENGTHS}).")
@click.option("--score", type=LazyChoice("dqtool.ranking.rank:SCORES"), default="adapted_rand", show_default=True,
              help="Consistency that orders the models.")
@seed_option("Seed of dropout channels and noise.")
@click.option("--dropout-site", type=click.Choice(DROPOUT_SITES), default=DEFAULT_DROPOUT_SITE, show_default=True,
              help="Where dropout acts on CPnet's bottleneck: decoder = the decoder input only (the skip and "
                   "the style see the unperturbed features); bottleneck = every consumer (decoder input, the "
                   "skip of the last up block, the style computed from the dropped features).")
@click.option("--dropout-draw", type=click.Choice(DROPOUT_DRAWS), default=DEFAULT_DROPOUT_DRAW, show_default=True,
              help="Dropped channels drawn once per run (run) or anew for every network batch (batch, the "
                   "paper's code), from the seed.")
@click.option("--empty", type=LazyChoice("dqtool.ranking.rank:EMPTY_RULES"),
              default=LibraryConstant("dqtool.ranking.rank:DEFAULT_EMPTY"), show_default=True,
              help="An image where a model finds no cell while another model does: worst = it scores 0 "
                   "(every score); skip = its adapted Rand is left out of the median (the paper's code). "
                   "The ranking's n_empty column counts the images where the model found no cell.")
@click.option("--diameter", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Cell diameter in px (default: each model's training diameter).")
@click.option("--out", type=click.Path(file_okay=False), default="rank", show_default=True,
              help="Folder for ranking.{csv,md,json}, per_image.*, rank.json, ranking.png and cache/.")
@click.option("--builtin", default=None, metavar="NAMES",
              help="Also rank Cellpose's built-in models by name, e.g. cyto3,nuclei (from CELLPOSE_LOCAL_MODELS_PATH; "
                   "never downloaded).")
@click.option("--no-cache", is_flag=True,
              help="Neither read nor write OUT/cache/ (the unperturbed predictions a later run reuses).")
@cluster_options
@quiet_option
@user_errors
def rank_cmd(models_dir, images, labels, perturbations, strength, score, seed, dropout_site, dropout_draw, empty,
             diameter, out, builtin, no_cache, quiet, cluster):
    """Rank the Cellpose models in MODELS_DIR on target images without labels."""
    from dqtool.ranking.rank import format_bank, rank_bank

    bank = rank_bank(models_dir, images, labels=labels, perturbations=perturbations, strength=strength, out=out,
                     score=score, seed=seed, diameter=diameter, quiet=is_quiet(quiet), cache=not no_cache,
                     builtin=builtin, dropout_site=dropout_site, dropout_draw=dropout_draw, empty=empty,
                     cluster=cluster)
    click.echo(format_bank(bank), nl=False)


@click.command("rank-study")
@click.option("--out", type=click.Path(file_okay=False), default="runs/rank_study", show_default=True,
              help="Folder for the data, the model bank, both rankings and the study tables.")
@click.option("--target", type=LazyChoice("dqtool.data.synthetic:DOMAINS"), default="fluo", show_default=True,
              help="Embedded domain whose test images are ranked on (its labels validate the ranking).")
@seed_option("Seed of data, subsets, training, perturbations.")
@click.option("--quick", is_flag=True, help="6 models of 15-30 epochs of 8 patches instead of 8 of 15-60 epochs of 16 (CPU budget).")
@click.option("--dropout-site", type=click.Choice(DROPOUT_SITES), default=None,
              help="As for rank (default: rank's): where dropout acts on CPnet's bottleneck.")
@click.option("--dropout-draw", type=click.Choice(DROPOUT_DRAWS), default=None,
              help="As for rank (default: rank's): dropped channels drawn once per run or anew per network batch.")
@click.option("--empty", type=LazyChoice("dqtool.ranking.rank:EMPTY_RULES"), default=None,
              help="As for rank (default: rank's): how an image where a model finds no cell (while another "
                   "does) counts.")
@cluster_options
@train_resources_option
@quiet_option
@user_errors
def rank_study_cmd(out, target, seed, quick, dropout_site, dropout_draw, empty, quiet, cluster, train_resources):
    """Evidence: train a bank of graded models on the embedded domains and rank it on TARGET."""
    from dqtool.common.tables import format_markdown
    from dqtool.studies.rank_study import rank_study

    options = {k: v for k, v in (("dropout_site", dropout_site), ("dropout_draw", dropout_draw), ("empty", empty))
               if v is not None}  # unset: the library's defaults
    if cluster.active:  # the bank's trainings one task a model, the rankings one task a (model, image)
        options.update(cluster=cluster, train_resources=train_resources)
    summary = rank_study(out, target=target, seed=seed, quick=quick, quiet=is_quiet(quiet), **options)
    click.echo(format_markdown(summary.rows), nl=False)
    click.echo(format_markdown(summary.correlations), nl=False)
    click.echo(f"{out}/study.md, {out}/study_correlations.md, {out}/study.png")

