"""The embedded default data: three synthetic microscopy domains, generated deterministically from a seed.

They stand in for the paper's Cyto / Histo / MultiInst when a user has none, and differ the way those do,
so that a model trained on one does worse on another (the forgetting experiments run on them):

- ``fluo``: fluorescence-like nuclei, 16-bit grayscale, bright smooth textured blobs on a dark noisy
  background with a camera offset; medium size (radius 9-16 px), sparse to medium density.
- ``histo``: H&E-like tissue, 8-bit RGB: small dark purple irregular nuclei (radius 5-9 px), densely packed on
  a pink, fibrous eosin background. In grayscale the contrast is inverted compared with ``fluo``.
- ``multi``: a mixed set of modalities, sizes and densities, 8-bit RGB: phase contrast (dark cells with a
  bright halo), brightfield (pale cells with a dark rim) and large fluorescent cells, image sizes 256-400.

Layout written (Cellpose's): ``OUT/<domain>/{train,test}/NNN_img.png`` + ``NNN_masks.png`` (uint16 instance
ids), and ``OUT/MANIFEST.json`` with the seed, the configuration and a sha256 of every file. The same seed
gives the same bytes. Writing goes to a temp folder renamed into place, so a killed run leaves nothing
that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from dqtool._version import __version__
from dqtool.data.io import write_image_png
from dqtool.common.errors import InputError
from dqtool.common.files import atomic_write_text, file_sha256
from dqtool.common.outputs import MARKER, kill_point, swap_folder, write_marker, writing
from dqtool.common.progress import bar

DOMAINS = ("fluo", "histo", "multi")
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class SynthConfig:
    seed: int = 0
    n_train: int = 12
    n_test: int = 6
    size: int = 336
    domains: tuple = DOMAINS


def _place_cells(rng: np.random.Generator, shape: tuple[int, int], n_target: int, rmin: float, rmax: float,
                 irregular: float, max_ecc: float = 0.35, min_keep: float = 0.75) -> np.ndarray:
    """Instance map of up to ``n_target`` touching, non-overlapping, slightly irregular ellipses."""
    h, w = shape
    labels = np.zeros(shape, np.uint16)
    n = 0
    for _ in range(n_target * 6):
        if n >= n_target:
            break
        r = rng.uniform(rmin, rmax)
        ecc = rng.uniform(0.0, max_ecc)
        a, b = r * (1 + ecc), r * (1 - ecc)
        theta = rng.uniform(0, np.pi)
        cy, cx = rng.uniform(-0.3 * r, h + 0.3 * r), rng.uniform(-0.3 * r, w + 0.3 * r)
        rad = int(np.ceil(a * (1 + irregular))) + 2
        y0, y1 = max(int(cy) - rad, 0), min(int(cy) + rad + 1, h)
        x0, x1 = max(int(cx) - rad, 0), min(int(cx) + rad + 1, w)
        if y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / a
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / b
        phi = np.arctan2(v, u)
        harmonics = rng.normal(0, irregular, 3)
        phases = rng.uniform(0, 2 * np.pi, 3)
        edge = 1 + sum(harmonics[k] * np.sin((k + 2) * phi + phases[k]) for k in range(3))
        inside = np.hypot(u, v) <= edge
        full = int(inside.sum())
        if full < 12:
            continue
        free = inside & (labels[y0:y1, x0:x1] == 0)
        if free.sum() < min_keep * full:
            continue
        n += 1
        labels[y0:y1, x0:x1][free] = n
    return labels


def _distance_profile(labels: np.ndarray) -> np.ndarray:
    """Per pixel: distance to the cell boundary divided by the cell's max distance (0 at the edge, 1 centre)."""
    dist = ndi.distance_transform_edt(labels > 0)
    if labels.max() == 0:
        return dist.astype(np.float32)
    peak = ndi.maximum(dist, labels, index=np.arange(1, labels.max() + 1))
    peak = np.concatenate([[1.0], np.maximum(peak, 1.0)])
    return (dist / peak[labels]).astype(np.float32)


def _texture(rng, shape, sigma):
    t = ndi.gaussian_filter(rng.normal(0, 1, shape), sigma)
    return t / (t.std() + 1e-8)


def _per_cell(rng, labels, low, high):
    values = np.concatenate([[0.0], rng.uniform(low, high, int(labels.max()))])
    return values[labels]


def render_fluo(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    shape = (size, size)
    density = rng.uniform(0.5, 1.0)
    labels = _place_cells(rng, shape, int(density * size * size / 1400), 9, 16, irregular=0.06)
    prof = _distance_profile(labels)
    bright = _per_cell(rng, labels, 700, 3000)
    signal = bright * (0.55 + 0.45 * np.sqrt(prof)) * (1 + 0.15 * _texture(rng, shape, 1.5))
    signal = ndi.gaussian_filter(signal * (labels > 0), 1.2)
    background = 110 + 25 * _texture(rng, shape, 30)
    img = background + signal
    img = img + rng.normal(0, 1, shape) * np.sqrt(np.maximum(img, 1)) * 1.5
    return np.clip(img, 0, 65535).astype(np.uint16), labels


def render_histo(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    shape = (size, size)
    density = rng.uniform(0.8, 1.2)
    labels = _place_cells(rng, shape, int(density * size * size / 420), 5, 9, irregular=0.12, max_ecc=0.45)
    fg = ndi.gaussian_filter((labels > 0).astype(np.float32), 0.8)
    fibres = ndi.gaussian_filter(rng.normal(0, 1, shape), (1.0, 6.0))
    fibres = fibres / (fibres.std() + 1e-8)
    eosin = np.array([232.0, 165.0, 200.0]) + 12 * fibres[..., None] + 8 * _texture(rng, shape, 20)[..., None]
    stain = _per_cell(rng, labels, 0.75, 1.0)
    stain = ndi.grey_dilation(stain, size=2) * (fg > 0.02)
    hema = np.array([85.0, 55.0, 135.0]) + 20 * _texture(rng, shape, 1.0)[..., None]
    mix = (fg * stain)[..., None]
    img = eosin * (1 - mix) + hema * mix + rng.normal(0, 6, shape + (3,))
    return np.clip(img, 0, 255).astype(np.uint8), labels


def render_multi(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    size = int(rng.choice([256, 336, 400]))
    shape = (size, size)
    modality = rng.integers(0, 3)
    if modality == 0:  # phase contrast: dark cells, bright halo
        labels = _place_cells(rng, shape, int(rng.uniform(0.4, 1.0) * size * size / 1500), 10, 20, irregular=0.1)
        inside = (labels > 0).astype(np.float32)
        halo = ndi.gaussian_filter(ndi.binary_dilation(inside, iterations=3).astype(np.float32) - inside, 1.5)
        gray = 128 - 45 * ndi.gaussian_filter(inside, 1.0) + 90 * halo + 6 * _texture(rng, shape, 2)
        tint = np.array([1.0, 1.0, 1.0])
    elif modality == 1:  # brightfield: pale cells with a dark rim
        labels = _place_cells(rng, shape, int(rng.uniform(0.5, 1.2) * size * size / 900), 8, 16, irregular=0.08)
        prof = _distance_profile(labels)
        rim = ((prof > 0) & (prof < 0.3)).astype(np.float32)
        gray = 205 - 25 * (labels > 0) - 70 * ndi.gaussian_filter(rim, 0.8) + 5 * _texture(rng, shape, 3)
        tint = np.array([1.0, 0.97, 0.9])
    else:  # large fluorescent cells, green
        labels = _place_cells(rng, shape, int(rng.uniform(0.3, 0.7) * size * size / 2600), 15, 28, irregular=0.15)
        prof = _distance_profile(labels)
        gray = 15 + ndi.gaussian_filter(_per_cell(rng, labels, 110, 230) * (0.6 + 0.4 * prof), 2.0)
        gray = gray * (1 + 0.1 * _texture(rng, shape, 2))
        tint = np.array([0.35, 1.0, 0.45])
    img = gray[..., None] * tint + rng.normal(0, 4, shape + (3,))
    return np.clip(img, 0, 255).astype(np.uint8), labels


RENDERERS = {"fluo": render_fluo, "histo": render_histo, "multi": render_multi}


def _manifest_matches(out: Path, config: SynthConfig) -> bool:
    manifest = out / "MANIFEST.json"
    if not manifest.exists():
        return False
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return False
    want = {**asdict(config), "domains": list(config.domains)}
    if data.get("config") != want or data.get("generator_version") != GENERATOR_VERSION:
        return False
    return all((out / rel).exists() and file_sha256(out / rel) == digest for rel, digest in data["files"].items())


def generate(out_dir: str | os.PathLike, seed: int = 0, n_train: int = 12, n_test: int = 6, size: int = 336,
             domains=DOMAINS, force: bool = False, quiet: bool = True) -> Path:
    """Write the synthetic domains under ``out_dir`` (reused when its MANIFEST matches); returns the folder."""
    config = SynthConfig(seed=seed, n_train=n_train, n_test=n_test, size=size, domains=tuple(domains))
    for d in config.domains:
        if d not in RENDERERS:
            raise ValueError(f"unknown synthetic domain {d!r}; expected some of {', '.join(DOMAINS)}")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with writing(out, "data", kind="folder"):
        if not force and _manifest_matches(out, config):
            return out
        _only_generated(out)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _render(tmp, config, quiet)
            write_marker(tmp, "data")
            kill_point("data:written")
            swap_folder(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _only_generated(out: Path) -> None:
    """Refuse to replace ``out`` when it holds a file the generator did not write (per its MANIFEST) or one
    changed since: `dqtool data` replaces its own folder whole and must not take a lab's files with it."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        listed = json.loads((out / "MANIFEST.json").read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        listed = {}
    for path in sorted(out.rglob("*")):
        if path.is_dir() or path.name in (MARKER, "MANIFEST.json"):
            continue
        rel = path.relative_to(out).as_posix()
        digest = listed.get(rel) or listed.get(str(path.relative_to(out)))
        if digest is None or file_sha256(path) != digest:
            what = "was not written by `dqtool data`" if digest is None else "changed since `dqtool data` wrote it"
            raise InputError(f"{out}: {rel} {what}; dqtool will not replace this folder: move the file away, "
                             "or write the data to another folder")


def _render(tmp: Path, config: SynthConfig, quiet: bool) -> None:
    """Write every domain's train/test images, labels and the MANIFEST into the new folder ``tmp``."""
    seed, n_train, n_test, size = config.seed, config.n_train, config.n_test, config.size
    files = {}
    total = len(config.domains) * (n_train + n_test)
    progress = bar(total, desc="synthetic data", quiet=quiet, unit="img")
    for di, domain in enumerate(config.domains):
        for si, (split, count) in enumerate((("train", n_train), ("test", n_test))):
            folder = tmp / domain / split
            folder.mkdir(parents=True)
            for i in range(count):
                rng = np.random.default_rng([seed, DOMAINS.index(domain), si, i])
                img, labels = RENDERERS[domain](rng, size)
                for kind, arr in (("img", img), ("masks", labels)):
                    path = folder / f"{i:03d}_{kind}.png"
                    write_image_png(path, arr)
                    files[str(path.relative_to(tmp))] = file_sha256(path)
                progress.update(1)
                kill_point("data:image")
    progress.close()
    manifest = {"generator": "dqtool.synthetic", "generator_version": GENERATOR_VERSION,
                "dqtool_version": __version__, "config": {**asdict(config), "domains": list(config.domains)},
                "files": files}
    atomic_write_text(tmp / "MANIFEST.json", json.dumps(manifest, indent=2) + "\n")
