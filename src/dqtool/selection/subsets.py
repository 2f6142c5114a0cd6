"""Subsets of a patch cache: the one :class:`Subset` record, its file, the random baseline and the export.

A subset is the sorted patch ``indices`` of one cache plus how they were chosen. :class:`Subset` is the
only way dqtool reads or writes one (``dqtool select``, ``dqtool export``, ``dqtool train --subset``,
replay's source subset, the studies); its JSON file holds the record's fields in order::

    version, indices, bins, rate, method, n_total, n_selected, cache, cache_hash, features_hash,
    config, coverage

``bins`` (the DQ bin of each index), ``features_hash`` and ``coverage`` are null for a subset drawn
without features (the random baseline of ``replay``). ``config`` holds every option, the seed included.
Reading checks what a later step relies on: a JSON object, integer ``indices`` without repeats and,
against a cache, every index inside it and the same cache content (``cache_hash``). A hand-written file
with only ``indices`` is read as a subset with the other fields null.

Sizes: T = round(rate * N) with halves rounded up, rate taken as the decimal it is written as
(:func:`subset_total`); the random baseline draws T of N uniformly with ``default_rng(seed)``
(:func:`random_subset`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from pathlib import Path

import numpy as np

from dqtool.common.errors import InputError
from dqtool.common.files import atomic_write_text
from dqtool.common.progress import progress
from dqtool.data.io import write_image_png, write_seg_file

#: Version of the subset file; files without one (written before it, or by hand) read as None.
SUBSET_VERSION = 1

__all__ = ["Subset", "SUBSET_VERSION", "subset_total", "random_subset", "export_subset", "exact_rate", "EXPORT_INDEX"]


# ----------------------------------------------------------------------------------------------
# sizes and the random baseline


def exact_rate(rate: float) -> Fraction:
    """``rate`` as the decimal the user wrote, not its binary neighbour (0.29 is 29/100, so 0.29 * 100 = 29)."""
    return Fraction(repr(float(rate)))


def subset_total(n: int, rate: float) -> int:
    """T = round(rate * N), halves rounded up."""
    return math.floor(exact_rate(rate) * n + Fraction(1, 2))


def random_subset(n: int, total: int, seed: int = 0) -> np.ndarray:
    """The random baseline: ``total`` of ``n`` patches uniformly without replacement, sorted."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=int(total), replace=False).astype(np.int64))


# ----------------------------------------------------------------------------------------------
# the record


@dataclass(frozen=True, kw_only=True)
class Subset:
    """A subset of a cache's patches and how it was chosen; ``to_json()`` is the subset file."""

    version: int | None = SUBSET_VERSION
    indices: tuple[int, ...]
    bins: tuple[int, ...] | None = None
    rate: float | None = None
    method: str | None = None
    n_total: int | None = None
    n_selected: int = field(init=False)  # len(indices)
    cache: str | None = None
    cache_hash: str | None = None
    features_hash: str | None = None
    config: dict | None = None
    coverage: dict | None = None

    def __post_init__(self):
        object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))
        if self.bins is not None:
            object.__setattr__(self, "bins", tuple(int(b) for b in self.bins))
        object.__setattr__(self, "n_selected", len(self.indices))

    def index_array(self) -> np.ndarray:
        """The indices as an int64 array."""
        return np.asarray(self.indices, dtype=np.int64)

    # ------------------------------------------------------------------------------------------ JSON

    def to_dict(self) -> dict:
        """The fields in file order, tuples as lists."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        """The subset file's text."""
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "subset") -> "Subset":
        """Parse a subset file's text; ``where`` (the file) starts every error message."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not a JSON subset file ({exc})") from exc
        if not isinstance(data, dict) or not isinstance(data.get("indices"), list):
            raise InputError(f"{where}: expected a JSON object with an 'indices' list (written by `dqtool select`)")
        idx = data["indices"]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
            raise InputError(f"{where}: 'indices' must be integers")
        seen = set()
        for i in idx:
            if i in seen:
                raise InputError(f"{where}: patch index {i} appears more than once in 'indices'")
            seen.add(i)
        bins = data.get("bins")
        if bins is not None and not (isinstance(bins, list)
                                     and all(isinstance(b, int) and not isinstance(b, bool) for b in bins)):
            raise InputError(f"{where}: 'bins' must be a list of integers (or null)")
        # n_selected is derived from indices; keys this version does not know (an old 'seed') are passed over
        known = {f.name for f in fields(cls) if f.init}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("version", None)  # a file without one is not the current version
        return cls(**values)

    # ------------------------------------------------------------------------------------------ files

    def write(self, path: str | os.PathLike) -> Path:
        """Write the subset file (temp file + rename, so a crash never leaves half a file)."""
        return atomic_write_text(path, self.to_json())

    @classmethod
    def read(cls, path: str | os.PathLike, cache=None) -> "Subset":
        """Read a subset file; with ``cache`` (a path or an open PatchCache) also :meth:`check_cache`."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such subset file")
        try:
            text = path.read_text()
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: not a JSON subset file ({exc})") from exc
        subset = cls.from_json(text, str(path))
        if cache is not None:
            subset.check_cache(cache, str(path))
        return subset

    def check_cache(self, cache, where: str = "subset") -> None:
        """Every index lies in ``cache`` (a path or PatchCache) and the subset was selected on its content."""
        from dqtool.data.cache import PatchCache  # h5py: only when a cache is opened

        opened = cache if isinstance(cache, PatchCache) else PatchCache(cache)
        try:
            n, chash, cpath = len(opened), opened.content_hash, opened.path
        finally:
            if opened is not cache:
                opened.close()
        bad = [i for i in self.indices if i < 0 or i >= n]
        if bad:
            raise InputError(f"{where}: patch index {bad[0]} is outside the cache {cpath} (0..{n - 1})")
        if self.cache_hash not in (None, chash):
            raise InputError(f"{where}: selected on another cache content (hash {self.cache_hash:.12}), "
                             f"not {cpath} (hash {chash:.12})")

    def cache_path(self, subset_path: str | os.PathLike) -> Path:
        """The cache the subset was selected on.

        ``cache`` in a subset file is relative to **the subset file's own folder** (what ``dqtool select``
        writes, so the file works from any working directory and a folder moved whole keeps working), or
        absolute. Files written before this rule held a path relative to the working directory of
        ``select``: such a path is still taken as it is when nothing exists beside the subset file.
        """
        p = Path(self.cache or "")
        if p.is_absolute():
            return p
        beside = Path(subset_path).parent / p
        if beside.exists() or not p.exists():
            return beside
        return p

    def relative_to_file(self, subset_path: str | os.PathLike) -> Subset:
        """This record with ``cache`` relative to the folder of the file ``subset_path`` (as written)."""
        if not self.cache:
            return self
        where = os.path.abspath(Path(subset_path).parent)
        try:
            rel = os.path.relpath(os.path.abspath(self.cache), where)
        except ValueError:  # another drive (Windows): absolute
            rel = os.path.abspath(self.cache)
        return replace(self, cache=Path(rel).as_posix())


# ----------------------------------------------------------------------------------------------
# export


#: The index ``dqtool export`` writes into its folder; it lists every exported file with its sha256.
EXPORT_INDEX = "subset_patches.csv"
_EXPORT_FIELDS = ["image", "masks", "patch_index", "bin", "domain", "source", "y", "x", "size", "image_sha256",
                  "masks_sha256"]


def _earlier_export(out_dir: Path) -> None:
    """Refuse to replace an earlier export that holds anything but its own unedited files.

    The earlier index gives each file's sha256 at export time: a file whose bytes differ was edited (a
    mask corrected in the Cellpose GUI, say) and a file the index does not list is someone else's; dqtool
    removes neither, so the export stops with one line naming it.
    """
    from dqtool.common.files import file_sha256
    from dqtool.common.outputs import MARKER

    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    index = out_dir / EXPORT_INDEX
    digests: dict[str, str] = {}
    if index.exists():
        with open(index, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                for name_key, sha_key in (("image", "image_sha256"), ("masks", "masks_sha256")):
                    if row.get(name_key) and row.get(sha_key):
                        digests[row[name_key]] = row[sha_key]
    edited, foreign = [], []
    for entry in sorted(out_dir.iterdir()):
        if entry.name in (MARKER, EXPORT_INDEX) or entry.name.startswith("."):
            continue
        if entry.name not in digests or not entry.is_file():
            foreign.append(entry.name)
        elif file_sha256(entry) != digests[entry.name]:
            edited.append(entry.name)
    if edited:
        raise InputError(f"{out_dir}: {edited[0]}{f' and {len(edited) - 1} more' if len(edited) > 1 else ''} "
                         "changed after the export (sha256 differs from the index); dqtool will not overwrite or "
                         "remove edited files: move them away, or export to another folder")
    if foreign:
        raise InputError(f"{out_dir}: holds {foreign[0]}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}"
                         " that the earlier export did not write; dqtool will not remove it: move it away, or "
                         "export to another folder")


def export_subset(subset_path, out_dir, cache_path=None, quiet: bool = True, seed_masks=None) -> Path:
    """``dqtool export``: the subset's patches as Cellpose-layout files for annotation or training.

    Writes ``NNN_img.png`` (uint8, gray or RGB as cached) and, when the cache has labels, ``NNN_masks.png``
    (uint16 instance ids) for NNN = 000, 001, ... in index order, plus ``subset_patches.csv`` mapping each
    file to its patch index, bin, domain, source image, (y, x) offset and the sha256 of the file as
    exported. Returns the CSV path.

    ``seed_masks`` (a function: patch image -> instance masks, see
    :func:`dqtool.segmentation.seeds.export_with_seed_masks`): instead of ``NNN_masks.png``, write its masks of
    each patch as ``NNN_img_seg.npy``, the Cellpose GUI's own file, so the annotator opens ``NNN_img.png`` in the GUI
    and corrects the outlines instead of drawing them; the corrected ``_seg.npy`` files are label files for
    ``dqtool patches`` (:mod:`dqtool.data.naming`).

    The folder is written whole beside ``out_dir`` and swapped in when complete, so a kill leaves the
    earlier export (or none). An earlier export there is replaced only if it holds nothing but its own
    unedited files (:func:`_earlier_export`); a non-empty folder dqtool did not write is refused.
    """
    import shutil

    from dqtool.common.files import file_sha256
    from dqtool.common.outputs import kill_point, swap_folder, write_marker, writing
    from dqtool.data.cache import PatchCache  # h5py

    subset = Subset.read(subset_path)
    cache_file = Path(cache_path) if cache_path is not None else subset.cache_path(subset_path)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with writing(out_dir, "export", [subset_path, cache_file], kind="folder"):
        _earlier_export(out_dir)
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            with PatchCache(cache_file) as cache:
                subset.check_cache(cache, str(subset_path))
                idx = subset.index_array()
                bins_of = subset.bins or [None] * len(idx)
                width = max(3, len(str(max(len(idx) - 1, 0))))
                rows = []
                for k in progress(range(len(idx)), total=len(idx), desc="export", quiet=quiet):
                    i = int(idx[k])
                    stem = f"{k:0{width}d}"
                    img = cache.images([i])[0]
                    write_image_png(tmp / f"{stem}_img.png", img[..., 0] if img.shape[-1] == 1 else img)
                    mask_name = ""
                    if seed_masks is not None:
                        mask_name = f"{stem}_img_seg.npy"
                        write_seg_file(tmp / mask_name, seed_masks(img[..., 0] if img.shape[-1] == 1 else img),
                                       f"{stem}_img.png")
                    elif cache.has_labels:
                        mask_name = f"{stem}_masks.png"
                        write_image_png(tmp / mask_name, cache.labels([i])[0].astype(np.uint16))
                    y, x = (int(v) for v in cache.offsets[i])
                    rows.append({"image": f"{stem}_img.png", "masks": mask_name, "patch_index": i, "bin": bins_of[k],
                                 "domain": str(cache.domain_of_patch[i]), "source": str(cache.source_of_patch[i]),
                                 "y": y, "x": x, "size": cache.patch_size,
                                 "image_sha256": file_sha256(tmp / f"{stem}_img.png"),
                                 "masks_sha256": file_sha256(tmp / mask_name) if mask_name else ""})
                    kill_point("export:patch")
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=_EXPORT_FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            atomic_write_text(tmp / EXPORT_INDEX, buf.getvalue())
            write_marker(tmp, "export")
            kill_point("export:written")
            swap_folder(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / EXPORT_INDEX
