"""Shared CLI plumbing: the error boundary, the options several commands share, lazy library constants.

User mistakes become one clear line and an exit code (2 for bad usage, 1 for failures), never a
traceback. Library code raises ``dqtool.common.errors.InputError`` (or ``FileNotFoundError``) for those,
and the library, not the CLI, checks values (rates, strengths, training settings): the CLI parses.

An option that several commands take with one meaning (``--quiet``, ``--seed``, ``--channels``, the
training settings) is declared once here. Nothing here imports torch, Cellpose, h5py or the MAE:
choices that live in heavy library modules are read on first use (:class:`LibraryConstant`).
"""

from __future__ import annotations

import functools
import importlib
import sys

import click

from dqtool.common.errors import InputError


class Context:
    """Global options carried to every command."""

    def __init__(self, quiet: bool = False):
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
        except OSError as exc:  # a full or read-only disk outside a writer's guard: still one line
            from dqtool.common.outputs import fault_code, output_error

            if fault_code(exc) is None:
                raise
            click.echo(f"error: {output_error(getattr(exc, 'filename', None) or 'output', exc)}", err=True)
            sys.exit(1)

    return wrapper


# ----------------------------------------------------------------------------------------------
# Library constants read on first use


class LibraryConstant:
    """The value of ``"module:NAME"`` in the library, imported when Click first needs it.

    Used as an option default (Click calls it; ``--help`` shows ``str()`` of it) and by
    :class:`LazyChoice`, so a command module can offer the cache's compressions without importing
    h5py, or the DQ gains without importing torch, before the command runs.
    """

    def __init__(self, ref: str):
        self.ref = ref

    @functools.cached_property
    def value(self):
        module, _, name = self.ref.partition(":")
        return getattr(importlib.import_module(module), name)

    def __call__(self):
        return self.value

    def __str__(self) -> str:
        return str(self.value)


class LazyChoice(click.Choice):
    """``click.Choice`` over a library constant (``"module:NAME"``) read on first use."""

    def __init__(self, ref: str, case_sensitive: bool = True):
        # click.Choice.__init__ would store the choices now; they are read on first use instead
        self._choices = LibraryConstant(ref)
        self.case_sensitive = case_sensitive

    @property
    def choices(self) -> tuple:
        return tuple(self._choices.value)


# ----------------------------------------------------------------------------------------------
# Options several commands share


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


def seed_option(help: str | None = None):
    """``--seed``: a non-negative integer, 0 by default (NumPy and torch take no negative seed)."""
    return click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help=help)


def _channels(ctx, param, value) -> tuple[int, int]:
    try:
        parts = tuple(int(v) for v in str(value).replace(" ", "").split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected two integers such as 0,0 or 2,3") from None
    # The range is checked here, not left to the library: predict has no library check of channels yet.
    if len(parts) != 2 or not all(0 <= p <= 3 for p in parts):
        raise click.BadParameter(f"{value!r}: expected two channels in 0..3 (0 = gray, 1 = R, 2 = G, 3 = B)")
    return parts


def channels_option(func):
    """``--channels cytoplasm,nucleus``, Cellpose's channel pair, parsed into a tuple of two ints."""
    return click.option("--channels", default="0,0", show_default=True, callback=_channels,
                        help="Cellpose channels: cytoplasm,nucleus (0 = gray, 1 = R, 2 = G, 3 = B).")(func)


#: Training option name -> ``TrainConfig`` field (the checks of every value are TrainConfig's).
_TRAINING_FIELDS = {"channels": "channels", "sgd": "sgd", "learning_rate": "learning_rate",
                    "weight_decay": "weight_decay", "epochs": "n_epochs", "save_every": "save_every",
                    "bsize": "bsize", "batch_size": "batch_size", "nimg_per_epoch": "nimg_per_epoch",
                    "seed": "seed", "min_train_masks": "min_train_masks", "engine": "engine",
                    "retain": "retain", "retain_weight": "retain_weight", "onednn": "onednn"}


def training_options(func):
    """The training settings, passed to the command as one ``config`` (a ``TrainConfig``) plus ``resume``.

    The paper's defaults (Sec. IV.D): channels 0,0, SGD, lr 0.1, wd 1e-4, 500 epochs, checkpoint every 50.
    """

    @functools.wraps(func)
    @user_errors  # TrainConfig rejects bad values with an InputError: one line, exit 1
    def with_config(*args, **kwargs):
        from dqtool.segmentation.train import TrainConfig

        config = TrainConfig(**{field: kwargs.pop(name) for name, field in _TRAINING_FIELDS.items()})
        return func(*args, config=config, **kwargs)

    options = [
        channels_option,
        click.option("--sgd/--adamw", default=True, show_default=True, help="Optimiser."),
        click.option("--learning-rate", type=float, default=0.1, show_default=True),
        click.option("--weight-decay", type=float, default=1e-4, show_default=True),
        click.option("--epochs", type=int, default=500, show_default=True),
        click.option("--save-every", type=int, default=50, show_default=True,
                     help="Checkpoint every N epochs (resume point)."),
        click.option("--bsize", type=int, default=224, show_default=True,
                     help="Training crop size (a multiple of 16)."),
        click.option("--batch-size", type=int, default=8, show_default=True),
        click.option("--nimg-per-epoch", type=int, default=None, help="Patches drawn per epoch (default: all)."),
        seed_option(),
        click.option("--min-train-masks", type=int, default=5, show_default=True,
                     help="Drop patches with fewer masks (reported)."),
        click.option("--resume", is_flag=True, help="Continue a killed run from its last checkpoint."),
        click.option("--retain", type=LazyChoice("dqtool.segmentation.retention:RETAIN"), default="none",
                     show_default=True,
                     help="Keep what the --init model knew without its data: l2sp pulls the weights towards it, "
                          "lwf matches its outputs on the new patches."),
        click.option("--retain-weight", type=float, default=None,
                     help="W of the --retain term [default: 0.01 for l2sp, 1 for lwf]."),
        click.option("--onednn", is_flag=True,
                     help="On the CPU, train with oneDNN's convolutions: ~1.6x faster a step on one thread, but the "
                          "weights then depend on the number of torch threads (set OMP_NUM_THREADS to repeat a run)."),
        click.option("--engine", type=LazyChoice("dqtool.segmentation.train:ENGINES"), default="dqtool",
                     show_default=True,
                     help="dqtool: train_seg's loop step for step (progress, resume, seeds); train_seg: "
                          "cellpose.train.train_seg itself (same model for seed 0; no resume)."),
    ]
    for option in reversed(options):
        with_config = option(with_config)
    return with_config


def cluster_options(func):
    """``--workers N`` / ``--scheduler ADDRESS``: run the command's independent tasks on Dask.

    The command receives ``cluster`` (a :class:`dqtool.common.cluster.Cluster`; ``Cluster()`` is the serial
    path, where Dask is never imported).
    """
    func = click.option("--scheduler", default=None, metavar="ADDRESS",
                        help="Run the tasks on an existing Dask cluster (e.g. tcp://host:8786, from `dask scheduler` "
                             "or dask-jobqueue).")(func)
    func = click.option("--workers", type=int, default=None, metavar="N",
                        help="Run the tasks on a local Dask cluster of N single-threaded worker processes.")(func)

    @functools.wraps(func)
    def wrapper(*args, workers=None, scheduler=None, **kwargs):
        from dqtool.common.cluster import Cluster

        try:
            cluster = Cluster(workers=workers, scheduler=scheduler)
        except InputError as exc:
            raise click.UsageError(str(exc)) from None
        try:
            cluster.probe()  # a wrong --scheduler stops here, before the command loads its libraries
        except InputError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        return func(*args, cluster=cluster, **kwargs)

    return wrapper


def train_resources_option(func):
    """``--train-resources NAME=AMOUNT``: Dask worker resources every training of a study asks for.

    The command receives ``train_resources`` (the text, or None); it needs ``--scheduler`` (workers
    started with ``dask worker --resources``), since a ``--workers`` cluster offers none.
    """
    func = click.option("--train-resources", default=None, metavar="NAME=N",
                        help="With --scheduler: Dask worker resources each training asks for, e.g. GPU=1, so a "
                             "worker started with `dask worker ADDRESS --resources GPU=1` runs one training at a "
                             "time (default: any worker, no resources).")(func)

    @functools.wraps(func)
    def wrapper(*args, train_resources=None, **kwargs):
        if train_resources is not None:
            from dqtool.studies.trainings import parse_resources

            try:
                parse_resources(train_resources)
            except InputError as exc:
                raise click.UsageError(str(exc)) from None
            if not (kwargs.get("cluster") is not None and kwargs["cluster"].scheduler):
                raise click.UsageError("--train-resources needs --scheduler (workers started with "
                                       "`dask worker ADDRESS --resources NAME=N`); a --workers cluster has none")
        return func(*args, train_resources=train_resources, **kwargs)

    return wrapper
