"""Train Cellpose (3.1.1 line) on patches from a dqtool patch cache.

The epoch loop is Cellpose's own ``cellpose.train.train_seg`` loop, run here step for step with the
same pieces (``dynamics.labels_to_flows``, ``transforms.random_rotate_and_resize``, ``_loss_fn_seg``,
the same optimiser settings and learning-rate schedule), because ``train_seg`` itself offers no hook
for a progress bar, seeding or resuming. ``tests/test_training.py`` proves the two loops give the same
weights, bit for bit, for the same data and seed 0. ``TrainConfig(engine="train_seg")`` (``--engine
train_seg``) calls ``train_seg`` itself instead, for labs that want Cellpose's function literally; it gives
the same model for seed 0 (tested) but cannot resume, show a per-epoch bar or seed numpy's epoch draws.

What dqtool adds (the Cellpose traps of REFERENCE.md section 6):

* seeding: torch is seeded before the network is built; numpy is seeded per epoch with
  ``epoch_seed(seed, epoch)`` (seed 0 reproduces ``train_seg``'s ``np.random.seed(epoch)``); the caller's
  global numpy / torch RNG states are restored afterwards;
* MKL-DNN is off while training on the CPU (the network's MKL-DNN layout always; torch's oneDNN convolutions
  unless ``onednn=True``, faster but not the same bytes on another number of threads);
* model paths are checked before Cellpose sees them (a missing path would make Cellpose download
  cyto3), passed as ``str``, and builtin names are refused: nothing here downloads;
* labels are renumbered on copies; the patches ``min_train_masks`` drops are counted and reported;
* a warning when ``n_epochs`` is within the 10-epoch learning-rate warm-up;
* a progress bar over epochs with the current loss;
* a checkpoint every ``save_every`` epochs, from which ``resume=True`` continues after a kill;
* ``retain`` (``--retain l2sp|lwf``): a source-free retention term added to the loss when finetuning from
  ``init`` (:mod:`dqtool.segmentation.retention`).

Resume restores the network weights, the optimiser state (SGD momentum / AdamW moments), the epoch
count, the learning-rate schedule and the per-epoch numpy seeds, so a resumed run ends with the same
weights as an uninterrupted one. What cannot be restored: the epochs after the last checkpoint are
trained again (their work is lost), and the progress bar's timing starts afresh.

Files beside the model ``MODEL`` (a bare Cellpose state dict, loadable with
``CellposeModel(pretrained_model=MODEL)`` and the Cellpose GUI):
``MODEL.json`` (config, data provenance, per-epoch losses), ``MODEL_losses.csv``, ``MODEL_loss.png``
and ``MODEL_checkpoints/`` (``epoch_NNNN`` Cellpose models, and ``resume.pt`` until the run finishes).
"""

from __future__ import annotations

import contextlib
import collections.abc
import dataclasses
import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from dqtool.common.figures import pyplot, save_figure
from dqtool.common.errors import InputError
from dqtool.common.progress import bar
from dqtool.common.files import atomic_write, atomic_write_text, file_sha256
from dqtool.common.outputs import kill_point, writing
from dqtool.segmentation.model_files import build_net, check_model_path, load_state_dict, sidecar_paths
from dqtool.segmentation.retention import Retention, check_retain
from dqtool.common.tables import write_json
from dqtool.selection.subsets import Subset

#: Cellpose's learning rate ramps up linearly over this many epochs (``train_seg``).
WARMUP_EPOCHS = 10
#: ``dqtool``: train_seg's loop run here step for step (progress bar, any seed, resume);
#: ``train_seg``: a call to ``cellpose.train.train_seg`` itself (see ``_train_with_train_seg``).
ENGINES = ("dqtool", "train_seg")


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; the defaults are the paper's (Sec. IV.D): grayscale, SGD, lr 0.1, wd 1e-4,
    500 epochs, a checkpoint every 50 epochs."""

    channels: tuple[int, int] = (0, 0)
    sgd: bool = True
    learning_rate: float = 0.1
    weight_decay: float = 1e-4
    momentum: float = 0.9
    n_epochs: int = 500
    save_every: int = 50
    bsize: int = 224
    batch_size: int = 8
    nimg_per_epoch: int | None = None
    seed: int = 0
    min_train_masks: int = 5
    engine: str = "dqtool"
    retain: str = "none"
    retain_weight: float | None = None
    onednn: bool = False

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise InputError(f"engine = {self.engine!r}: expected one of {', '.join(ENGINES)}")
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if len(self.channels) != 2 or not all(0 <= c <= 3 for c in self.channels):
            raise InputError(f"channels {list(self.channels)}: expected two values in 0..3 "
                             "(0 = gray, 1 = red, 2 = green, 3 = blue)")
        for name in ("n_epochs", "save_every", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} = {getattr(self, name)}: expected a positive integer")
        if self.bsize < 16 or self.bsize % 16:
            raise InputError(f"bsize = {self.bsize}: expected a multiple of 16 (the network halves it 4 times)")
        if not self.learning_rate > 0:
            raise InputError(f"learning_rate = {self.learning_rate}: expected > 0")
        if self.weight_decay < 0:
            raise InputError(f"weight_decay = {self.weight_decay}: expected >= 0")
        if self.nimg_per_epoch is not None and self.nimg_per_epoch < 1:
            raise InputError(f"nimg_per_epoch = {self.nimg_per_epoch}: expected a positive integer")
        if self.min_train_masks < 0:
            raise InputError(f"min_train_masks = {self.min_train_masks}: expected >= 0")
        check_retain(self.retain, self.retain_weight)  # a bad method or W is refused here
        if self.retain != "none" and self.engine != "dqtool":
            raise InputError(f"retain {self.retain!r} needs engine 'dqtool' (train_seg's loss cannot be extended)")

    @property
    def retain_w(self) -> float:
        """The weight W of the retention term: ``retain_weight``, or the method's default when it is None."""
        return check_retain(self.retain, self.retain_weight)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["retain_weight"] = self.retain_w if self.retain != "none" else None  # W given or defaulted: one identity
        d["channels"] = list(self.channels)
        if d["engine"] == "dqtool":  # the default stays out, so runs recorded before the option keep their identity
            del d["engine"]
        if d["retain"] == "none":  # likewise
            del d["retain"], d["retain_weight"]
        if not d["onednn"]:  # likewise
            del d["onednn"]
        return d


@dataclass
class TrainResult:
    """What a training run produced; ``to_dict()`` is the sidecar JSON."""

    model: Path
    config: dict
    provenance: dict
    train_losses: list[float]
    learning_rates: list[float]
    n_patches: int
    n_dropped: int
    diam_labels: float
    seconds: float
    resumed_from: int = 0
    warnings: list[str] = field(default_factory=list)
    complete: bool = True
    grad_norms: list[float] = field(default_factory=list)  # per epoch (dqtool engine): see run_epochs

    def to_dict(self) -> dict:
        return {"model": str(self.model), "complete": self.complete, "config": self.config,
                "provenance": self.provenance, "n_patches": self.n_patches, "n_dropped": self.n_dropped,
                "diam_labels": self.diam_labels, "seconds": self.seconds, "resumed_from": self.resumed_from,
                "warnings": self.warnings, "train_losses": self.train_losses,
                "learning_rates": self.learning_rates, "grad_norms": self.grad_norms}


# --------------------------------------------------------------------------------------------------
# schedule and seeds


def learning_rate_schedule(learning_rate: float, n_epochs: int) -> np.ndarray:
    """Cellpose 3.1.1's per-epoch learning rate (``train_seg``), length ``n_epochs``.

    LR[e] = learning_rate * e / 9 for e < 10 (linear warm-up from 0), then ``learning_rate``;
    for n_epochs > 300 the last 100 epochs are 10 steps of 10 epochs, each half the previous;
    for 100 < n_epochs <= 300 the last 50 epochs are 10 steps of 5 epochs, halving likewise.
    """
    lr = np.linspace(0, learning_rate, WARMUP_EPOCHS)
    lr = np.append(lr, learning_rate * np.ones(max(0, n_epochs - WARMUP_EPOCHS)))
    if n_epochs > 100:
        steps, width = (100, 10) if n_epochs > 300 else (50, 5)
        lr = lr[:-steps]
        for _ in range(10):
            lr = np.append(lr, lr[-1] / 2 * np.ones(width))
    return lr[:n_epochs]


def epoch_seed(seed: int, epoch: int) -> int:
    """The numpy seed of one epoch: ``epoch`` for seed 0 (as ``train_seg`` does), else a
    ``SeedSequence([seed, epoch])`` draw, so different seeds give independent epoch streams."""
    if seed == 0:
        return int(epoch)
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


@contextlib.contextmanager
def _rng_scope(seed: int):
    """Seed torch for this block and restore the caller's numpy and torch RNG states afterwards."""
    import torch

    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        try:
            yield
        finally:
            np.random.set_state(np_state)


def _read_resume(resume_file: Path, identity) -> dict:
    """The resume checkpoint of this run, or an InputError (truncated, corrupt, another config)."""
    import torch

    try:
        state = torch.load(str(resume_file), map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError... for a bad file
        raise InputError(f"{resume_file}: cannot read the resume checkpoint (truncated or corrupt: "
                         f"{type(exc).__name__}); delete it to train from the start") from exc
    if not isinstance(state, dict) or state.get("identity") != identity:
        raise InputError(f"{resume_file}: checkpoint is from a different config; cannot resume")
    return state


@contextlib.contextmanager
def _cpu_convolutions(onednn: bool):
    """torch's native CPU convolutions while training (``onednn=False``), or oneDNN's (``onednn=True``).

    The network's own ``mkldnn`` attribute (Cellpose's MKL-DNN tensor layout) is off either way. The switch here
    is the backend torch uses for dense tensors. Measured on the 2-core VM, one SGD step of 8 crops of 64 px
    on one thread: native 1.41 s, oneDNN 0.87 s. The native path gives the same weights on any number of
    torch threads (1 or 2 threads: same bytes); oneDNN's do not (its reductions split by thread), so it is
    opt-in (``--onednn``), for runs that fix the thread count (the demo runs every training on one thread).
    """
    import torch

    from dqtool.common.notices import known_notices_hidden

    with known_notices_hidden(), torch.backends.mkldnn.flags(enabled=bool(onednn)):
        yield


# --------------------------------------------------------------------------------------------------
# data


def check_channels(channels: Sequence[int], n_channels: int, where: str) -> None:
    """A gray cache (1 channel) takes only channels [0, 0]; RGB takes 0..3 for both."""
    channels = list(channels)
    if n_channels == 1 and channels != [0, 0]:
        raise InputError(f"{where}: patches are grayscale (1 channel) but channels = {channels}; "
                         "use channels 0,0 (or build the cache with colour channels)")


class OnDemand(collections.abc.Sequence):
    """``[make(i) for i in range(n)]``, each item computed on its first use and then kept.

    Cellpose's ``train_seg`` normalises every image and computes the flows of every label up front; an epoch
    of ``nimg_per_epoch`` patches touches only some of them (100 steps of 8 use at most 800 of a cache's
    thousands), and each item depends on its own patch alone, so computing it when first drawn gives the same
    arrays, in a fraction of the time and memory (4 float32 planes a patch for the flows).
    """

    def __init__(self, make, n: int):
        self._make, self._n, self._done = make, int(n), {}

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        i = int(i)
        if not 0 <= i < self._n:
            raise IndexError(i)
        if i not in self._done:
            self._done[i] = self._make(i)
        return self._done[i]

    @property
    def computed(self) -> int:
        """How many items have been computed so far."""
        return len(self._done)


class TrainingFlows(OnDemand):
    """The flows of the kept labels (``labels_to_flows`` of a renumbered int64 copy, one label image at a time,
    as ``labels_to_flows`` treats each image of its list), with the label diameters ``run_epochs`` needs for
    every patch read from the labels themselves (:meth:`diameters`: the same counts, so the same numbers)."""

    def __init__(self, labels: Sequence[np.ndarray]):
        import torch
        from cellpose import dynamics

        def make(i):
            return dynamics.labels_to_flows([np.array(labels[i], dtype=np.int64, copy=True)],
                                            device=torch.device("cpu"))[0]

        super().__init__(make, len(labels))
        self._labels = labels

    def diameters(self) -> np.ndarray:
        """``utils.diameters(flows[i][0])[0]`` for every i, from the labels (their renumbering keeps the sizes)."""
        from cellpose import utils

        return np.array([utils.diameters(np.asarray(lb))[0] for lb in self._labels], dtype=np.float64)


def prepare_patches(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], channels: Sequence[int],
                    min_train_masks: int):
    """Cellpose training inputs from cache patches.

    Returns (data, flows, keep, n_masks): images as Cellpose's ``_reshape_norm`` makes them for
    ``train_seg`` (channels selected, (2, S, S) float32, per-patch 1-99 percentile normalisation), flows
    from ``labels_to_flows`` computed on renumbered *copies* of the labels (both :class:`OnDemand`: computed
    for a patch when an epoch first draws it), and the patch positions kept (those with at least
    ``min_train_masks`` masks, as ``train_seg`` keeps them).
    """
    from cellpose import models
    from cellpose.train import _reshape_norm

    images = [np.asarray(im) for im in images]  # patches may come from caches of different sizes
    n_masks = np.array([np.unique(np.asarray(lb)[np.asarray(lb) > 0]).size for lb in labels], dtype=np.int64)
    keep = np.nonzero(n_masks >= max(min_train_masks, 1))[0]
    if keep.size == 0:
        return [], [], keep, n_masks
    norm = {**models.normalize_default, "normalize": True}  # a copy: Cellpose mutates its module default

    def normalised(j):
        im = images[keep[j]]
        im = im[..., 0] if im.ndim == 3 and im.shape[-1] == 1 else im
        rgb = im.ndim == 3
        (d,) = _reshape_norm([im], channels=list(channels), channel_axis=2 if rgb else None,
                             normalize_params=norm)
        return np.ascontiguousarray(d, dtype=np.float32)

    return OnDemand(normalised, keep.size), TrainingFlows([labels[i] for i in keep]), keep, n_masks


# --------------------------------------------------------------------------------------------------
# the loop


def _optimizer(net, config: TrainConfig):
    import torch

    if config.sgd:
        return torch.optim.SGD(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                               momentum=config.momentum)
    return torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)


def run_epochs(net, data, flows, config: TrainConfig, start_epoch: int = 0, optimizer=None,
               train_losses: np.ndarray | None = None, on_epoch=None, quiet: bool = True, retention=None,
               grad_norms: np.ndarray | None = None):
    """Cellpose's ``train_seg`` epoch loop over prepared ``data``/``flows``, epochs start..n_epochs-1.

    Per epoch e: numpy seeded with ``epoch_seed(seed, e)``, a permutation (or ``nimg_per_epoch`` draws),
    lr = ``learning_rate_schedule(...)[e]``, batches augmented by ``random_rotate_and_resize`` (scale
    range 0.5, rescaled by diam / diam_mean), loss = MSE(5 * flows, y[:2]) / 2 + BCE(y[2], cellprob > .5)
    (Cellpose's ``_loss_fn_seg``), plus ``retention(net, x, y)`` when given (:mod:`dqtool.segmentation.retention`:
    L2-SP or LwF, source-free); loss[e] = sum over batches of loss * len(batch) / nimg_per_epoch.
    ``on_epoch(e, optimizer, train_losses)`` runs after each epoch (checkpoints, progress). ``grad_norms`` (an
    array of n_epochs, filled in place): per epoch e, the mean over its SGD steps of the global gradient norm
    ||g|| = sqrt(sum over every trainable weight of g^2), g the gradient of that step's whole loss (retention term
    included) before the optimiser's step; read only, so the weights do not depend on whether it is recorded.
    """
    import torch
    from cellpose import transforms, utils
    from cellpose.train import _loss_fn_seg

    device = torch.device("cpu")
    nimg = len(data)
    diam_train = (flows.diameters() if isinstance(flows, TrainingFlows)
                  else np.array([utils.diameters(f[0])[0] for f in flows], dtype=np.float64))
    diam_train[diam_train < 5] = 5.0
    net.diam_labels.data = torch.Tensor([diam_train.mean()]).to(device)
    nimg_per_epoch = nimg if config.nimg_per_epoch is None else config.nimg_per_epoch
    probs = np.full(nimg, 1.0 / nimg)
    lr_schedule = learning_rate_schedule(config.learning_rate, config.n_epochs)
    optimizer = optimizer or _optimizer(net, config)
    losses = np.zeros(config.n_epochs) if train_losses is None else train_losses
    progress = bar(config.n_epochs, desc="train", quiet=quiet, unit="epoch", initial=start_epoch)
    try:
        for iepoch in range(start_epoch, config.n_epochs):
            np.random.seed(epoch_seed(config.seed, iepoch))
            if nimg != nimg_per_epoch:
                rperm = np.random.choice(np.arange(0, nimg), size=(nimg_per_epoch,), p=probs)
            else:
                rperm = np.random.permutation(np.arange(0, nimg))
            for group in optimizer.param_groups:
                group["lr"] = lr_schedule[iepoch]
            net.train()
            losses[iepoch] = 0.0
            norms = []
            for k in range(0, nimg_per_epoch, config.batch_size):
                inds = rperm[k:k + config.batch_size]
                imgs = [data[i] for i in inds]
                lbls = [flows[i][1:] for i in inds]
                rsc = diam_train[inds] / net.diam_mean.item()
                imgi, lbl = transforms.random_rotate_and_resize(imgs, Y=lbls, rescale=rsc, scale_range=0.5,
                                                                xy=(config.bsize, config.bsize))[:2]
                x = torch.from_numpy(imgi).to(device)
                y = net(x)[0]
                loss = _loss_fn_seg(lbl, y, device)
                if retention is not None:
                    loss = loss + retention(net, x, y)
                optimizer.zero_grad()
                loss.backward()
                with torch.no_grad():
                    norms.append(float(torch.linalg.vector_norm(torch.stack(
                        [torch.linalg.vector_norm(p.grad) for p in net.parameters() if p.grad is not None]))))
                optimizer.step()
                losses[iepoch] += loss.item() * len(imgi)
            losses[iepoch] /= nimg_per_epoch
            if grad_norms is not None:
                grad_norms[iepoch] = float(np.mean(norms))
            progress.update(1)
            progress.set_postfix(loss=f"{losses[iepoch]:.4f}", lr=f"{lr_schedule[iepoch]:.4g}")
            if on_epoch is not None:
                on_epoch(iepoch, optimizer, losses)
    finally:
        progress.close()
    return losses, lr_schedule, optimizer


# --------------------------------------------------------------------------------------------------
# files beside the model


def _identity(config: TrainConfig, provenance: dict) -> str:
    blob = json.dumps({"config": config.to_dict(), "provenance": provenance}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write_losses(paths: dict, losses: Sequence[float], lrs: Sequence[float], grad_norms: Sequence[float] = ()) -> None:
    """``MODEL_losses.csv`` (epoch, learning rate, loss, and the gradient norm where recorded) and the loss plot."""
    if len(grad_norms) == len(losses) and len(losses):
        lines = ["epoch,learning_rate,train_loss,grad_norm"]
        lines += [f"{e},{lr:.8g},{loss:.8g},{g:.8g}" for e, (lr, loss, g) in enumerate(zip(lrs, losses, grad_norms))]
    else:
        lines = ["epoch,learning_rate,train_loss"]
        lines += [f"{e},{lr:.8g},{loss:.8g}" for e, (lr, loss) in enumerate(zip(lrs, losses))]
    atomic_write_text(paths["csv"], "\n".join(lines) + "\n")
    plot_losses(losses, paths["png"])


def plot_losses(losses: Sequence[float], path: str | os.PathLike, title: str = "Cellpose training loss") -> Path:
    """Loss per epoch as a PNG (log scale when all losses are positive)."""
    plt = pyplot()

    path = Path(path)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(np.arange(len(losses)), losses, lw=1.2)
    if len(losses) and min(losses) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def _save_state(path: Path, obj) -> None:
    import torch

    with atomic_write(path) as tmp:
        torch.save(obj, str(tmp))


@contextlib.contextmanager
def _quiet_stderr(quiet: bool):
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        yield


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# public entry points


def train_patches(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], out: str | os.PathLike, config: TrainConfig,
                  init: str | os.PathLike | None = None, provenance: dict | None = None, resume: bool = False,
                  stop_after: int | None = None, quiet: bool = False) -> TrainResult:
    """Train on in-memory patches (uint8 (n, S, S, C), labels (n, S, S)) and write the model to ``out``.

    ``provenance`` describes where the patches came from (kept in the JSON and part of the run's
    identity). ``stop_after`` ends the run after that many epochs (as a kill would; used by tests).
    The model is an output of :func:`dqtool.common.outputs.writing`: refused if it is an input or a file
    dqtool did not write, locked against a second writer, OS faults one line.
    """
    out = Path(out)
    if config.retain != "none" and init is None:
        raise InputError(f"{out}: --retain {config.retain} keeps what the starting model knew, and there is none: "
                         "give --init MODEL (or train without --retain)")
    out.parent.mkdir(parents=True, exist_ok=True)
    inputs = [init, (provenance or {}).get("cache")]
    with writing(out, "train", inputs):  # the lock covers the files beside the model too
        return _train_patches(images, labels, out, config, init, provenance, resume, stop_after, quiet)


def _train_patches(images, labels, out: Path, config: TrainConfig, init, provenance, resume, stop_after,
                   quiet) -> TrainResult:
    paths = sidecar_paths(out)
    provenance = dict(provenance or {})
    if init is not None:
        load_state_dict(init)  # a bad model fails here, before anything is written
        provenance["init"] = {"path": str(check_model_path(init)), "sha256": file_sha256(check_model_path(init))[:16]}
    else:
        provenance["init"] = None
    identity = _identity(config, provenance)
    found = _check_existing(paths, out, identity, resume)
    if found is not None:
        _say(f"{out}: already trained with this config; reusing it", quiet)
        return found

    warns = []
    if config.n_epochs <= WARMUP_EPOCHS:
        warns.append(f"n_epochs = {config.n_epochs}: Cellpose's learning rate warms up from 0 over the first "
                     f"{WARMUP_EPOCHS} epochs, so it never reaches {config.learning_rate} and little is learnt; "
                     f"use more than {WARMUP_EPOCHS} epochs")
    if len(images) == 0:
        raise InputError(f"{provenance.get('cache', out)}: the training set is empty (no patches selected)")
    with _quiet_stderr(quiet):  # Cellpose's own messages while the patches are checked
        data, flows, keep, n_masks = prepare_patches(images, labels, config.channels, config.min_train_masks)
    n_dropped = len(images) - keep.size
    where = provenance.get("cache", str(out))
    if int(n_masks.sum()) == 0:
        raise InputError(f"{where}: the training set has no masks ({len(images)} patches, all background)")
    if keep.size == 0:
        raise InputError(f"{where}: all {len(images)} patches have fewer than min_train_masks = "
                         f"{config.min_train_masks} masks (most has {int(n_masks.max())}); lower --min-train-masks")
    if n_dropped:
        warns.append(f"min_train_masks = {config.min_train_masks} dropped {n_dropped} of {len(images)} patches "
                     f"(fewer masks than that); training on {keep.size}")
    for w in warns:
        warnings.warn(w, stacklevel=3)  # the caller of train_patches, through its writing() wrapper
        _say(f"warning: {w}", quiet)

    out.parent.mkdir(parents=True, exist_ok=True)
    paths["checkpoints"].mkdir(exist_ok=True)
    resume_file = paths["checkpoints"] / "resume.pt"
    # read before the record is rewritten: a bad checkpoint is refused with every file as it was
    resume_state = _read_resume(resume_file, identity) if resume and resume_file.exists() else None
    record = {"model": str(out), "complete": False, "identity": identity, "config": config.to_dict(),
              "provenance": provenance, "n_patches": int(keep.size), "n_dropped": int(n_dropped),
              "dropped_positions": [int(i) for i in np.setdiff1d(np.arange(len(images)), keep)],
              "warnings": warns}
    write_json(paths["json"], record)

    t0 = time.perf_counter()

    if config.engine == "train_seg":
        if stop_after is not None:
            raise ValueError("stop_after needs engine 'dqtool' (train_seg cannot be stopped between epochs)")
        if resume and resume_file.exists():
            _say(f"{out}: engine train_seg cannot resume (train_seg always starts at epoch 0); training from the "
                 "start", quiet)
        with _rng_scope(config.seed), _cpu_convolutions(config.onednn):
            net = build_net(init)
            losses, lrs = _train_with_train_seg(net, images, labels, out, paths, config, quiet)
            diam_labels = float(net.diam_labels.item())
        result = TrainResult(model=out, config=config.to_dict(), provenance=provenance,
                             train_losses=[float(x) for x in losses], learning_rates=[float(x) for x in lrs],
                             n_patches=int(keep.size), n_dropped=int(n_dropped), diam_labels=diam_labels,
                             seconds=time.perf_counter() - t0, resumed_from=0, warnings=warns)
        _write_losses(paths, result.train_losses, result.learning_rates)
        write_json(paths["json"], {**record, **result.to_dict(), "identity": identity})
        return result

    with _rng_scope(config.seed), _cpu_convolutions(config.onednn):
        net = build_net(init)
        optimizer = _optimizer(net, config)
        retention = None if config.retain == "none" else Retention(config.retain, config.retain_w, init)
        start, losses, norms = 0, np.zeros(config.n_epochs), np.full(config.n_epochs, np.nan)
        if resume_state is not None:
            state = resume_state
            net.load_state_dict(state["net"])
            optimizer.load_state_dict(state["optimizer"])
            start = int(state["epoch"])
            losses[:start] = state["train_losses"][:start]
            if "grad_norms" in state:  # checkpoints written before dqtool recorded them: NaN for those epochs
                norms[:start] = state["grad_norms"][:start]
            _say(f"resuming {out} at epoch {start} of {config.n_epochs}", quiet)

        def on_epoch(iepoch, opt, losses_now):
            done = iepoch + 1
            if done % config.save_every == 0 and done < config.n_epochs:
                net.save_model(str(paths["checkpoints"] / f"epoch_{done:04d}"))
                _save_state(resume_file, {"identity": identity, "epoch": done, "net": net.state_dict(),
                                          "optimizer": opt.state_dict(),
                                          "train_losses": np.array(losses_now[:done]),
                                          "grad_norms": np.array(norms[:done])})
                kill_point("train:checkpoint")
            if stop_after is not None and done >= stop_after and done < config.n_epochs:
                raise _Stopped(done)

        try:
            losses, lrs, _ = run_epochs(net, data, flows, config, start_epoch=start, optimizer=optimizer,
                                        train_losses=losses, on_epoch=on_epoch, quiet=quiet, retention=retention,
                                        grad_norms=norms)
        except _Stopped:
            return TrainResult(model=out, config=config.to_dict(), provenance=provenance, train_losses=[],
                               learning_rates=[], n_patches=int(keep.size), n_dropped=int(n_dropped),
                               diam_labels=float(net.diam_labels.item()), seconds=time.perf_counter() - t0,
                               resumed_from=start, warnings=warns, complete=False)
        with atomic_write(out) as tmp:
            net.save_model(str(tmp))
            kill_point("train:model")
        resume_file.unlink(missing_ok=True)  # finished: the epoch_NNNN checkpoints stay, the resume state goes
        diam_labels = float(net.diam_labels.item())

    result = TrainResult(model=out, config=config.to_dict(), provenance=provenance,
                         train_losses=[float(x) for x in losses], learning_rates=[float(x) for x in lrs],
                         n_patches=int(keep.size), n_dropped=int(n_dropped), diam_labels=diam_labels,
                         seconds=time.perf_counter() - t0, resumed_from=start, warnings=warns,
                         grad_norms=[float(x) for x in norms])
    _write_losses(paths, result.train_losses, result.learning_rates, result.grad_norms)
    write_json(paths["json"], {**record, **result.to_dict(), "identity": identity})
    return result


class _Stopped(Exception):
    pass


def _train_with_train_seg(net, images, labels, out: Path, paths: dict, config: TrainConfig, quiet: bool):
    """Train ``net`` with ``cellpose.train.train_seg`` itself; returns (per-epoch losses, learning rates).

    The patches go in as Cellpose takes in-memory data (images with the config's channels, label
    *copies*, ``normalize=True``): train_seg normalises, drops patches with fewer than
    ``min_train_masks`` masks and computes the flows itself. It saves into a temporary folder beside
    ``out`` (``save_each``: one file after epoch indices 50, 100, ... for ``save_every`` 50, moved to
    ``MODEL_checkpoints/epoch_NNNN`` with NNNN the epochs done); the
    final model is renamed onto ``out``. What this engine cannot do: resume (train_seg always starts at
    epoch 0 with its warm-up), seed numpy's epoch draws other than train_seg's own ``np.random.seed(epoch)``
    (``seed`` still sets the network's initial weights), and show a per-epoch bar (Cellpose logs every
    10 epochs, shown unless quiet).
    """
    import logging
    import shutil
    import tempfile

    from cellpose.train import train_seg

    data = [np.asarray(im) for im in images]
    data = [im[..., 0] if im.ndim == 3 and im.shape[-1] == 1 else im for im in data]
    rgb = data[0].ndim == 3
    logger = logging.getLogger("cellpose.train")
    handler, level = None, logger.level
    if not quiet:
        handler = logging.StreamHandler(sys.stderr)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.train_seg.", dir=out.parent))
    try:
        with _quiet_stderr(quiet):
            filename, losses, _ = train_seg(
                net, train_data=data, train_labels=[np.array(lb, dtype=np.int64, copy=True) for lb in labels],
                channels=list(config.channels), channel_axis=2 if rgb else None, normalize=True,
                SGD=config.sgd, learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                momentum=config.momentum, n_epochs=config.n_epochs, bsize=config.bsize,
                batch_size=config.batch_size, nimg_per_epoch=config.nimg_per_epoch,
                min_train_masks=config.min_train_masks, save_path=str(work), save_every=config.save_every,
                save_each=True, model_name="model")
        for ckpt in sorted((work / "models").glob("model_epoch_*")):
            epoch = int(ckpt.name.rsplit("_", 1)[1]) + 1  # train_seg names a save by the 0-based epoch index
            if 0 < epoch < config.n_epochs:
                os.replace(ckpt, paths["checkpoints"] / f"epoch_{epoch:04d}")
        os.replace(filename, out)
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            logger.setLevel(level)
        shutil.rmtree(work, ignore_errors=True)
    return np.asarray(losses, dtype=np.float64), learning_rate_schedule(config.learning_rate, config.n_epochs)


def _check_existing(paths: dict, out: Path, identity: str, resume: bool) -> TrainResult | None:
    """Refuse an output that holds a different run; return the finished run if it is this one."""
    if not paths["json"].exists():
        if out.exists() and not resume:
            raise InputError(f"{out}: exists and was not written by dqtool train; choose another --out")
        return None
    try:
        old = json.loads(paths["json"].read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{paths['json']}: unreadable training record ({exc}); delete it or choose another --out")
    if old.get("identity") != identity:
        raise InputError(f"{out}: already holds a model trained with a different config or data "
                         f"(see {paths['json']}); choose another --out or delete it")
    if old.get("complete") and out.exists():
        return TrainResult(model=out, config=old["config"], provenance=old["provenance"],
                           train_losses=old["train_losses"], learning_rates=old["learning_rates"],
                           n_patches=old["n_patches"], n_dropped=old["n_dropped"], diam_labels=old["diam_labels"],
                           seconds=old["seconds"], resumed_from=old.get("resumed_from", 0),
                           warnings=old.get("warnings", []), grad_norms=old.get("grad_norms", []))
    if not resume:
        raise InputError(f"{out}: a previous run with this config did not finish; pass --resume to continue "
                         "from its last checkpoint, or choose another --out")
    return None


def load_patches(cache_path: str | os.PathLike, indices: Sequence[int] | None = None):
    """(images, labels, provenance) of the selected patches of one cache (all patches when ``indices`` is None)."""
    from dqtool.data.cache import PatchCache

    with PatchCache(cache_path) as cache:
        if not cache.has_labels:
            raise InputError(f"{cache_path}: cache has no labels; training needs labelled patches")
        idx = np.arange(len(cache)) if indices is None else np.asarray(indices, dtype=np.int64)
        images = cache.images(idx)
        labels = cache.labels(idx)
        provenance = {"cache": str(Path(cache_path).resolve()), "cache_hash": cache.content_hash,
                      "n_channels": cache.n_channels, "n_selected": int(idx.size), "n_in_cache": len(cache),
                      "indices_sha256": hashlib.sha256(idx.astype(np.int64).tobytes()).hexdigest()[:16]}
    return images, labels, provenance


def _subset_provenance(subset: Subset, path: str | os.PathLike) -> dict:
    """What the model JSON records of its subset: the file, and the method, rate, bins and config it holds."""
    held = {"method": subset.method, "rate": subset.rate, "bins": subset.bins, "config": subset.config}
    return {"path": str(Path(path).resolve()),
            **{k: list(v) if isinstance(v, tuple) else v for k, v in held.items() if v is not None}}


def train(cache_path: str | os.PathLike, out: str | os.PathLike, subset: str | os.PathLike | None = None,
          init: str | os.PathLike | None = None, config: TrainConfig | None = None, resume: bool = False,
          stop_after: int | None = None, quiet: bool = False) -> TrainResult:
    """``dqtool train``: Cellpose on the (subset of the) cache's patches, written to ``out``."""
    config = config or TrainConfig()
    chosen = Subset.read(subset, cache=cache_path) if subset is not None else None
    images, labels, provenance = load_patches(cache_path, None if chosen is None else chosen.index_array())
    check_channels(config.channels, provenance["n_channels"], str(cache_path))
    if chosen is not None:
        provenance["subset"] = _subset_provenance(chosen, subset)
    return train_patches(images, labels, out, config, init=init, provenance=provenance, resume=resume,
                         stop_after=stop_after, quiet=quiet)
