"""The ``dqtool`` command group. Each subcommand lives in its own module and is registered here."""

from __future__ import annotations

import importlib

import click

from dqtool import __version__

from .common import Context

# Modules that define one or more Click commands in a module-level ``COMMANDS`` list.
COMMAND_MODULES = [
    "dqtool_cli.cmd_data",
    "dqtool_cli.cmd_embed",
    "dqtool_cli.cmd_train",
    "dqtool_cli.cmd_rank",
    "dqtool_cli.cmd_select",
    "dqtool_cli.cmd_eval",
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dqtool")
@click.option("-v", "--verbose", count=True, help="More log output (repeatable).")
@click.option("--quiet", is_flag=True, help="No progress bars or chatter.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """dqtool: dataset quantization, forgetting-aware training and label-free ranking for Cellpose."""
    ctx.obj = Context(verbose=verbose, quiet=quiet)


for _name in COMMAND_MODULES:
    for _command in importlib.import_module(_name).COMMANDS:
        cli.add_command(_command)
