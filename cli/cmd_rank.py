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
              help="Unlabelled target images (a folder of one bit depth, any sizes, one file, or a split file "
                   "naming images of a dataset folder).")
@click.option("--labels", type=click.Path(exists=True), default=None,
              help="Optional label folder (or a split file, e.g. the one given as --images): validates the "
                   "ranking against F1 and mean accuracy.")
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
@click.option("--config", "config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A real-data study config (e.g. studies/real_rank.json): its bank, trained on real sources, ranked "
                   "on its labelled target. Without it: the embedded domains.")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False), default=None,
              help="With --config: the folder the config's roots are relative to (default: the config's data_root).")
@click.option("--out", type=click.Path(file_okay=False), default="runs/rank_study", show_default=True,
              help="Folder for the data, the model bank, both rankings and the study tables.")
@click.option("--target", type=LazyChoice("dqtool.data.synthetic:DOMAINS"), default="fluo", show_default=True,
              help="Embedded domain whose test images are ranked on (its labels validate the ranking).")
@seed_option("Seed of data, subsets, training, perturbations (a --config gives its own).")
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
def rank_study_cmd(config, data_root, out, target, seed, quick, dropout_site, dropout_draw, empty, quiet, cluster,
                   train_resources):
    """Evidence: train a bank of graded models and rank it on a labelled target: the embedded domains'
    TARGET, or the real data of a --config."""
    from dqtool.common.tables import format_markdown

    options = {k: v for k, v in (("dropout_site", dropout_site), ("dropout_draw", dropout_draw), ("empty", empty))
               if v is not None}  # unset: the library's defaults
    if cluster.active:  # the bank's trainings one task a model, the rankings one task a (model, image)
        options.update(cluster=cluster, train_resources=train_resources)
    if config is not None:
        from dqtool.studies.real_rank import rank_study_config

        given = [f"--{name}" for name in ("target", "quick", "seed") if _given(name)]
        if given:
            raise click.UsageError(f"--config takes its target, bank and seed from the config file; drop "
                                   f"{' and '.join(given)}")
        summary = rank_study_config(config, out, data_root=data_root, quiet=is_quiet(quiet), **options)
    else:
        from dqtool.studies.rank_study import rank_study

        if data_root is not None:
            raise click.UsageError("--data-root goes with --config (the embedded domains are generated)")
        summary = rank_study(out, target=target, seed=seed, quick=quick, quiet=is_quiet(quiet), **options)
    click.echo(format_markdown(summary.rows), nl=False)
    click.echo(format_markdown(summary.correlations), nl=False)
    click.echo(f"{out}/study.md, {out}/study_correlations.md, {out}/study.png")


def _given(name: str) -> bool:
    """The option ``name`` was given on the command line (not left at its default)."""
    from click.core import ParameterSource

    return click.get_current_context().get_parameter_source(name) not in (ParameterSource.DEFAULT, None)
