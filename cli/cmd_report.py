"""``dqtool report RUN_DIR``: one page that says what a run found (library: dqtool.report)."""

from __future__ import annotations

import click

from .common import is_quiet, quiet_option, user_errors


@click.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--images", type=click.Path(exists=True), default=None,
              help="Target images to draw predicted outlines on (default: the folder the ranking recorded).")
@click.option("--labels", type=click.Path(exists=True, file_okay=False), default=None,
              help="Their labels (default: beside the images).")
@click.option("--n-images", type=click.IntRange(min=1), default=2, show_default=True,
              help="Images shown with outlines.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for report.html, report.md and report_files/ (default: RUN_DIR); only the report's own "
                   "files there are replaced.")
@quiet_option
@user_errors
def report_cmd(run_dir, images, labels, n_images, out, quiet):
    """Write RUN_DIR/report.html (self-contained) and report.md: data, DQ selection, training, ranking."""
    from dqtool.report import write_report

    result = write_report(run_dir, images=images, labels=labels, out=out, n_images=n_images, quiet=is_quiet(quiet))
    if result.missing and not is_quiet(quiet):
        click.echo(f"report: {len(result.missing)} parts missing (listed in the page)", err=True)
    click.echo(str(result.html))
