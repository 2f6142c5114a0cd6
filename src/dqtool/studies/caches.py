"""A study's patch caches: one per named set of training images (a folder or a split file), in ``OUT/caches``.

Shared by the study configs (``dqtool experiment``, ``dqtool rank-study --config``); the images are read in
place through :func:`dqtool.data.datasets.open_dataset` and cut by :func:`dqtool.data.cache_build.build_cache`,
which reuses a cache whose inputs and options match.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["patch_caches"]


def patch_caches(domains: dict, config: dict, out: Path, quiet: bool) -> dict[str, Path]:
    """{name: ``out/caches/<name>.h5``} for ``domains`` ({name: {"train": folder or split file}}), cut with
    ``config["patch"]``'s ``size`` and ``stride``; each cache's domain is its name."""
    from dqtool.data.cache_build import PatchOptions, build_cache  # h5py
    from dqtool.data.datasets import open_dataset

    folder = out / "caches"
    folder.mkdir(parents=True, exist_ok=True)
    options = PatchOptions(size=int(config["patch"]["size"]), stride=int(config["patch"]["stride"]))
    return {name: Path(build_cache(open_dataset(d["train"], domain=name), folder / f"{name}.h5", options,
                                   quiet=quiet).path)
            for name, d in domains.items()}
