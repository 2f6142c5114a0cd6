"""``studies/real_rank.json`` runs, in miniature, in CI: the real-data ranking config cannot rot.

The miniature keeps every bank member but trains each on one image for two SGD steps (big patches, small
crops) and ranks on one target image, seen at a quarter of its side (one network tile), with the config's
first perturbation (the others share its code path; their names are checked when the config parses). So it
checks that the config parses, its names are images of the shared folders, every member trains and is
ranked, and the study's tables, correlations and plot are written, with no image copied into the study folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from dqtool.common.errors import InputError

from test_study_configs import STUDIES, _data_root  # the shared data's location, skip/fail rule

CONFIG = STUDIES / "real_rank.json"


def miniature(config: dict, data_root: Path, n_train: int = 1, n_target: int = 1) -> dict:
    """``config`` with ``n_target`` target images, ``n_train`` train images per member, 2 steps per model."""
    from dqtool.data.datasets import open_dataset

    mini = json.loads(json.dumps(config))
    mini["data_root"] = str(data_root)
    mini["target"]["images"] = config["target"]["images"][:n_target]
    for member in mini["bank"]:
        every = [s.name for s in open_dataset(data_root / member["root"], format=member.get("format"))]
        exclude = member.get("exclude", [])
        excluded = set(config["target"]["images"] if exclude == "target" else exclude)
        member["train"] = [n for n in member.get("train", every) if n not in excluded][:n_train]
        member.pop("exclude", None)
        member["steps"] = 2
        if "rate" in member:  # a 1 % subset of one image's patches is empty
            member["rate"] = 0.5
    mini["patch"] = {"size": 224, "stride": 224}
    mini["diameter"] = 120  # the models (diameter 30) see the target at a quarter of its side: one network tile
    mini["perturbations"] = config["perturbations"][:1]
    mini["train"] = {**mini["train"], "bsize": 32, "batch_size": 4, "nimg_per_epoch": 4, "min_train_masks": 1,
                     "save_every": 50}
    return mini


def is_fluorescence(sample) -> bool:
    """The config's rule: stored grey (R = G = B) and nuclei brighter than the background."""
    from dqtool.data.io import to_gray

    image, labels = sample.image, sample.labels
    grey = image.ndim == 2 or all(np.array_equal(image[..., 0], image[..., c]) for c in (1, 2))
    gray = to_gray(image).astype(np.float64)
    return grey and gray[labels > 0].mean() > gray[labels == 0].mean()


def test_real_rank_config_parses_and_keeps_the_target_out_of_the_bank():
    from dqtool.data.datasets import open_dataset
    from dqtool.studies.real_rank import config_members, load_rank_config

    raw = json.loads(CONFIG.read_text())
    config = load_rank_config(CONFIG)
    root = _data_root(CONFIG, raw)
    assert Path(config["data_root"]) == root
    members = config_members(config)
    assert len(members) >= 8 and {m.steps for m in members} >= {30, 100} and any(m.rate < 1 for m in members)
    cyto = json.loads((STUDIES / "real.json").read_text())["domains"]["cyto"]["test"]
    assert config["target"]["images"] in (cyto, cyto[::2])  # the BBBC039 test split of the experiment
    same_root = [m for m in members if m.root == config["target"]["root"]]
    assert same_root and all(m.exclude == "target" for m in same_root)
    # the DSB members train on fluorescence images only, by the rule the config's notes state
    for m in members:
        if "dsb" in m.name:
            samples = open_dataset(root / m.root, format=m.format)
            chosen = [s for s in samples if m.train is None or s.name in m.train]
            assert all(is_fluorescence(s) for s in chosen), m.name


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_real_rank_config_runs_in_miniature(tmp_path):
    from dqtool.studies.real_rank import rank_study_config

    raw = json.loads(CONFIG.read_text())
    root = _data_root(CONFIG, raw)
    mini = miniature(raw, root)
    out = tmp_path / "study"
    t0 = time.perf_counter()
    summary = rank_study_config(mini, out, quiet=True)
    seconds = time.perf_counter() - t0
    names = [m["name"] for m in raw["bank"]]
    assert summary.members == names and summary.target == raw["target"]["name"]
    assert {r["model"] for r in summary.rows} == set(names)  # every member trained and ranked
    for pert in mini["perturbations"]:
        assert all(r.get(f"{pert}_rank") is not None for r in summary.rows), pert
        assert (out / "rank" / pert / "rank.json").exists()
    assert {c["perturbation"] for c in summary.correlations} == set(mini["perturbations"])
    for name in ("study.csv", "study.md", "study.json", "study_correlations.csv", "study_correlations.md",
                 "study_summary.json", "study.png", "bank.json"):
        assert (out / name).exists(), name
    # the target is a split of the shared folder, nothing is copied
    split = json.loads((out / "splits" / "target.json").read_text())
    assert Path(split["root"]) == root / raw["target"]["root"] and split["names"] == mini["target"]["images"]
    plots = {"study.png", "ranking.png"}
    copied = [p for p in out.rglob("*") if p.suffix.lower() in (".tif", ".tiff", ".png", ".xml", ".jpg")
              and p.name not in plots and not p.name.endswith("_loss.png")]
    assert not copied, copied
    variants = json.loads((out / "variants_correlations.json").read_text())  # the options side by side
    assert {r["variant"] for r in variants} == {"default", *(v["name"] for v in raw["variants"])}
    # a member whose recorded settings differ is refused, not reused (before any training or ranking)
    changed = json.loads(json.dumps(mini))
    changed["bank"][0]["steps"] = 3
    with pytest.raises(InputError, match="steps"):
        rank_study_config(changed, out, quiet=True)
    print(f"miniature: {seconds:.1f} s")


def _tiny_set(root: Path, names=("a", "b", "c")) -> Path:
    """A labelled generic-layout folder of small images (images/<name>.tif, labels/<name>.png)."""
    import tifffile

    from dqtool.data.io import write_labels

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    lab = np.zeros((32, 32), np.uint16)
    lab[4:12, 4:12] = 1
    for n in names:
        tifffile.imwrite(root / "images" / f"{n}.tif", (lab * 200 + 10).astype(np.uint16))
        write_labels(root / "labels" / f"{n}.png", lab)
    return root


def _tiny_config(tmp_path: Path, **member) -> dict:
    _tiny_set(tmp_path / "data" / "set")
    return {"data_root": str(tmp_path / "data"), "target": {"name": "t", "root": "set", "images": ["a"]},
            "bank": [{"name": "m", "root": "set", "steps": 2, **member}]}


@pytest.mark.parametrize("change, message", [
    ({"bank": []}, "'bank' must list"),
    ({"epochs": 3}, "unknown keys epochs"),
    ({"train": {"n_epochs": 5}}, "each bank member gives its own 'steps'"),
    ({"perturbations": ["dropout", "blur!"]}, "blur"),
    ({"diameter": -1}, "diameter"),
    ({"target": {"name": "t", "root": "set"}}, "'target' must be"),
])
def test_a_wrong_config_is_refused_with_what_is_wrong(tmp_path, change, message):
    from dqtool.studies.real_rank import check_rank_config

    with pytest.raises(InputError, match=message):
        check_rank_config({**_tiny_config(tmp_path), **change})


@pytest.mark.parametrize("member, message", [
    ({"steps": 0}, "steps 0"), ({"rate": 1.5}, "rate 1.5"), ({"train": ["b"], "exclude": ["c"]}, "not both"),
    ({"name": "a/b"}, "a file name"), ({"root": "set", "typo": 1}, "unknown keys typo"),
])
def test_a_wrong_bank_member_is_refused_with_its_name(tmp_path, member, message):
    from dqtool.studies.real_rank import check_rank_config

    with pytest.raises(InputError, match=message):
        check_rank_config(_tiny_config(tmp_path, **member))


@pytest.mark.parametrize("member, message", [
    ({}, "would train on the target image 'a'"),  # every image of the target's folder, the target's too
    ({"train": ["a", "b"]}, "would train on the target image 'a'"),
    ({"exclude": ["z"]}, "excludes 'z', which is not an image"),
    ({"train": ["z"]}, "no image named 'z'"),
])
def test_no_bank_member_trains_on_the_target(tmp_path, member, message):
    from dqtool.studies.real_rank import rank_study_config

    with pytest.raises(InputError, match=message):
        rank_study_config(_tiny_config(tmp_path, **member), tmp_path / "out")
    assert not list((tmp_path / "out").glob("bank/*.pth"))  # refused before any training


def test_cli_rank_study_config_parses_and_calls_the_library(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from dqtool.studies import real_rank
    from dqtool.studies.rank_study import RankStudyResult
    from dqtool_cli.main import cli

    seen = []
    monkeypatch.setattr(real_rank, "rank_study_config", lambda config, out, **kw: seen.append((config, out, kw)) or
                        RankStudyResult(target="t", members=[], rows=[], correlations=[], timing={}))
    config = tmp_path / "c.json"
    config.write_text("{}")
    out = str(tmp_path / "s")
    res = CliRunner().invoke(cli, ["rank-study", "--config", str(config), "--data-root", str(tmp_path), "--out", out,
                                   "--quiet", "--empty", "skip"])
    assert res.exit_code == 0, res.output
    assert seen == [(str(config), out, {"data_root": str(tmp_path), "quiet": True, "empty": "skip"})]
    for extra in (["--target", "histo"], ["--quick"], ["--seed", "3"]):
        res = CliRunner().invoke(cli, ["rank-study", "--config", str(config), "--out", out, *extra])
        assert res.exit_code == 2 and f"drop {extra[0]}" in res.output, res.output
    res = CliRunner().invoke(cli, ["rank-study", "--data-root", str(tmp_path), "--out", out])
    assert res.exit_code == 2 and "--data-root goes with --config" in res.output
    assert len(seen) == 1


@pytest.mark.parametrize("variants, message", [
    ({"name": "x"}, "expected a list"),
    ([{"dropout_site": "bottleneck"}], "variant 1: expected"),
    ([{"name": "default", "empty": "skip"}], "not 'default'"),
    ([{"name": "v", "empty": "skip"}, {"name": "v", "empty": "worst"}], "variant name 'v'"),
    ([{"name": "v", "site": "bottleneck"}], "unknown keys site"),
    ([{"name": "v", "dropout_site": "encoder"}], "dropout_site 'encoder': expected one of decoder, bottleneck"),
    ([{"name": "v", "empty": "median"}], "empty 'median'"),
    ([{"name": "v", "perturbations": ["gamma"]}], "the study ranks with"),
])
def test_a_wrong_variant_is_refused(tmp_path, variants, message):
    from dqtool.studies.real_rank import check_rank_config

    with pytest.raises(InputError, match=message):
        check_rank_config({**_tiny_config(tmp_path, train=["b"]), "perturbations": ["dropout", "noise"],
                           "variants": variants})


def test_variants_rank_again_with_the_shared_cache_and_are_tabled_beside_the_default(tmp_path, monkeypatch):
    """Each variant's ranking is the one ``rank_bank`` gives with its options alone, without a cache (the shared
    unperturbed predictions change nothing), and the table holds the default's rows and each variant's."""
    from dqtool.ranking.rank import rank_bank
    from dqtool.studies.real_rank import rank_study_config

    _tiny_set(tmp_path / "data" / "set", names=("a", "b", "c", "d"))
    config = {"data_root": str(tmp_path / "data"), "target": {"name": "t", "root": "set", "images": ["a", "d"]},
              "bank": [{"name": "m1", "root": "set", "steps": 2, "train": ["b"]},
                       {"name": "m2", "root": "set", "steps": 3, "train": ["c"]}],
              "patch": {"size": 32, "stride": 32}, "perturbations": ["dropout", "noise"],
              "train": {"bsize": 32, "batch_size": 2, "nimg_per_epoch": 2, "min_train_masks": 1, "save_every": 50},
              "variants": [{"name": "bottleneck", "dropout_site": "bottleneck", "perturbations": ["dropout"]},
                           {"name": "skip", "empty": "skip"}]}
    out = tmp_path / "out"
    import dqtool.ranking.rank as R

    calls = []
    real_rank_bank = R.rank_bank
    monkeypatch.setattr(R, "rank_bank", lambda *a, **kw: calls.append(kw.get("out")) or real_rank_bank(*a, **kw))
    rank_study_config(config, out, quiet=True)
    monkeypatch.undo()
    # of the variants, only 'bottleneck' runs passes; 'skip' changes the empty rule alone: summarised again
    assert [Path(p).relative_to(out).as_posix() for p in calls] == ["variants/bottleneck"]
    rows = json.loads((out / "variants_correlations.json").read_text())
    seen = {(r["variant"], r["perturbation"], r["dropout_site"], r["empty"]) for r in rows}
    assert seen == {("default", "dropout", "decoder", "worst"), ("default", "noise", "decoder", "worst"),
                    ("bottleneck", "dropout", "bottleneck", "worst"), ("skip", "dropout", "decoder", "skip"),
                    ("skip", "noise", "decoder", "skip")}
    default = json.loads((out / "study_correlations.json").read_text())
    assert [{k: v for k, v in r.items() if k not in ("variant", "dropout_site", "dropout_draw", "empty")}
            for r in rows if r["variant"] == "default"] == default
    for name, kind, options in (("bottleneck", "dropout", {"dropout_site": "bottleneck"}),
                                ("skip", "noise", {"empty": "skip"})):
        alone = rank_bank(out / "bank", out / "splits" / "target.json", labels=out / "splits" / "target.json",
                          perturbations=[kind], out=tmp_path / f"alone_{name}", cache=False, subfolders=True,
                          **options)
        recorded = json.loads((out / "variants" / name / kind / "rank.json").read_text())
        assert alone.results[kind].options == {k: recorded[k] for k in ("dropout_site", "dropout_draw", "empty")}
        assert {k: recorded[k] for k in options} == options
        for table in ("ranking.csv", "per_image.csv", "validation.csv", "ranking.md"):
            assert (tmp_path / f"alone_{name}" / kind / table).read_bytes() == \
                (out / "variants" / name / kind / table).read_bytes(), (name, table)
        alone_json = json.loads((tmp_path / f"alone_{name}" / kind / "rank.json").read_text())

        def untimed(record):  # wall-clock seconds differ run to run; everything else is the same
            return {**{k: v for k, v in record.items() if k != "timing"},
                    "ranking": [{k: v for k, v in m.items() if k != "seconds"} for m in record["ranking"]]}

        assert untimed(recorded) == untimed(alone_json)
    # a finished ranking read back from its folder is summarised again to the same files (the study resumes
    # a variant from it; the rule it ran with gives its own tables back, the other rule the variant's)
    names = [f.name for f in R.target_files(out / "splits" / "target.json")]
    back = R.read_ranking(out / "rank" / "noise")
    for rule, where in (("worst", out / "rank" / "noise"), ("skip", out / "variants" / "skip" / "noise")):
        R.write_outputs(R.rescore_empty(back, rule), tmp_path / f"again_{rule}", names)
        for table in ("ranking.csv", "per_image.csv", "validation.csv"):
            assert (tmp_path / f"again_{rule}" / table).read_bytes() == (where / table).read_bytes(), (rule, table)
    with pytest.raises(InputError, match="not a finished ranking"):
        R.read_ranking(tmp_path / "alone_bottleneck")
    # the table written again from the files alone (a study whose variants were finished after a kill)
    from dqtool.studies.rank_variants import check_variants, tabulate_variants

    table = (out / "variants_correlations.json").read_bytes()
    (out / "variants_correlations.json").unlink()
    tabulate_variants(out, check_variants(config["variants"], config["perturbations"]),
                      {"dropout_site": "decoder", "dropout_draw": "batch", "empty": "worst"})
    assert (out / "variants_correlations.json").read_bytes() == table
    assert not (out / "variants" / "bottleneck" / "cache").exists()  # the study's cache, not one of its own
    # 2 models x 1 image content (a and d hold the same pixels), stored once by the study and only read after
    assert len(list((out / "rank" / "cache").glob("*.npz"))) == 2
