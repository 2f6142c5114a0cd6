"""``dqtool eval``: score predicted label maps against ground truth (library: dqtool.evaluation)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .common import cluster_options, is_quiet, quiet_option, user_errors


def _thresholds(ctx, param, value):
    from dqtool.evaluation.metrics import parse_thresholds

    try:
        return parse_thresholds(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command("eval")
@click.option("--gt", "gt_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of ground-truth label maps (subfolders are domains).")
@click.option("--pred", "pred_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of predicted label maps (<name>_cp_masks.png|tif, <name>_label.tiff or same stem).")
@click.option("--thresholds", default="0.5", show_default=True, callback=_thresholds,
              help="IoU thresholds: 0.5, a list 0.5,0.75 or a range 0.5:0.95:0.05.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for per_image.csv and summary.csv/.md/.json.")
@click.option("--empty-value", default=1.0, show_default=True, type=click.FloatRange(0, 1),
              help="Pixel scores when both maps are empty (0 reproduces the seed paper's code).")
@click.option("--threads", default=None, type=click.IntRange(1, 256),
              help="Images scored in parallel threads (without --workers/--scheduler).")
@cluster_options
@quiet_option
@user_errors
def eval_command(gt_dir, pred_dir, thresholds, out_dir, empty_value, threads, quiet, cluster):
    """Score predicted instance label maps against ground truth.

    Exit code 0: every file paired and scored; 3: some files had no partner or could not be scored
    (listed on stderr and in problems.csv), the rest were scored; 1: nothing could be scored.
    """
    from dqtool.evaluation.folders import evaluate_folders

    report = evaluate_folders(gt_dir, pred_dir, out_dir, thresholds=thresholds, empty_value=empty_value,
                              workers=threads, quiet=is_quiet(quiet), cluster=cluster)
    click.echo(report.summary_text())
    for line in report.problem_lines():
        click.echo(line, err=True)
    click.echo(f"tables written to {out_dir}", err=True)
    sys.exit(report.exit_code)
