"""Cellpose model files: the one place that decides what a model file is, loads it, and builds a network.

A dqtool model is a bare Cellpose 3 state dict (``CPnet``, 2 input channels), the file Cellpose's own
``train_seg`` and GUI write, loadable with ``CellposeModel(pretrained_model=PATH)``. Paths are checked
before Cellpose sees them: a missing path would make Cellpose download a builtin model, and dqtool never
downloads anything. :func:`discover_models` lists the model files of a bank folder and says why it
passes over anything else; files dqtool writes beside a model (``MODEL.json``, ``MODEL_losses.csv``,
``MODEL_loss.png``, ``MODEL_checkpoints/``) are passed over silently.

Cellpose's built-in models (``cyto3``, ``nuclei``, ...) are taken by name from Cellpose's model folder
(:func:`builtin_models`), as the files Cellpose itself would load there, and loaded with Cellpose's fixed
diameter and size model (:func:`load_cellpose_model`); a missing file is an error, never a download.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

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


def _is_training_record(path: Path) -> bool:
    """dqtool's ``MODEL.json`` of a training whose model file is not written yet (running or killed)."""
    if path.suffix != ".json" or not path.is_file():
        return False
    import json

    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and {"config", "provenance", "identity"} <= set(doc)


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
        if path in sidecars or _is_training_record(path):
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


# --------------------------------------------------------------------------------------------------
# Cellpose's built-in models, by name, from Cellpose's own model folder (never downloaded)
# --------------------------------------------------------------------------------------------------

#: Built-in names whose network is not a Cellpose 3 ``CPnet`` (a SegFormer backbone); dqtool cannot rank them.
TRANSFORMER_MODELS = ("transformer_cp3", "neurips_cellpose_transformer")


def builtin_model_dir() -> Path:
    """Cellpose's model folder: ``$CELLPOSE_LOCAL_MODELS_PATH``, else ``~/.cellpose/models``.

    Read at call time (Cellpose reads it once, at import), so a test or a user can point it elsewhere.
    """
    env = os.environ.get("CELLPOSE_LOCAL_MODELS_PATH")
    return Path(env).expanduser() if env else Path.home() / ".cellpose" / "models"


def builtin_names() -> tuple[str, ...]:
    """The built-in model names Cellpose 3 knows (``cellpose.models.MODEL_NAMES``) that dqtool can run."""
    from cellpose.models import MODEL_NAMES

    return tuple(dict.fromkeys(n for n in MODEL_NAMES if n not in TRANSFORMER_MODELS))


def builtin_weight_name(name: str) -> str:
    """The file Cellpose loads for built-in ``name`` (``cellpose.models.model_path``'s rule, index 0)."""
    return f"{name}torch_0" if name in ("cyto", "cyto2", "nuclei") else name


def builtin_size_name(name: str) -> str | None:
    """The size model file of built-in ``name`` (``cellpose.models.size_model_path``), or None if it has none."""
    if name == "cyto3":
        return "size_cyto3.npy"
    if name in ("cyto", "cyto2", "nuclei"):
        return f"size_{name}torch_0.npy"
    return None


def builtin_diameter(name: str) -> float:
    """Cellpose's ``diam_mean`` for a built-in model: 17 for nuclei, 30 for every other built-in."""
    return 17.0 if name == "nuclei" else 30.0


def _check_builtin_name(name: str) -> str:
    known = builtin_names()
    if name in known:
        return name
    if name in TRANSFORMER_MODELS:
        raise InputError(f"built-in model {name!r}: a transformer (SegFormer) network, not a Cellpose 3 CPnet; "
                         "dqtool runs CPnet models only")
    raise InputError(f"built-in model {name!r}: not a name Cellpose 3 knows; known: {', '.join(known)}")


def builtin_models(names: str | Sequence[str]) -> list[Path]:
    """The weight files of built-in Cellpose models ``names`` (``"cyto3,nuclei"`` or a list), in that order.

    Each is the file Cellpose itself would load from :func:`builtin_model_dir`. Nothing is downloaded: a
    missing file is an :class:`InputError` naming the file and where to put it; an unknown name lists
    the known ones.
    """
    if isinstance(names, str):
        names = [n for n in (part.strip() for part in names.split(",")) if n]
    folder = builtin_model_dir()
    paths = []
    for name in dict.fromkeys(names):
        _check_builtin_name(name)
        path = folder / builtin_weight_name(name)
        if not path.is_file():
            raise InputError(f"built-in model {name}: weight file {path} not found; dqtool never downloads: copy "
                             f"Cellpose's file {path.name} into {folder} (or set CELLPOSE_LOCAL_MODELS_PATH to the "
                             "folder that holds it)")
        paths.append(path)
    return paths


def builtin_name_of(path: str | os.PathLike) -> str | None:
    """The built-in name of a weight file in Cellpose's model folder, or None for any other file."""
    path = Path(path)
    try:
        if path.resolve().parent != builtin_model_dir().resolve():
            return None
    except OSError:
        return None
    for name in builtin_names():
        if builtin_weight_name(name) == path.name:
            return name
    return None


def training_diameters(model: str | os.PathLike) -> tuple[float, float]:
    """``(diam_mean, diam_labels)`` of a model file, where Cellpose stores them: in the state dict.

    ``diam_mean`` is the diameter the network's inputs were rescaled to in training, ``diam_labels`` the
    mean diameter of the training objects; Cellpose evaluates with ``rescale = diam_mean / diam_labels``
    when no diameter is given. Files written by Cellpose's ``train_seg``, its GUI and dqtool alike hold
    them, so no sidecar file is needed. A built-in model takes Cellpose's fixed ``diam_mean``
    (:func:`builtin_diameter`), as Cellpose does.
    """
    state = load_state_dict(model)
    diam_mean = float(state["diam_mean"].reshape(-1)[0]) if "diam_mean" in state else 30.0
    diam_labels = float(state["diam_labels"].reshape(-1)[0]) if "diam_labels" in state else diam_mean
    name = builtin_name_of(model)
    if name is not None:
        diam_mean = builtin_diameter(name)
    return diam_mean, diam_labels


class SizedCellposeModel:
    """A ``CellposeModel`` with its size model: ``eval(diameter=None)`` estimates each image's diameter first.

    What Cellpose's ``Cellpose`` class does for cyto3/cyto2/cyto/nuclei, without its constructor (which
    downloads missing files). Every other attribute (``net``, ``diam_mean``, ...) is the model's own.
    """

    def __init__(self, model, size_file: Path):
        from cellpose.models import SizeModel

        self.model = model
        self.size_file = Path(size_file)
        self.size_model = SizeModel(model, device=model.device, pretrained_size=str(size_file))

    def __getattr__(self, name):
        if name == "model":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def estimate_diameter(self, x, channels=None, channel_axis=None, normalize=True, invert=False,
                          batch_size: int = 8):
        return self.size_model.eval(x, channels=channels, channel_axis=channel_axis, normalize=normalize,
                                    invert=invert, batch_size=batch_size)[0]

    def eval(self, x, diameter=None, **kwargs):
        if diameter is None or (np.isscalar(diameter) and diameter == 0):
            keys = ("channels", "channel_axis", "normalize", "invert", "batch_size")
            diameter = self.estimate_diameter(x, **{k: kwargs[k] for k in keys if k in kwargs})
        return self.model.eval(x, diameter=diameter, **kwargs)


def load_cellpose_model(model: str | os.PathLike, device=None, size_model: bool = True):
    """A ``CellposeModel`` for a checked model file, loaded as Cellpose loads it (never a download).

    Any Cellpose 3 model file (dqtool's, ``train_seg``'s, the GUI's) takes its diameters from its state
    dict. A built-in model's weight file in Cellpose's model folder (:func:`builtin_models`) gets
    Cellpose's fixed ``diam_mean`` (17 nuclei, 30 else) and, when its size model file is beside it and
    ``size_model`` is true, a :class:`SizedCellposeModel` that estimates each image's diameter.
    """
    import torch
    from cellpose.models import CellposeModel

    load_state_dict(model)  # clear error for a missing file or a file that is not a Cellpose model
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    path = check_model_path(model)
    net = CellposeModel(pretrained_model=str(path), model_type=None, device=device)
    name = builtin_name_of(path)
    if name is None:
        return net
    net.diam_mean = builtin_diameter(name)
    size = builtin_size_name(name)
    if size_model and size is not None and (path.parent / size).is_file():
        return SizedCellposeModel(net, path.parent / size)
    return net
