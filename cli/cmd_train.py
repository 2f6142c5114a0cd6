"""Training commands: ``train``, ``finetune``, ``replay``, ``sequence``.

Each parses its options (the training settings once, in ``common.training_options``) and calls one
library function (``dqtool.segmentation.train``, ``dqtool.segmentation.transfer``).
"""

from __future__ import annotations

import click

from .common import LazyChoice, is_quiet, quiet_option, training_options, user_errors


def _evals(ctx, param, value) -> dict[str, str]:
    out = {}
    for item in value:
        name, _, path = item.partition("=")
        if not name or not path:
            raise click.BadParameter(f"{item!r}: expected NAME=DIR")
        if name in out:
            raise click.BadParameter(f"{name!r} given twice")
        out[name] = path
    return out


def eval_option(func):
    return click.option("--eval", "evals", multiple=True, metavar="NAME=DIR", callback=_evals,
                        help="Test split to evaluate after every stage (repeatable).")(func)


@click.command("train")
@click.argument("cache", type=click.Path(dir_okay=False))
@click.option("--subset", type=click.Path(dir_okay=False), help="Subset JSON (from `dqtool select`).")
@click.option("--init", type=click.Path(), help="Cellpose model file to start from (default: from scratch).")
@click.option("--out", required=True, type=click.Path(), help="Model file to write.")
@training_options
@quiet_option
@user_errors
def train_cmd(cache, subset, init, out, config, resume, quiet):
    """Train Cellpose on a patch cache (or a subset of it)."""
    from dqtool.segmentation.train import train

    result = train(cache, out, subset=subset, init=init, config=config, resume=resume, quiet=is_quiet(quiet))
    if not is_quiet(quiet):
        click.echo(f"{result.model}: {len(result.train_losses)} epochs on {result.n_patches} patches, "
                   f"final loss {result.train_losses[-1]:.4f}")


@click.command("finetune")
@click.argument("target", type=click.Path(dir_okay=False))
@click.option("--init", required=True, type=click.Path(), help="Cellpose model file to finetune.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--subset", type=click.Path(dir_okay=False), help="Subset JSON of the target cache.")
@eval_option
@training_options
@quiet_option
@user_errors
def finetune_cmd(target, init, out, subset, evals, config, resume, quiet):
    """Naive finetuning of a model on a target cache (paper Tables V, VI)."""
    from dqtool.segmentation.transfer import finetune

    result = finetune(init, target, out, subset=subset, evals=evals, config=config, resume=resume,
                      quiet=is_quiet(quiet))
    _report(result, quiet)


@click.command("replay")
@click.option("--init", required=True, type=click.Path(), help="Cellpose model file (trained on the source).")
@click.option("--source", required=True, type=click.Path(dir_okay=False), help="Source patch cache.")
@click.option("--source-rate", type=float, default=0.05, show_default=True,
              help="Fraction of source patches replayed.")
@click.option("--source-method", type=LazyChoice("dqtool.selection.quantize:METHODS"), default="dq",
              show_default=True)
@click.option("--target", required=True, type=click.Path(dir_okay=False), help="Target patch cache.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@eval_option
@training_options
@quiet_option
@user_errors
def replay_cmd(init, source, source_rate, source_method, target, out, evals, config, resume, quiet):
    """Finetune on the full target plus a DQ/random subset of the source (paper Table VIII)."""
    from dqtool.segmentation.transfer import replay

    result = replay(init, source, target, out, source_rate=source_rate, source_method=source_method,
                    evals=evals, config=config, resume=resume, quiet=is_quiet(quiet))
    _report(result, quiet)


@click.command("sequence")
@click.argument("caches", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--init", type=click.Path(), help="Model to start from (default: from scratch).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@eval_option
@training_options
@quiet_option
@user_errors
def sequence_cmd(caches, init, out, evals, config, resume, quiet):
    """Train through caches one after another (paper Table VII), saving the model after each stage."""
    from dqtool.segmentation.transfer import sequence

    result = sequence(list(caches), out, init=init, evals=evals, config=config, resume=resume,
                      quiet=is_quiet(quiet))
    _report(result, quiet)


def _report(result, quiet):
    if not is_quiet(quiet):
        for stage in result.stages:
            click.echo(f"{stage.name}: {stage.model}")
        if result.forgetting is not None:
            click.echo(f"forgetting matrix: {result.forgetting['md']}")
