"""The ``dqtool`` command group: a table of commands whose modules are imported only when used.

Click's "Lazily Loading Subcommands" pattern: :data:`COMMANDS` names each command's module and
attribute as a string, with the short help that ``dqtool --help`` lists, so listing the commands
imports no command module (and none of torch, Cellpose, h5py or the MAE); ``dqtool rank`` imports
``dqtool_cli.cmd_rank`` and what the ranking needs, nothing else. One ``cmd_`` module per area.
"""

from __future__ import annotations

import importlib

import click
from click.formatting import HelpFormatter

from dqtool._version import __version__

from .common import Context

#: command name -> ("module:attribute" of the Click command, the short help ``dqtool --help`` lists).
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("dqtool_cli.cmd_data:data_cmd", "Write the embedded default domains (fluo, histo, multi)."),
    "patches": ("dqtool_cli.cmd_data:patches_cmd", "Cut image folders into patches in an HDF5 cache."),
    "info": ("dqtool_cli.cmd_data:info_cmd", "Summarise a patch cache."),
    "embed": ("dqtool_cli.cmd_embed:embed_cmd", "Store MAE features of every patch in a cache."),
    "select": ("dqtool_cli.cmd_select:select", "Select a fraction of a cache's patches by DQ."),
    "export": ("dqtool_cli.cmd_select:export", "Write a subset's patches as Cellpose files."),
    "coverage": ("dqtool_cli.cmd_coverage:coverage_cmd", "DQ's bins as shells, and coverage over seeds."),
    "train": ("dqtool_cli.cmd_train:train_cmd", "Train Cellpose on a patch cache (or a subset of it)."),
    "finetune": ("dqtool_cli.cmd_train:finetune_cmd", "Naive finetuning on a target cache (Tables V, VI)."),
    "replay": ("dqtool_cli.cmd_train:replay_cmd", "Finetune on the target plus a source subset (Table VIII)."),
    "sequence": ("dqtool_cli.cmd_train:sequence_cmd", "Train through caches one after another (Table VII)."),
    "predict": ("dqtool_cli.cmd_predict:predict_cmd", "Segment images with a Cellpose model file."),
    "export-model": ("dqtool_cli.cmd_export_model:export_model_cmd",
                     "Write a Cellpose model as a bioimage.io model package."),
    "eval": ("dqtool_cli.cmd_eval:eval_command", "Score predicted label maps against ground truth."),
    "rank": ("dqtool_cli.cmd_rank:rank_cmd", "Rank Cellpose models on target images without labels."),
    "rank-study": ("dqtool_cli.cmd_rank:rank_study_cmd", "Evidence: train a graded bank and rank it."),
    "experiment": ("dqtool_cli.cmd_experiment:experiment_cmd", "Run a whole study from a JSON config."),
    "report": ("dqtool_cli.cmd_report:report_cmd", "One page (HTML + Markdown) of what a run found."),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported from ``lazy_commands`` when one is run or asked for help."""

    def __init__(self, *args, lazy_commands: dict[str, tuple[str, str]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.lazy_commands:
            return super().get_command(ctx, cmd_name)
        module, _, attr = self.lazy_commands[cmd_name][0].partition(":")
        command = getattr(importlib.import_module(module), attr)
        if not isinstance(command, click.Command) or command.name != cmd_name:
            raise RuntimeError(f"{module}:{attr} is not the Click command {cmd_name!r}")
        return command

    def format_commands(self, ctx: click.Context, formatter: HelpFormatter) -> None:
        """The command list from the table's short help: no command module is imported."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = []
        for name in names:
            if name in self.lazy_commands:
                short = click.utils.make_default_short_help(self.lazy_commands[name][1], limit)
            else:
                command = super().get_command(ctx, name)
                if command is None or command.hidden:
                    continue
                short = command.get_short_help_str(limit)
            rows.append((name, short))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dqtool")
@click.option("--quiet", is_flag=True, help="No progress bars or chatter.")
@click.pass_context
def cli(ctx: click.Context, quiet: bool) -> None:
    """dqtool: dataset quantization, forgetting-aware training and label-free ranking for Cellpose."""
    ctx.obj = Context(quiet=quiet)
