"""Cellpose model files: the one place that decides what a model file is, loads it, and builds a network.

A dqtool model is a bare Cellpose 3 state dict (``CPnet``, 2 input channels), the file Cellpose's own
``train_seg`` and GUI write, loadable with ``CellposeModel(pretrained_model=PATH)``. Paths are checked
before Cellpose sees them: a missing path would make Cellpose download a builtin model, and dqtool never
downloads anything. :func:`discover_models` lists the model files of a bank folder and says why it
passes over anything else; files dqtool writes beside a model (``MODEL.json``, ``MODEL_losses.csv``,
``MODEL_loss.png``, ``MODEL_checkpoints/``) are passed over silently.
"""

from __future__ import annotations

import os
from pathlib import Path

from dqtool.common.errors import InputError

#: Input channels of every Cellpose 3 network (cytoplasm + nucleus).
CELLPOSE_NCHAN = 2


class IncompatibleModel(InputError):
    """A Cellpose 3 model file whose network dqtool cannot run as it is (other input channels or sizes)."""


def check_model_path(model: str | os.PathLike) -> Path:
    """Return ``model`` as an existing file path, or raise: never lets Cellpose fall back to a download."""
    path = Path(model).expanduser()
    if not path.exists():
        raise InputError(f"model not found: {model} (expected a Cellpose model file; dqtool never downloads "
                         "builtin models such as cyto3)")
    if path.is_dir():
        raise InputError(f"model {model}: is a folder, expected a Cellpose model file")
    return path.resolve()


def load_state_dict(model: str | os.PathLike) -> dict:
    """Read and validate a Cellpose 3 state dict (keys and shapes of a default ``CPnet``)."""
    import torch

    path = check_model_path(model)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"model {model}: not a Cellpose model (cannot be read as a torch state dict: "
                         f"{type(exc).__name__})") from exc
    if not isinstance(state, dict) or not state:
        raise InputError(f"model {model}: not a Cellpose model (expected a state dict of tensors)")
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    if "W2" in state:
        raise InputError(f"model {model}: a Cellpose 4 (SAM) model; dqtool trains the Cellpose 3 network")
    reference = _new_net().state_dict()
    missing = [k for k in reference if k not in state]
    if missing:
        raise InputError(f"model {model}: not a Cellpose 3 model ({len(missing)} network weights missing, "
                         f"e.g. {missing[0]!r})")
    first = "downsample.down.res_down_0.conv.conv_0.2.weight"
    if first in state and tuple(state[first].shape[1:2]) != (CELLPOSE_NCHAN,):
        raise IncompatibleModel(f"model {model}: expects {tuple(state[first].shape)[1]} input channels, dqtool "
                         f"trains {CELLPOSE_NCHAN}-channel Cellpose models")
    for k, v in reference.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise IncompatibleModel(f"model {model}: weight {k!r} has shape {tuple(state[k].shape)}, a Cellpose 3 "
                             f"network has {tuple(v.shape)}")
    return state


def sidecar_paths(model: str | os.PathLike) -> dict[str, Path]:
    """The files dqtool writes beside a model ``MODEL``: its record, losses, loss plot and checkpoints."""
    model = Path(model)
    return {"json": Path(f"{model}.json"), "csv": Path(f"{model}_losses.csv"),
            "png": Path(f"{model}_loss.png"), "checkpoints": Path(f"{model}_checkpoints")}


def model_file_problem(path: str | os.PathLike) -> str | None:
    """None when ``path`` is a Cellpose 3 model file, else why not.

    The test is :func:`load_state_dict`'s: a torch state dict holding every weight of a Cellpose 3
    ``CPnet``. A model with other input channels or layer sizes is still a model file (its use fails
    later with :class:`IncompatibleModel`'s reason, so a bank reports it as failed, not as noise).
    """
    try:
        load_state_dict(path)
    except IncompatibleModel:
        return None
    except InputError as exc:
        return str(exc)
    return None


def discover_models(models_dir: str | os.PathLike) -> tuple[list[Path], list[tuple[str, str]]]:
    """Model files in ``models_dir`` (sorted) and the (file, reason) of every other file.

    A file is a model when :func:`load_state_dict` accepts it. Cellpose's ``train_seg`` writes
    extension-less files under ``<save_path>/models/``, which is searched too; the GUI and dqtool may add
    ``.pth``. What dqtool writes beside a model (:func:`sidecar_paths`) and hidden files are passed over
    without a word; every other file that is not a model is reported with the reason.
    """
    root = Path(models_dir)
    if not root.exists():
        raise FileNotFoundError(f"{models_dir}: no such folder")
    if not root.is_dir():
        raise InputError(f"{models_dir}: expected a folder of Cellpose model files, got a file")
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    sidecars = {side for p in entries if p.is_file() for side in sidecar_paths(p).values()}
    models, skipped = [], []
    for path in entries:
        if path in sidecars:
            continue
        if path.is_dir():
            sub = path / "models"  # train_seg's layout: <save_path>/models/<name>
            if sub.is_dir():
                m, s = discover_models(sub)
                models += m
                skipped += s
            continue
        reason = model_file_problem(path)
        if reason is None:
            models.append(path)
        else:
            skipped.append((str(path), reason.removeprefix(f"model {path}: ")))
    return models, skipped


def _new_net():
    """A fresh Cellpose 3 network on the CPU with MKL-DNN off (weights from torch's current RNG)."""
    from cellpose.resnet_torch import CPnet

    return CPnet([CELLPOSE_NCHAN, 32, 64, 128, 256], 3, sz=3, mkldnn=False, max_pool=True, diam_mean=30.0)


def build_net(init: str | os.PathLike | None = None):
    """The network to train: from ``init`` (a checked Cellpose model file) or from scratch.

    Built through ``CellposeModel(gpu=False, pretrained_model=str|None, model_type=None, mkldnn=False)``
    so the weights load exactly as Cellpose loads them.
    """
    import torch
    from cellpose.models import CellposeModel

    if init is not None:
        load_state_dict(init)  # validates; raises a clear error before Cellpose sees the path
        model = CellposeModel(gpu=False, pretrained_model=str(check_model_path(init)), model_type=None,
                              mkldnn=False, device=torch.device("cpu"))
    else:
        model = CellposeModel(gpu=False, pretrained_model=None, model_type=None, mkldnn=False,
                              device=torch.device("cpu"))
    net = model.net
    net.mkldnn = False
    return net
