"""Shared network passes (issue 20): bit-for-bit equal to ``CellposeModel.eval`` and to separate runs,
fewer passes (counted with forward hooks), the cache of unperturbed predictions, the list form."""

import json

import numpy as np
import pytest
import tifffile
import torch
from cellpose.resnet_torch import CPnet
from click.testing import CliRunner
from dqtool_cli.main import cli
from factories import blob_image
from skimage.measure import label as connected_components

from dqtool.common.errors import InputError
from dqtool.data.io import write_labels
from dqtool.ranking import rank as R
from dqtool.ranking.passes import EvalSettings, ModelPasses, count_network_passes
from dqtool.segmentation.predict import load_model

EVAL = dict(channels=[0, 0], normalize={"normalize": False}, batch_size=8)
RESULT_FILES = ("ranking.csv", "ranking.md", "ranking.json", "per_image.csv", "per_image.md", "per_image.json",
                "validation.csv")


def save_cpnet(path, seed=0):
    """A random Cellpose 3 network (nbase of dqtool's models) whose cellprob is centred on 0."""
    torch.manual_seed(seed)
    net = CPnet([2, 32, 64, 128, 256], 3, sz=3, mkldnn=False).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 2, 64, 64))[0]
        net.output[2].bias[2] -= out[0, 2].median()
    net.save_model(path)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("net") / "net.pth"
    save_cpnet(path, seed=3)
    return path


def test_passes_equal_eval_bit_for_bit_across_sizes(model_file):
    """Three sizes: two images of two 224 x 100 tiles each share one batch of 4, a one-tile image runs alone."""
    model = load_model(model_file)
    rng = np.random.default_rng(0)
    images = [(0.5 * rng.random((h, w)) + blob_image(i, max(h, w))[:h, :w]).astype(np.float32)
              for i, (h, w) in enumerate(((240, 100), (60, 70), (236, 98)))]
    passes = ModelPasses(model, EvalSettings())
    tiled = [passes.tile(x) for x in images]
    assert [len(t.tiles) for t in tiled] == [2, 1, 2]
    assert [len(b) for b in passes.batches([2, 2])] == [4]
    outputs = passes.run(tiled, lambda encoded: {"": passes.decode(encoded)})
    for x, t, y in zip(images, tiled, outputs):
        masks, flows, _ = model.eval(x, **EVAL)
        pred = passes.masks(t, *passes.untile(t, y[""]))
        assert np.array_equal(pred.cellprob, flows[2]) and np.array_equal(pred.flows, flows[1])
        assert np.array_equal(pred.masks, masks)


def test_batches_keep_lone_tiles_alone_and_never_make_one():
    passes = ModelPasses.__new__(ModelPasses)
    passes.settings, passes.mkldnn = EvalSettings(batch_size=8), True
    batches = passes.batches([9, 3, 1, 4])
    assert sorted(np.concatenate(batches).tolist()) == list(range(17))
    assert [b.tolist() for b in batches if len(b) == 1] == [[8], [12]]  # eval runs exactly these alone
    assert all(2 <= len(b) <= 8 for b in passes.batches([3, 3, 3]))
    passes.mkldnn = False  # elsewhere: eval's own batches
    assert [b.tolist() for b in passes.batches([9, 2])] == [list(range(8)), [8], [9, 10]]


def _dump(records):
    return json.dumps(records, sort_keys=True)


@pytest.mark.slow  # 16 s on the quiet 2-core CPU, minutes under load
def test_shared_passes_equal_separate_runs_with_half_the_encoder_passes(model_file):
    model = load_model(model_file)
    inputs = [blob_image(s, 64 + 16 * s) for s in range(3)]  # three sizes
    labels = [connected_components(x > 0.5) for x in inputs]
    separate, counts = {}, {}
    for kind, strength in (("dropout", 0.3), ("noise", 0.1)):
        with count_network_passes() as counts[kind]:
            separate[kind], _ = R.score_model(model, inputs, kind, strength, seed=5, labels=labels)
    with count_network_passes() as shared_count:
        shared, _ = R.score_model_passes(model, inputs, {"dropout": 0.3, "noise": 0.1}, seed=5, labels=labels)
    for kind in separate:
        assert _dump(shared[kind]) == _dump(separate[kind])
    tiles = counts["noise"].encoder_tiles // 2  # one pass over the images
    assert counts["dropout"].encoder_tiles + counts["noise"].encoder_tiles == 4 * tiles  # today
    assert shared_count.encoder_tiles == 2 * tiles and shared_count.decoder_tiles == 3 * tiles


def test_bottleneck_site_keeps_the_shared_encoder_pass_and_equals_eval(model_file):
    """Dropout at every consumer of the bottleneck (site 'bottleneck'): the shared passes still run the
    encoder once per tile and equal the plain eval loop under the same site; under draw 'batch' each
    network batch (here one per image: two tile sizes) gets the next channels of the run's stream."""
    model = load_model(model_file)
    inputs = [blob_image(s, 64 + 16 * s) for s in range(2)]  # two sizes: one batch each
    separate, _ = R.score_model(model, inputs, "dropout", 0.3, seed=5, dropout_site="bottleneck", dropout_draw="run")
    with count_network_passes() as count:
        shared, _ = R.score_model_passes(model, inputs, {"dropout": 0.3}, seed=5, dropout_site="bottleneck",
                                         dropout_draw="run")
    assert _dump(shared["dropout"]) == _dump(separate)
    assert count.encoder_tiles == 2 and count.decoder_tiles == 4  # one encoder pass, two decodes
    runs = {"bottleneck": shared["dropout"]}
    runs["decoder"] = R.score_model_passes(model, inputs, {"dropout": 0.3}, seed=5, dropout_draw="run")[0]["dropout"]
    assert _dump(runs["decoder"]) != _dump(runs["bottleneck"])
    batch, _ = R.score_model_passes(model, inputs, {"dropout": 0.3}, seed=5, dropout_site="bottleneck",
                                    dropout_draw="batch")
    assert _dump(batch["dropout"][:1]) == _dump(runs["bottleneck"][:1])  # the first draw is the run's
    assert _dump(batch["dropout"][1:]) != _dump(runs["bottleneck"][1:])  # the second batch draws anew
    with pytest.raises(ValueError, match="site"):
        R.score_model_passes(model, inputs, {"dropout": 0.3}, dropout_site="encoder")


@pytest.fixture(scope="module")
def small_bank(tmp_path_factory):
    root = tmp_path_factory.mktemp("small_bank")
    (root / "models").mkdir()
    save_cpnet(root / "models" / "a.pth", seed=0)
    save_cpnet(root / "models" / "b.pth", seed=1)
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for i, size in enumerate((64, 80)):  # a folder of two sizes is ranked
        tifffile.imwrite(root / "images" / f"img{i}.tif", (blob_image(20 + i, size) * 40000).astype(np.uint16))
        write_labels(root / "labels" / f"img{i}_label.tif", connected_components(blob_image(20 + i, size) > 0.5))
    return root


def _rank(bank, out, perturb, strength=None, cache=True, **kw):
    return R.rank_bank(bank / "models", bank / "images", labels=bank / "labels", perturbations=perturb,
                       strength=strength, out=out, seed=2, cache=cache, **kw)


def _same_files(a, b):
    for name in RESULT_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ja, jb = (json.loads((d / "rank.json").read_text()) for d in (a, b))
    for doc in (ja, jb):
        for m in doc["ranking"]:
            m.pop("seconds")
        doc.pop("timing")
        doc["notes"] = [n for n in doc["notes"] if not n.startswith("cache")]
    assert ja == jb


def test_list_form_equals_separate_runs_and_cache_changes_nothing(tmp_path, small_bank):
    both = tmp_path / "both"
    bank = _rank(small_bank, both, "dropout,noise", strength="0.3,0.1")
    assert set(bank.results) == {"dropout", "noise"} and bank.cache["written"] == 4 and bank.cache["hits"] == 0
    _rank(small_bank, tmp_path / "dropout", "dropout", strength=0.3, cache=False)
    _rank(small_bank, tmp_path / "noise", "noise", strength="0.1", cache=False)
    assert not (tmp_path / "dropout" / "cache").exists()
    _same_files(both / "dropout", tmp_path / "dropout")
    _same_files(both / "noise", tmp_path / "noise")

    # warm cache, another noise strength: no unperturbed pass at all, same numbers as uncached
    with count_network_passes() as warm:
        bank = _rank(small_bank, both, "noise", strength=0.05)
    assert bank.cache["hits"] == 4 and bank.cache["written"] == 0
    _rank(small_bank, tmp_path / "cold", "noise", strength=0.05, cache=False)
    _same_files(both, tmp_path / "cold")
    n_tiles = 2 * 2  # 2 models x 2 one-tile images
    assert warm.encoder_tiles == n_tiles

    # a truncated cache file and a file from another model under this name: recomputed and said
    files = sorted((both / "cache").glob("*.npz"))
    files[0].write_bytes(files[0].read_bytes()[:100])
    files[1].write_bytes(files[2].read_bytes())
    bank = _rank(small_bank, both, "noise", strength=0.05)
    notes = bank.results["noise"].notes
    assert any("unreadable" in n and files[0].name in n for n in notes)
    assert any("another model, image or eval settings" in n and files[1].name in n for n in notes)
    assert bank.cache["hits"] == 2 and bank.cache["written"] == 2
    _same_files(both, tmp_path / "cold")
    # other eval settings: never reused, said
    bank = _rank(small_bank, both, "noise", diameter=20.0)
    assert bank.cache["hits"] == 0 and any("other eval settings" in n for n in bank.results["noise"].notes)


def test_bad_perturbation_lists(small_bank):
    with pytest.raises(InputError, match="'noise' is listed twice"):
        R.parse_perturbations("noise,dropout,noise")
    with pytest.raises(InputError, match="'blur' in 'dropout,blur'"):
        R.parse_perturbations(["dropout", "blur"])
    with pytest.raises(InputError, match="1 value.*2 perturbation"):
        R.resolve_strengths(("dropout", "noise"), 0.2)
    assert R.resolve_strengths(("dropout", "noise"), "0.3,") == {"dropout": 0.3, "noise": 0.06}
    runner = CliRunner()
    base = ["rank", str(small_bank / "models"), "--images", str(small_bank / "images"), "--quiet"]
    res = runner.invoke(cli, base + ["--perturb", "dropout,dropout"])
    assert res.exit_code == 2 and "listed twice" in res.output
    res = runner.invoke(cli, base + ["--perturb", "dropout,noise", "--strength", "0.2"])
    assert res.exit_code == 1 and "give one per perturbation" in res.output


def test_cli_list_form_and_no_cache(tmp_path, small_bank):
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["rank", str(small_bank / "models"), "--images", str(small_bank / "images"),
                                   "--perturb", "noise,contrast", "--out", str(out), "--no-cache", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "## noise (strength 0.06)" in res.output and "## contrast (strength 0.3)" in res.output
    assert (out / "noise" / "ranking.csv").exists() and (out / "contrast" / "rank.json").exists()
    assert not (out / "cache").exists()
