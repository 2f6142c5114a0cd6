"""``dqtool export-model MODEL --out DIR_OR_ZIP``: a bioimage.io model package.

Library: :mod:`dqtool.segmentation.export_model`.
"""

from __future__ import annotations

import click

from .common import seed_option, user_errors


@click.command("export-model")
@click.argument("model", type=click.Path())
@click.option("--out", required=True, type=click.Path(),
              help="A .zip path, or a new (or empty) folder; only a package dqtool exported is replaced.")
@click.option("--name", default=None, help="Model name (default: 'Cellpose model <file name>').")
@click.option("--author", "authors", multiple=True, default=("dqtool",), show_default=True,
              help="An author's name (repeat for several).")
@click.option("--license", "license_id", default="CC-BY-4.0", show_default=True, help="SPDX licence id.")
@seed_option("Seed of the synthetic test input.")
@click.option("--no-test", is_flag=True, help="Skip bioimage.io's model test before writing.")
@user_errors
def export_model_cmd(model, out, name, authors, license_id, seed, no_test):
    """Write the Cellpose MODEL file as a bioimage.io model package (format 0.5), tested by bioimageio.core."""
    from dqtool.segmentation.export_model import ExportOptions, export_model

    options = ExportOptions(name=name, authors=tuple(authors), license=license_id, seed=seed)
    click.echo(f"bioimage.io package written: {export_model(model, out, options, test=not no_test)}")
