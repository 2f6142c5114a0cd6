"""Ranking command: ``dqtool rank`` (label-free model ranking by consistency, CTE)."""

from __future__ import annotations

import click

from dqtool.ranking.perturb import DEFAULT_STRENGTH, PERTURBATIONS

from .common import LazyChoice, is_quiet, quiet_option, seed_option, user_errors

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
@click.option("--diameter", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Cell diameter in px (default: each model's training diameter).")
@click.option("--out", type=click.Path(file_okay=False), default="rank", show_default=True,
              help="Folder for ranking.{csv,md,json}, per_image.*, rank.json, ranking.png and cache/.")
@click.option("--builtin", default=None, metavar="NAMES",
              help="Also rank Cellpose's built-in models by name, e.g. cyto3,nuclei (from CELLPOSE_LOCAL_MODELS_PATH; "
                   "never downloaded).")
@click.option("--no-cache", is_flag=True,
              help="Neither read nor write OUT/cache/ (the unperturbed predictions a later run reuses).")
@quiet_option
@user_errors
def rank_cmd(models_dir, images, labels, perturbations, strength, score, seed, diameter, out, builtin, no_cache,
             quiet):
    """Rank the Cellpose models in MODELS_DIR on target images without labels."""
    from dqtool.ranking.rank import format_bank, rank_bank

    bank = rank_bank(models_dir, images, labels=labels, perturbations=perturbations, strength=strength, out=out,
                     score=score, seed=seed, diameter=diameter, quiet=is_quiet(quiet), cache=not no_cache,
                     builtin=builtin)
    click.echo(format_bank(bank), nl=False)


@click.command("rank-study")
@click.option("--out", type=click.Path(file_okay=False), default="runs/rank_study", show_default=True,
              help="Folder for the data, the model bank, both rankings and the study tables.")
@click.option("--target", type=LazyChoice("dqtool.data.synthetic:DOMAINS"), default="fluo", show_default=True,
              help="Embedded domain whose test images are ranked on (its labels validate the ranking).")
@seed_option("Seed of data, subsets, training, perturbations.")
@click.option("--quick", is_flag=True, help="6 models of 15-30 epochs of 8 patches instead of 8 of 15-60 epochs of 16 (CPU budget).")
@quiet_option
@user_errors
def rank_study_cmd(out, target, seed, quick, quiet):
    """Evidence: train a bank of graded models on the embedded domains and rank it on TARGET."""
    from dqtool.common.tables import format_markdown
    from dqtool.studies.rank_study import rank_study

    summary = rank_study(out, target=target, seed=seed, quick=quick, quiet=is_quiet(quiet))
    click.echo(format_markdown(summary.rows), nl=False)
    click.echo(format_markdown(summary.correlations), nl=False)
    click.echo(f"{out}/study.md, {out}/study_correlations.md, {out}/study.png")

