"""OME-Zarr patches without loading the image: peak memory of ``dqtool patches`` on a 20,000 x 20,000 image.

A generated OME-Zarr image (uint8, 1024 x 1024 chunks, 5 levels, with an instance label image) is cut
into 224 x 224 patches at stride 224 by the ``dqtool patches`` command in its own process, whose peak RSS
(``ru_maxrss`` of the child) must stay under 1 GB: the image alone is 400 MB at level 0, its labels
1.6 GB as uint32. Run by ``make bench`` (pytest-benchmark, one round) or as a script:
``python benchmarks/bench_ome_zarr.py [SIZE [KEEP_DIR]]``. Needs the extra ``dqtool[zarr]``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SIZE = 20_000
CHUNK = 1024
LEVELS = 5
PEAK_RSS_LIMIT = 1 << 30  # 1 GB


def _cells(y: np.ndarray, x: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic field of round cells on a 40-px jittered grid, at full-resolution coords y, x."""
    gy, gx = y // 40, x // 40
    jitter = ((gy * 7919 + gx * 104729) % 13) - 6
    dy, dx = y % 40 - 20 - jitter, x % 40 - 20 + jitter
    inside = dy * dy + dx * dx < 12 ** 2
    ids = np.where(inside, (gy * (SIZE // 40 + 1) + gx + 1), 0).astype(np.uint32)
    noise = ((y * 31 + x * 17) % 23).astype(np.uint8)
    return np.where(inside, 180, 30).astype(np.uint8) + noise, ids


def make_image(path: Path, size: int = SIZE) -> Path:
    """Write the OME-Zarr image level by level, one chunk at a time (never the whole image in memory)."""
    import zarr
    from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

    root = zarr.open_group(str(path), mode="w")
    labels_root = root.require_group("labels").require_group("cells")
    datasets = []
    for group, dtype in ((root, "uint8"), (labels_root, "uint32")):
        for level in range(LEVELS):
            step = 2 ** level
            n = -(-size // step)
            arr = group.create_array(str(level), shape=(n, n), chunks=(CHUNK, CHUNK), dtype=dtype, fill_value=0)
            for y0 in range(0, n, CHUNK):
                for x0 in range(0, n, CHUNK):
                    yy, xx = np.mgrid[y0:min(y0 + CHUNK, n), x0:min(x0 + CHUNK, n)] * step
                    image, ids = _cells(yy, xx, step)
                    arr[y0:y0 + yy.shape[0], x0:x0 + yy.shape[1]] = image if dtype == "uint8" else ids
            if group is root:
                datasets.append({"path": str(level),
                                 "coordinateTransformations": [{"type": "scale", "scale": [step, step]}]})
        axes = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
        write_multiscales_metadata(group, datasets, axes=axes, name="cells" if group is labels_root else "image")
    write_label_metadata(root["labels"], "cells")
    return path


def run_patches(image: Path, out: Path) -> dict:
    """``dqtool patches`` in a child process: seconds, peak RSS (bytes) and the patch count."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dqtool", "--quiet", "patches", str(image), "--out", str(out),
                           "--size", "224", "--stride", "224", "--compression", "lzf", "--force"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(proc.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if peak < before * 1024:
        peak = before * 1024
    return {"seconds": seconds, "peak_rss_bytes": peak, "output": proc.stdout.strip()}


@pytest.mark.slow
def test_patches_peak_memory_20k(benchmark, tmp_path):
    pytest.importorskip("zarr", reason="needs the extra dqtool[zarr]")
    image = make_image(tmp_path / "big.ome.zarr")
    result = benchmark.pedantic(run_patches, args=(image, tmp_path / "big.h5"), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["peak_rss_bytes"] <= PEAK_RSS_LIMIT, result


if __name__ == "__main__":
    import tempfile

    size = int(sys.argv[1]) if len(sys.argv) > 1 else SIZE
    keep = Path(sys.argv[2]) if len(sys.argv) > 2 else None  # a folder to keep (and reuse) the image in
    with tempfile.TemporaryDirectory(prefix="dqtool-bench-") as tmp:
        folder = keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        image = folder / f"big{size}.ome.zarr"
        t0 = time.perf_counter()
        if not (image / "zarr.json").exists():
            make_image(image, size)
        made = time.perf_counter() - t0
        result = run_patches(image, Path(tmp) / "big.h5")
        print(json.dumps({"size": size, "generate_seconds": made, **result}, indent=1))
