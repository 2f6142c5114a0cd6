"""Ranking at the network floor (issue 20): passes counted with forward hooks, ratios in one run.

Workload: 4 seeded random Cellpose 3 networks (``CPnet`` saved with ``net.save_model``; their
cell-probability bias is shifted so about 15 % of a field is foreground, as a trained model's, since
a random net's spurious foreground makes the mask dynamics, not the network, the cost) x 6 real
520 x 696 BBBC039 fluorescence fields (``../shared/data/dev/cyto_bbbc039``, read by dqtool's readers
through symlinks in a temp folder, never copied), at the networks' own diameter (30: no resize, 12
tiles per field). ``BENCH_RANK_MODELS``, ``BENCH_RANK_IMAGES`` and ``BENCH_RANK_DIAMETER`` shrink it
for a busy 2-core CPU.

Measured, each once, in one run (``extra_info`` and printed):

* encoder tiles per model-image for dropout + noise: two separate ``rank`` runs vs one list run;
* wall of ``rank --perturb dropout,noise`` vs the two separate runs (target <= 0.6);
* a rerun with a new noise strength, cache warm, vs the same run cold (target <= 0.55);
* wall of ``rank --perturb noise`` (cold cache, so it writes it) vs a plain loop over ``CellposeModel.eval`` making the
  same passes (load, eval, perturb, eval; target <= 1.05).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from dqtool.ranking import rank as R
from dqtool.ranking.passes import count_network_passes

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dev" / "cyto_bbbc039" / "images"
N_MODELS = int(os.environ.get("BENCH_RANK_MODELS", "4"))
N_IMAGES = int(os.environ.get("BENCH_RANK_IMAGES", "6"))
DIAMETER = float(os.environ.get("BENCH_RANK_DIAMETER", "30"))


def make_bank(folder: Path, fields: list[np.ndarray]) -> Path:
    import torch
    from cellpose.resnet_torch import CPnet

    folder.mkdir(parents=True, exist_ok=True)
    x = torch.from_numpy(np.stack([fields[0][:224, :224], np.zeros((224, 224), np.float32)])[None])
    for seed in range(N_MODELS):
        torch.manual_seed(seed)
        net = CPnet([2, 32, 64, 128, 256], 3, sz=3, mkldnn=False).eval()
        with torch.no_grad():
            cellprob = net(x)[0][0, 2]
            net.output[2].bias[2] -= torch.quantile(cellprob.flatten(), 0.85)
        net.save_model(str(folder / f"random_{seed}.pth"))
    return folder


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    if not DATA.is_dir():
        pytest.skip(f"{DATA}: no BBBC039 fields here")
    root = tmp_path_factory.mktemp("bench_rank")
    images = root / "images"
    images.mkdir()
    for f in sorted(DATA.iterdir())[:N_IMAGES]:
        (images / f.name).symlink_to(f)
    files = sorted(images.iterdir())
    fields = [R.normalise_for_model(img) for img in R.load_target_images(files)]
    return make_bank(root / "models", fields), images, fields


def timed(fn):
    with count_network_passes() as count:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0, count


def plain_eval_loop(models: Path, fields, seed=0):
    """What a user would write: per model and image, Cellpose's eval on the image and on its noisy copy."""
    from dqtool.ranking.perturb import perturb_image
    from dqtool.segmentation.predict import load_model

    for path in sorted(models.iterdir()):
        model = load_model(path)
        for i, x in enumerate(fields):
            for y in (x, perturb_image(x, "noise", 0.06, seed=R.noise_seed(seed, i))):
                model.eval(y, channels=[0, 0], normalize={"normalize": False}, diameter=DIAMETER, batch_size=8)


def test_rank_at_the_network_floor(benchmark, workload, tmp_path):
    models, images, fields = workload
    n = N_MODELS * len(fields)

    def rank(out, perturb, strength=None, cache=True):
        return lambda: R.rank_bank(models, images, perturbations=perturb, strength=strength, out=tmp_path / out,
                                   diameter=DIAMETER, cache=cache)

    plain_s, plain_count = timed(lambda: plain_eval_loop(models, fields))
    dropout_s, dropout_count = timed(rank("dropout", "dropout", cache=False))
    noise_s, noise_count = timed(rank("noise", "noise"))  # cold: writes its cache
    both = {}

    def list_run():
        both["s"], both["count"] = timed(rank("both", "dropout,noise"))

    benchmark.pedantic(list_run, rounds=1, iterations=1)
    warm_s, warm_count = timed(rank("noise", "noise", strength=0.1))  # new strength, the cache warm

    tiles = plain_count.encoder_tiles / (2 * n)  # encoder tiles of one pass over one image
    info = {
        "models x images": f"{N_MODELS} x {len(fields)}",
        "tiles per image": tiles,
        "encoder passes per model-image, separate": (dropout_count.encoder_tiles + noise_count.encoder_tiles) / (n * tiles),
        "encoder passes per model-image, list": both["count"].encoder_tiles / (n * tiles),
        "decoder passes per model-image, list": both["count"].decoder_tiles / (n * tiles),
        "encoder passes per model-image, warm noise rerun": warm_count.encoder_tiles / (n * tiles),
        "list / separate wall": both["s"] / (dropout_s + noise_s),
        "warm / cold wall": warm_s / noise_s,
        "rank noise / plain eval loop wall": noise_s / plain_s,
        "seconds": {"plain": plain_s, "dropout": dropout_s, "noise": noise_s, "list": both["s"],
                    "warm": warm_s},
        "load": os.getloadavg()[0],
    }
    benchmark.extra_info.update(info)
    for k, v in info.items():
        print(f"{k}: {v}")
