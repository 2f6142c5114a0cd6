"""Shared CLI plumbing: the error boundary and common options.

User mistakes become one clear line and an exit code (2 for bad usage, 1 for failures), never a
traceback. Library code raises ``dqtool.errors.InputError`` (or ``FileNotFoundError``) for those.
"""

from __future__ import annotations

import functools
import sys

import click

from dqtool.common.errors import InputError


class Context:
    """Global options carried to every command."""

    def __init__(self, verbose: int = 0, quiet: bool = False):
        self.verbose = verbose
        self.quiet = quiet


def user_errors(func):
    """Turn the errors a user can cause into one line on stderr and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (InputError, FileNotFoundError, FileExistsError, NotADirectoryError,
                IsADirectoryError, PermissionError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)

    return wrapper


def quiet_option(func):
    """``--quiet`` on a subcommand, also honouring the group's ``--quiet``."""
    return click.option("--quiet", is_flag=True, default=False,
                        help="No progress bars.")(func)


def is_quiet(quiet: bool) -> bool:
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if isinstance(ctx.obj, Context) and ctx.obj.quiet:
            return True
        ctx = ctx.parent
    return bool(quiet)
