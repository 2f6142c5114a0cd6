"""``dqtool experiment``: a whole study from a JSON config or the quick preset (library: dqtool.studies)."""

from __future__ import annotations

import click

from .common import is_quiet, quiet_option, user_errors


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
