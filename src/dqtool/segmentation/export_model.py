"""A Cellpose model as a bioimage.io model package (format 0.5): ``dqtool export-model``.

Built with Cellpose 3.1.1's own ``cellpose/export.py`` pieces (the ``CPnetBioImageIO`` wrapper, its tensor
and architecture descriptions) and ``bioimageio.spec``'s ``ModelDescr``; nothing of the format is written
by hand. The package holds the state dict and a TorchScript trace, a test input (a synthetic fluorescence
image from a seed, normalised and laid out as Cellpose's export does: ``z, c, y, x`` with 2 channels) and
the network's outputs on it, and in ``config.dqtool`` the dqtool version, the model's diameters and, from
the model's dqtool record (``MODEL.json``) when there is one, the training data: cache, subset, DQ rate.
Requires the extra ``dqtool[bioimageio]``. The output passes dqtool's output gate (:mod:`dqtool.common.outputs`):
it replaces only a package dqtool wrote, one writer at a time, whole or not at all.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dqtool.common.errors import InputError, require_extra
from dqtool.common.files import atomic_write, file_sha256, temp_path
from dqtool.segmentation.model_files import CELLPOSE_NCHAN, load_state_dict, sidecar_paths, training_diameters

#: Appended to a copy of Cellpose's ``resnet_torch.py`` (torch only) to make the package's architecture file:
#: Cellpose 3.1.1's ``CPnetBioImageIO.load_state_dict`` takes no ``strict`` argument, which
#: ``bioimageio.core`` passes, so the package's network class accepts it.
ARCHITECTURE_CLASS = "CPnetBioImageIOStrict"
_ARCHITECTURE_TAIL = f"""


# ---- appended by dqtool's export-model: bioimage.io loads weights with load_state_dict(state, strict=...)
class {ARCHITECTURE_CLASS}(CPnetBioImageIO):
    def load_state_dict(self, state_dict, strict=True, assign=False):
        return nn.Module.load_state_dict(self, state_dict, strict=strict, assign=assign)
"""

#: Cellpose's paper, cited by every package.
CELLPOSE_DOI = "10.1038/s41592-020-01018-x"


@dataclass(frozen=True)
class ExportOptions:
    """What the package says about the model (bioimage.io metadata)."""

    name: str | None = None  # default: "Cellpose model <file name>"
    description: str | None = None
    authors: tuple[str, ...] = ("dqtool",)
    license: str = "CC-BY-4.0"
    tags: tuple[str, ...] = ("cellpose", "segmentation", "2d", "instance-segmentation", "dqtool")
    test_size: int = 128  # side of the synthetic test input (a multiple of 16)
    seed: int = 0
    torchscript: bool = True

    def __post_init__(self):
        if self.test_size < 16 or self.test_size % 16:
            raise InputError(f"test size {self.test_size}: expected a multiple of 16, at least 16")
        if not self.authors:
            raise InputError("authors: expected at least one name")


def training_record(model: str | os.PathLike) -> dict:
    """What the model's dqtool record (``MODEL.json``) says of its training data, or {} without one."""
    path = sidecar_paths(model)["json"]
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: the model's dqtool record cannot be read ({type(exc).__name__})") from exc
    provenance = record.get("provenance") or {}
    subset = provenance.get("subset") or {}
    data = {"cache": provenance.get("cache"), "cache_hash": provenance.get("cache_hash"),
            "n_patches": provenance.get("n_selected"), "n_in_cache": provenance.get("n_in_cache"),
            "subset": subset.get("path"), "selection": subset.get("method"), "rate": subset.get("rate"),
            "bins": subset.get("bins"), "init": (provenance.get("init") or {}).get("path")}
    return {k: v for k, v in data.items() if v is not None}


def test_input(size: int, seed: int) -> np.ndarray:
    """A synthetic fluorescence image as Cellpose's export lays out its test input: float32 (1, 2, size, size).

    Channel 1 is the image normalised by Cellpose's ``normalize_img`` (1st/99th percentile), channel 2 zero
    (Cellpose channels [0, 0]).
    """
    from cellpose.transforms import convert_image, normalize_img

    from dqtool.data.synthetic import render_fluo

    image = render_fluo(np.random.default_rng(seed), size)[0].astype(np.float32)
    x = convert_image(image, [0, 0], channel_axis=None, z_axis=None, do_3D=False, nchan=CELLPOSE_NCHAN)
    x = normalize_img(x, axis=-1)
    return np.ascontiguousarray(np.transpose(x, (2, 0, 1))[None], dtype=np.float32)


def _documentation(name: str, model: Path, diameters: tuple[float, float], data: dict, version: str) -> str:
    lines = [f"# {name}", "",
             f"A Cellpose 3 model (`{model.name}`) exported by dqtool {version} from Cellpose's own export "
             "description (`cellpose/export.py`).", "",
             "## Use", "",
             "Input `raw`: `z, c, y, x`, float32, 2 channels (cytoplasm or grayscale, nucleus or zeros), each "
             "normalised to Cellpose's 1st..99th percentile = 0..1; y and x multiples of 16. Output `flow`: "
             "the Y and X flows and the cell probability logit; Cellpose's dynamics turn them into masks.",
             f"Training diameter: `diam_mean` {diameters[0]:g} px (inputs rescaled to it), `diam_labels` "
             f"{diameters[1]:g} px (mean diameter of the training objects).", "",
             "## Training data", ""]
    if data:
        lines += [f"- {k}: `{v}`" for k, v in data.items()]
    else:
        lines += ["Not recorded: the model has no dqtool record (`MODEL.json`); it was trained elsewhere."]
    return "\n".join(lines) + "\n"


def build_description(model: str | os.PathLike, work: str | os.PathLike, options: ExportOptions = ExportOptions()):
    """The bioimage.io ``ModelDescr`` (format 0.5) of a Cellpose model; its files are written in ``work``."""
    require_extra("bioimageio.spec", "bioimageio", "export-model")
    require_extra("bioimageio.core", "bioimageio", "export-model")
    import torch
    from bioimageio.spec.model import v0_5 as spec
    from cellpose import export as cp_export
    from cellpose import resnet_torch

    from dqtool._version import __version__

    load_state_dict(model)  # a clear error for a file that is not a Cellpose 3 model
    model = Path(model).resolve()
    work = Path(work)
    diameters = training_diameters(model)
    data = training_record(model)
    name = options.name or f"Cellpose model {model.name}"

    net, cpnet_kwargs = cp_export.load_bioimageio_cpnet_model(model, nchan=CELLPOSE_NCHAN)
    x = test_input(options.test_size, options.seed)
    with torch.no_grad():
        outputs = [t.detach().numpy() for t in net(torch.from_numpy(x))]
    np.save(work / "test_input.npy", x)
    np.save(work / "test_output.npy", outputs[0])
    np.save(work / "test_style.npy", outputs[1])
    for i, t in enumerate(outputs[2:]):
        np.save(work / f"test_downsampled_{i}.npy", t)
    documentation = work / "README.md"
    documentation.write_text(_documentation(name, model, diameters, data, __version__), encoding="utf-8")
    cover = work / "cover.png"
    _write_cover(cover, x, outputs[0])

    pytorch_version = spec.Version(torch.__version__.split("+")[0])
    architecture = work / "cellpose_cpnet.py"
    architecture.write_text(Path(inspect.getsourcefile(resnet_torch)).read_text(encoding="utf-8")
                            + _ARCHITECTURE_TAIL, encoding="utf-8")
    architecture = cp_export.descr_gen_arch(cpnet_kwargs, architecture).model_copy(
        update={"callable": spec.Identifier(ARCHITECTURE_CLASS)})
    weights = {"pytorch_state_dict": spec.PytorchStateDictWeightsDescr(
        source=model, architecture=architecture, pytorch_version=pytorch_version)}
    if options.torchscript:
        traced = work / "cp_traced.pt"
        with torch.no_grad():
            torch.jit.trace(net, torch.from_numpy(x)).save(str(traced))
        weights["torchscript"] = spec.TorchscriptWeightsDescr(source=traced, pytorch_version=pytorch_version,
                                                              parent="pytorch_state_dict")
    trained = f", trained by dqtool on {Path(data['cache']).name}" if data.get("cache") else ""
    if data.get("rate") is not None:
        trained += f" ({data.get('selection', 'a')} subset, rate {data['rate']:g})"
    description = options.description or (
        f"Cellpose 3 instance segmentation (cells or nuclei), training diameter {diameters[1]:.3g} px{trained}.")
    try:
        return _model_description(spec, name, description, options, documentation, cover, work, net, weights,
                                  {"dqtool": {"version": __version__, "model_file": model.name,
                                              "diam_mean": diameters[0], "diam_labels": diameters[1],
                                              "channels": [0, 0], "training_data": data or None}})
    except ValueError as exc:  # pydantic's ValidationError: a licence id, an author name, ...
        first = str(exc).splitlines()
        detail = " ".join(first[1:3]) or str(exc)
        raise InputError(f"{model}: the bioimage.io description is invalid: {detail}") from exc


def _model_description(spec, name, description, options, documentation, cover, work, net, weights, config):
    from cellpose import export as cp_export

    return spec.ModelDescr(
        name=name,
        description=description,
        authors=[spec.Author(name=a) for a in options.authors],
        cite=[spec.CiteEntry(text="Stringer et al. Cellpose: a generalist algorithm for cellular segmentation. "
                                  "Nature Methods 18, 100-106 (2021)", doi=spec.Doi(CELLPOSE_DOI))],
        license=spec.LicenseId(options.license),
        tags=list(options.tags),
        documentation=spec.FileDescr(source=documentation),
        covers=[spec.FileDescr(source=cover)],
        inputs=[cp_export.descr_gen_input(work / "test_input.npy", nchan=CELLPOSE_NCHAN)],
        outputs=[cp_export.descr_gen_output_flow(work / "test_output.npy"),
                 cp_export.descr_gen_output_style(work / "test_style.npy", net.nbase[-1]),
                 *cp_export.descr_gen_output_downsampled(work, nbase=net.nbase[1:])],
        weights=spec.WeightsDescr(**weights),
        config=config,
    )


def _write_cover(path: Path, x: np.ndarray, flow: np.ndarray) -> None:
    """The test input beside the cell probability the model gives it (bioimage.io asks for a cover image)."""
    from dqtool.common.figures import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(4, 2))
    axes[0].imshow(x[0, 0], cmap="gray")
    axes[1].imshow(1 / (1 + np.exp(-flow[0, 2])), cmap="magma", vmin=0, vmax=1)
    for ax, title in zip(axes, ("input", "cell probability")):
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    save_figure(fig, path)


def export_model(model: str | os.PathLike, out: str | os.PathLike, options: ExportOptions = ExportOptions(),
                 test: bool = True) -> Path:
    """``dqtool export-model``: write the bioimage.io package of ``model`` to ``out`` (a ``.zip`` or a folder).

    With ``test``, the description first passes ``bioimageio.core``'s own model test (every weight
    format reproduces the test output); a failure raises and writes nothing.

    ``out`` goes through :func:`dqtool.common.outputs.writing` before the model is read: refused when it is
    the model, holds the model, or is a file or non-empty folder dqtool did not write (a zip is dqtool's when
    its ``rdf.yaml`` has ``config.dqtool``; a folder when its marker names ``export-model`` and it holds only
    the files that export wrote, unchanged: :func:`check_package_folder`); locked for the whole export. A zip
    is written to a temp file and renamed into place; a folder is built beside ``out`` and swapped in whole.
    """
    from dqtool.common.outputs import check_output, output_error, swap_folder, write_marker, writing

    out = Path(out)
    if out.name in ("", ".", ".."):  # `--out .`: the folder by its name (its lock and swap go beside it)
        out = out.resolve()
    kind = "file" if out.suffix.lower() == ".zip" else "folder"
    check_output(out, "export-model", [model], kind)  # before the model is read, a folder made or a lock taken
    if kind == "folder":
        check_package_folder(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(out, exc) from exc
    with writing(out, "export-model", [model], kind=kind), \
            tempfile.TemporaryDirectory(prefix="dqtool-bioimageio-") as tmp:
        if kind == "folder":
            check_package_folder(out)  # again, under the lock
        description = build_description(model, tmp, options)
        if test:
            check_package(description)
        from bioimageio.spec import save_bioimageio_package, save_bioimageio_package_as_folder

        if kind == "file":
            with atomic_write(out, suffix=".zip") as target:
                save_bioimageio_package(description, output_path=target)
        else:
            staged = temp_path(out)  # a hidden sibling, swapped in when whole
            try:
                save_bioimageio_package_as_folder(description, output_path=staged)
                files = {p.relative_to(staged).as_posix(): file_sha256(p)
                         for p in sorted(staged.rglob("*")) if p.is_file()}
                write_marker(staged, "export-model", files=files)
                swap_folder(staged, out)
            finally:
                if staged.exists():
                    shutil.rmtree(staged)
    return out


def check_package_folder(out: Path) -> None:
    """Refuse to replace the folder ``out`` unless it is empty, or a package of ``dqtool export-model`` (its
    marker says so) that holds only the files the export wrote, unchanged (the marker keeps their sha256):
    the folder is replaced whole and must not take a lab's file, or a file edited since, with it."""
    from dqtool.common.outputs import MARKER, folder_marker

    if not out.is_dir() or not any(out.iterdir()):
        return
    marker = folder_marker(out) or {}
    if marker.get("command") != "export-model":
        raise InputError(f"{out}: folder was written by `dqtool {marker.get('command')}`, not by `dqtool "
                         "export-model`; dqtool will not replace it: choose a new folder or a .zip path")
    listed = marker.get("files") if isinstance(marker.get("files"), dict) else {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if rel == MARKER or (path.is_dir() and not path.is_symlink()):
            continue
        digest = listed.get(rel)
        if digest is None or not path.is_file() or file_sha256(path) != digest:
            what = "was not written by `dqtool export-model`" if digest is None else "changed since the export"
            raise InputError(f"{out}: {rel} {what}; dqtool will not replace this folder: move the file away, "
                             "or choose a new folder or a .zip path")


def check_package(source) -> None:
    """Run ``bioimageio.core.test_model`` on a description or package; raise with its failures if any."""
    require_extra("bioimageio.core", "bioimageio", "export-model")
    from bioimageio.core import test_model

    summary = test_model(source)
    if summary.status != "passed":
        failed = [f"{d.name}: {'; '.join(e.msg for e in d.errors)}" for d in summary.details if d.errors]
        raise InputError(f"bioimage.io model test failed: {' | '.join(failed) or summary.status}")
