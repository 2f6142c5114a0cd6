"""``dqtool coverage``: what DQ selects on a cache's features, its bins as shells and coverage over seeds."""

from __future__ import annotations

import click

from .cmd_select import _rates
from .common import LazyChoice, is_quiet, quiet_option, user_errors


@click.command("coverage")
@click.argument("cache", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--rates", default="0.01,0.05,0.1,0.3", show_default=True, callback=_rates,
              help="Comma-separated rates.")
@click.option("--seeds", default=20, show_default=True, type=click.IntRange(min=2),
              help="Seeds 0..N-1 for DQ's and random's draws (mean and std over them).")
@click.option("--bins", default=10, show_default=True, type=click.IntRange(min=1), help="Number of DQ bins.")
@click.option("--gain", type=LazyChoice("dqtool.selection.quantize:GAINS"), default="paper", show_default=True,
              help="The gain of eq. 1 (as for `dqtool select`).")
@quiet_option
@user_errors
def coverage_cmd(cache, out_dir, rates, seeds, bins, gain, quiet):
    """DQ's bins as shells around the feature mean, and the coverage (covering radius, mean and 95th-percentile
    nearest-selected distance) of DQ, random and k-center subsets over seeds. Needs features (`dqtool embed`)."""
    from dqtool.studies.coverage import coverage_study

    result = coverage_study(cache, out_dir, rates=rates, seeds=seeds, bins=bins, gain=gain, quiet=is_quiet(quiet))
    if not is_quiet(quiet):
        for path in result.files:
            click.echo(str(path))
