"""``dqtool experiment``: a whole study from a JSON config or the quick preset (library: dqtool.studies)."""

from __future__ import annotations

import click

from .common import cluster_options, is_quiet, quiet_option, train_resources_option, user_errors


@click.command("experiment")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--quick", is_flag=True, help="The built-in quick study on the embedded default domains.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Study folder.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="Folder the config's domain paths are relative to (replaces the config's data_root).")
@cluster_options
@train_resources_option
@quiet_option
@user_errors
def experiment_cmd(config, quick, out, data_root, quiet, cluster, train_resources):
    """Run a whole study (redundancy, zero-shot, finetuning, replay, sequences) from a JSON CONFIG."""
    from dqtool.studies.experiment import run_experiment

    if bool(config) == bool(quick):
        raise click.UsageError("give either CONFIG or --quick")
    run_experiment(config, out, quick=quick, quiet=is_quiet(quiet), data_root=data_root, cluster=cluster,
                   train_resources=train_resources)
    if not is_quiet(quiet):
        click.echo(f"report: {out}/report.md")
