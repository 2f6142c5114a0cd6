"""Training commands: ``train``, ``finetune``, ``replay``, ``sequence``, ``predict``, ``experiment``.

Each parses its options and calls one library function (``dqtool.training``, ``dqtool.transfer``,
``dqtool.predict``, ``dqtool.experiment``).
"""

from __future__ import annotations

import click

from .common import is_quiet, quiet_option, user_errors


def _channels(ctx, param, value):
    try:
        parts = [int(v) for v in str(value).replace(" ", "").split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected two integers such as 0,0 or 2,3")
    if len(parts) != 2 or not all(0 <= p <= 3 for p in parts):
        raise click.BadParameter(f"{value!r}: expected two channels in 0..3 (0 = gray, 1 = R, 2 = G, 3 = B)")
    return tuple(parts)


def _positive(ctx, param, value):
    if value is not None and value <= 0:
        raise click.BadParameter(f"{value}: expected a positive value")
    return value


def training_options(func):
    """The paper's defaults (Sec. IV.D): channels 0,0, SGD, lr 0.1, wd 1e-4, 500 epochs, checkpoint every 50."""
    options = [
        click.option("--channels", default="0,0", show_default=True, callback=_channels,
                     help="Cellpose channels: cytoplasm,nucleus (0 = gray, 1 = R, 2 = G, 3 = B)."),
        click.option("--sgd/--adamw", default=True, show_default=True, help="Optimiser."),
        click.option("--learning-rate", type=float, default=0.1, show_default=True, callback=_positive),
        click.option("--weight-decay", type=float, default=1e-4, show_default=True),
        click.option("--epochs", type=int, default=500, show_default=True, callback=_positive),
        click.option("--save-every", type=int, default=50, show_default=True, callback=_positive,
                     help="Checkpoint every N epochs (resume point)."),
        click.option("--bsize", type=int, default=224, show_default=True, callback=_positive,
                     help="Training crop size (a multiple of 16)."),
        click.option("--batch-size", type=int, default=8, show_default=True, callback=_positive),
        click.option("--nimg-per-epoch", type=int, default=None, callback=_positive,
                     help="Patches drawn per epoch (default: all)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--min-train-masks", type=int, default=5, show_default=True,
                     help="Drop patches with fewer masks (reported)."),
        click.option("--resume", is_flag=True, help="Continue a killed run from its last checkpoint."),
        click.option("--engine", type=click.Choice(["dqtool", "train_seg"]), default="dqtool", show_default=True,
                     help="dqtool: train_seg's loop step for step (progress, resume, seeds); train_seg: "
                          "cellpose.train.train_seg itself (same model for seed 0; no resume)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _config(kw):
    from dqtool.segmentation.train import TrainConfig

    if kw["bsize"] % 16:
        raise click.BadParameter(f"{kw['bsize']}: expected a multiple of 16", param_hint="--bsize")
    return TrainConfig(channels=kw.pop("channels"), sgd=kw.pop("sgd"), learning_rate=kw.pop("learning_rate"),
                       weight_decay=kw.pop("weight_decay"), n_epochs=kw.pop("epochs"),
                       save_every=kw.pop("save_every"), bsize=kw.pop("bsize"), batch_size=kw.pop("batch_size"),
                       nimg_per_epoch=kw.pop("nimg_per_epoch"), seed=kw.pop("seed"),
                       min_train_masks=kw.pop("min_train_masks"), engine=kw.pop("engine"))


def _eval_option(func):
    return click.option("--eval", "evals", multiple=True, metavar="NAME=DIR",
                        help="Test split to evaluate after every stage (repeatable).")(func)


def _parse_evals(evals):
    out = {}
    for item in evals:
        if "=" not in item:
            raise click.BadParameter(f"{item!r}: expected NAME=DIR", param_hint="--eval")
        name, path = item.split("=", 1)
        if not name or not path:
            raise click.BadParameter(f"{item!r}: expected NAME=DIR", param_hint="--eval")
        if name in out:
            raise click.BadParameter(f"{name!r} given twice", param_hint="--eval")
        out[name] = path
    return out


@click.command("train")
@click.argument("cache", type=click.Path(dir_okay=False))
@click.option("--subset", type=click.Path(dir_okay=False), help="Subset JSON (from `dqtool select`).")
@click.option("--init", type=click.Path(), help="Cellpose model file to start from (default: from scratch).")
@click.option("--out", required=True, type=click.Path(), help="Model file to write.")
@training_options
@quiet_option
@user_errors
def train_cmd(cache, subset, init, out, resume, quiet, **kw):
    """Train Cellpose on a patch cache (or a subset of it)."""
    from dqtool.segmentation.train import train

    result = train(cache, out, subset=subset, init=init, config=_config(kw), resume=resume, quiet=is_quiet(quiet))
    if not is_quiet(quiet):
        click.echo(f"{result.model}: {len(result.train_losses)} epochs on {result.n_patches} patches, "
                   f"final loss {result.train_losses[-1]:.4f}")


@click.command("finetune")
@click.argument("target", type=click.Path(dir_okay=False))
@click.option("--init", required=True, type=click.Path(), help="Cellpose model file to finetune.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--subset", type=click.Path(dir_okay=False), help="Subset JSON of the target cache.")
@_eval_option
@training_options
@quiet_option
@user_errors
def finetune_cmd(target, init, out, subset, evals, resume, quiet, **kw):
    """Naive finetuning of a model on a target cache (paper Tables V, VI)."""
    from dqtool.segmentation.transfer import finetune

    result = finetune(init, target, out, subset=subset, evals=_parse_evals(evals), config=_config(kw),
                      resume=resume, quiet=is_quiet(quiet))
    _report(result, quiet)


@click.command("replay")
@click.option("--init", required=True, type=click.Path(), help="Cellpose model file (trained on the source).")
@click.option("--source", required=True, type=click.Path(dir_okay=False), help="Source patch cache.")
@click.option("--source-rate", type=float, default=0.05, show_default=True,
              help="Fraction of source patches replayed.")
@click.option("--source-method", type=click.Choice(["dq", "random"]), default="dq", show_default=True)
@click.option("--target", required=True, type=click.Path(dir_okay=False), help="Target patch cache.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@_eval_option
@training_options
@quiet_option
@user_errors
def replay_cmd(init, source, source_rate, source_method, target, out, evals, resume, quiet, **kw):
    """Finetune on the full target plus a DQ/random subset of the source (paper Table VIII)."""
    from dqtool.segmentation.transfer import replay

    if not 0 < source_rate <= 1:
        raise click.BadParameter(f"{source_rate}: expected a rate in (0, 1]", param_hint="--source-rate")
    result = replay(init, source, target, out, source_rate=source_rate, source_method=source_method,
                    evals=_parse_evals(evals), config=_config(kw), resume=resume, quiet=is_quiet(quiet))
    _report(result, quiet)


@click.command("sequence")
@click.argument("caches", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--init", type=click.Path(), help="Model to start from (default: from scratch).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@_eval_option
@training_options
@quiet_option
@user_errors
def sequence_cmd(caches, init, out, evals, resume, quiet, **kw):
    """Train through caches one after another (paper Table VII), saving the model after each stage."""
    from dqtool.segmentation.transfer import sequence

    result = sequence(list(caches), out, init=init, evals=_parse_evals(evals), config=_config(kw),
                      resume=resume, quiet=is_quiet(quiet))
    _report(result, quiet)


def _report(result, quiet):
    if not is_quiet(quiet):
        for stage in result.stages:
            click.echo(f"{stage.name}: {stage.model}")
        if result.forgetting is not None:
            click.echo(f"forgetting matrix: {result.forgetting['md']}")


@click.command("predict")
@click.argument("model", type=click.Path())
@click.argument("images", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for <name>_cp_masks.tif.")
@click.option("--channels", default="0,0", show_default=True, callback=_channels)
@click.option("--diameter", type=float, default=None, help="Cell diameter in px (default: the model's).")
@click.option("--flow-threshold", type=float, default=0.4, show_default=True)
@click.option("--cellprob-threshold", type=float, default=0.0, show_default=True)
@quiet_option
@user_errors
def predict_cmd(model, images, out, channels, diameter, flow_threshold, cellprob_threshold, quiet):
    """Segment IMAGES (a file or a folder) with a Cellpose MODEL file."""
    from dqtool.segmentation.predict import PredictOptions, predict

    options = PredictOptions(channels=channels, diameter=diameter, flow_threshold=flow_threshold,
                             cellprob_threshold=cellprob_threshold)
    written = predict(model, images, out, options, quiet=is_quiet(quiet))
    if not is_quiet(quiet):
        click.echo(f"{len(written)} masks written to {out}")


@click.command("experiment")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--quick", is_flag=True, help="The built-in quick study on the embedded default domains.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Study folder.")
@quiet_option
@user_errors
def experiment_cmd(config, quick, out, quiet):
    """Run a whole study (redundancy, zero-shot, finetuning, replay, sequences) from a JSON CONFIG."""
    from dqtool.studies.experiment import run_experiment

    if bool(config) == bool(quick):
        raise click.UsageError("give either CONFIG or --quick")
    run_experiment(config, out, quick=quick, quiet=is_quiet(quiet))
    if not is_quiet(quiet):
        click.echo(f"report: {out}/report.md")


COMMANDS = [train_cmd, finetune_cmd, replay_cmd, sequence_cmd, predict_cmd, experiment_cmd]
