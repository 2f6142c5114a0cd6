"""``dqtool rank-study --config``: label-free model ranking on real data, from one JSON config (issue 13, part 2).

The study asks whether the consistency of a model's outputs under perturbation (paper 004) ranks models as
their true accuracy on unlabelled real images would. A bank of Cellpose models is trained on different real
sources and budgets, then ranked on a real labelled target that no bank model trained on with each
perturbation (bottleneck dropout, input noise), all in one :func:`dqtool.ranking.rank.rank_bank` run. Each model's median
consistency scores (adapted Rand, NHD, effective invariance) are set against its F1 at IoU 0.5 and its mean
accuracy over IoU 0.5:0.95 on the target's labels: Pearson (raw), Spearman and Kendall (ranks), each with a
permutation-test p-value. Tables, correlations and the panel plot are the synthetic study's
(:func:`dqtool.studies.rank_study.rank_target`): ``study.*``, ``study_correlations.*``, ``study_summary.json``,
``study.png``, and one ranking folder per perturbation (``rank/<perturbation>/``).

The config (``studies/real_rank.json``), paths relative to ``data_root``:

- ``data_root``: relative to the config file (``--data-root`` replaces it);
- ``target``: ``{"name", "root", "images": [names]}``, labelled images of one dataset folder;
- ``bank``: members ``{"name", "root", "steps", "train": [names] or "exclude": [names] or "target", "rate",
  "format"}``: the images of ``root`` the member trains on (all of them without ``train``/``exclude``;
  ``"exclude": "target"`` leaves out the target's images), its SGD steps (``steps`` epochs of one batch, the
  ``train`` block's ``nimg_per_epoch`` = ``batch_size``), and the fraction of its patches it keeps (``rate``,
  the seeded random baseline of :func:`dqtool.studies.rank_study.member_indices`);
- ``train``: the members' shared training settings (:class:`TrainConfig` fields but ``n_epochs``);
- ``patch``: the patch caches' ``size`` and ``stride``; ``seed``; ``perturbations``; ``notes``;
- ``diameter``: the cell diameter (px) every model assumes on the target (rank's ``--diameter``; null: each
  model's training diameter, the target seen at its own scale);
- ``variants``: the ranking again with other options, side by side (:mod:`dqtool.studies.rank_variants`:
  ``[{"name", "dropout_site", "dropout_draw", "empty", "perturbations"}, ...]``, ``variants_correlations.*``).

Nothing is copied: the target and each member's images are split files in ``OUT/splits/`` (:func:`write_split`),
read in place by dqtool's readers; members with the same images share one patch cache in ``OUT/caches/``. A
member whose model exists is not trained again (a killed training resumes from its checkpoint); ``OUT/bank.json``
records what each member trains on and with, and a member whose record differs from the config is refused, not
reused. A member that would train on a target image is refused.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dqtool.common.cluster import Cluster
from dqtool.common.errors import InputError
from dqtool.common.outputs import kill_point
from dqtool.common.tables import write_json
from dqtool.segmentation.train import TrainConfig
from dqtool.studies.caches import patch_caches
from dqtool.studies.config_files import check_keys, read_config
from dqtool.studies.rank_study import RankStudyResult, rank_options, rank_target, study_folder, train_bank
from dqtool.studies.trainings import parse_resources

__all__ = ["RealMember", "load_rank_config", "check_rank_config", "rank_study_config"]

DEFAULTS = {"seed": 0, "patch": {"size": 224, "stride": 112}, "train": {}, "perturbations": ["dropout", "noise"],
            "diameter": None}
_KEYS = {"notes", "data_root", "target", "bank", "variants", *DEFAULTS}
_MEMBER_KEYS = {"name", "root", "steps", "train", "exclude", "rate", "format"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class RealMember:
    """One bank model: ``steps`` SGD steps on a ``rate`` fraction of the patches of its images of ``root``."""

    name: str
    root: str
    steps: int
    rate: float = 1.0
    train: tuple | None = None  # image names; None: every image of root but the excluded ones
    exclude: tuple | str = ()  # image names, or "target" (the target's images)
    format: str | None = None


def load_rank_config(path: str | os.PathLike, data_root: str | os.PathLike | None = None) -> dict:
    """Read and check a study config; a relative ``data_root`` in it is relative to the config file's
    folder, and ``data_root`` given here (``--data-root``) replaces it."""
    return check_rank_config(read_config(path, data_root), str(path))


def check_rank_config(config: dict, where: str = "config") -> dict:
    """The config with its defaults, or an :class:`InputError` naming the first thing wrong in it."""
    from dqtool.ranking.rank import parse_perturbations

    check_keys(config, _KEYS, where)
    config = {**DEFAULTS, **config}
    target = config.get("target")
    if not (isinstance(target, dict) and isinstance(target.get("name"), str) and "root" in target
            and isinstance(target.get("images"), list) and target["images"]):
        raise InputError(f"{where}: 'target' must be {{'name': NAME, 'root': DIR, 'images': [image names]}}")
    if "n_epochs" in config["train"]:
        raise InputError(f"{where}: 'train' sets n_epochs; each bank member gives its own 'steps'")
    TrainConfig(**config["train"])  # the training settings' own checks
    config["perturbations"] = list(parse_perturbations(config["perturbations"]))
    diameter = config["diameter"]
    if diameter is not None and not (isinstance(diameter, (int, float)) and diameter > 0):
        raise InputError(f"{where}: diameter {diameter!r}: expected a positive number of pixels, or null")
    if "variants" in config:
        from dqtool.studies.rank_variants import check_variants

        config["variants"] = check_variants(config["variants"], config["perturbations"], where)
    members = config_members(config, where)
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise InputError(f"{where}: bank member {next(n for n in names if names.count(n) > 1)!r} named twice")
    return config


def config_members(config: dict, where: str = "config") -> list[RealMember]:
    """The config's bank as :class:`RealMember` records (each checked)."""
    bank = config.get("bank")
    if not isinstance(bank, list) or not bank:
        raise InputError(f"{where}: 'bank' must list the models to train, e.g. "
                         "[{'name': 'a', 'root': DIR, 'steps': 100}, ...]")
    members = []
    for k, spec in enumerate(bank):
        if not isinstance(spec, dict) or not {"name", "root", "steps"} <= set(spec):
            raise InputError(f"{where}: bank member {k + 1} must give at least 'name', 'root' and 'steps'")
        name = str(spec["name"])
        unknown = sorted(set(spec) - _MEMBER_KEYS)
        if unknown:
            raise InputError(f"{where}: bank member {name!r}: unknown keys {', '.join(unknown)}")
        if not _NAME.match(name):
            raise InputError(f"{where}: bank member name {name!r}: use letters, digits, '_', '-' and '.' (a file name)")
        if "train" in spec and "exclude" in spec:
            raise InputError(f"{where}: bank member {name!r}: give 'train' or 'exclude', not both")
        steps, rate = spec["steps"], float(spec.get("rate", 1.0))
        if not isinstance(steps, int) or steps < 1:
            raise InputError(f"{where}: bank member {name!r}: steps {steps!r} is not a positive integer")
        if not 0 < rate <= 1:
            raise InputError(f"{where}: bank member {name!r}: rate {rate} is not in (0, 1]")
        exclude = spec.get("exclude", [])
        if exclude != "target" and not isinstance(exclude, list):
            raise InputError(f"{where}: bank member {name!r}: 'exclude' must list image names or be \"target\"")
        if "train" in spec and not (isinstance(spec["train"], list) and spec["train"]):
            raise InputError(f"{where}: bank member {name!r}: 'train' must list image names")
        members.append(RealMember(name=name, root=str(spec["root"]), steps=steps, rate=rate,
                                  train=tuple(map(str, spec["train"])) if "train" in spec else None,
                                  exclude=exclude if exclude == "target" else tuple(map(str, exclude)),
                                  format=spec.get("format")))
    return members


def _base(config: dict) -> Path:
    """The folder the config's roots are relative to."""
    return Path(config.get("data_root") or ".")


def _target_split(config: dict, out: Path) -> tuple[Path, set[Path]]:
    """The target's split file (labelled, checked) and its image files."""
    from dqtool.data.datasets import open_dataset, write_split

    target = config["target"]
    split = write_split(out / "splits" / "target.json", _base(config) / target["root"],
                        target["images"], format=target.get("format"))
    dataset = open_dataset(split)
    if not dataset.has_labels:
        raise InputError(f"{split}: the target needs labels for every image (they validate the ranking)")
    return split, {Path(s.image_path).resolve() for s in dataset}


def _member_split(member: RealMember, config: dict, out: Path, target_files: set[Path]) -> tuple[Path, tuple]:
    """The member's split file and the key of its images (same key, same patch cache)."""
    from dqtool.data.datasets import open_dataset, write_split

    root = _base(config) / member.root
    samples = list(open_dataset(root, format=member.format))
    if member.train is not None:
        names = list(member.train)
    else:
        exclude = set(config["target"]["images"] if member.exclude == "target" else member.exclude)
        missing = sorted(exclude - {s.name for s in samples})
        if missing and member.exclude != "target":
            raise InputError(f"bank member {member.name!r}: excludes {missing[0]!r}, which is not an image of {root}")
        names = [s.name for s in samples if s.name not in exclude]
    split = write_split(out / "splits" / f"{member.name}.json", root, names, format=member.format)
    leaked = [s.name for s in open_dataset(split) if Path(s.image_path).resolve() in target_files]
    if leaked:
        raise InputError(f"bank member {member.name!r} would train on the target image {leaked[0]!r}; exclude the "
                         "target's images (\"exclude\": \"target\")")
    return split, (str(root.resolve()), member.format, tuple(names))


def _record(member: RealMember, images: tuple, config: dict) -> dict:
    """What a member's model is trained on and with (``OUT/bank.json``)."""
    return {"root": member.root, "format": member.format, "images": list(images), "steps": member.steps,
            "rate": member.rate, "train": _train_config(member, config).to_dict(), "patch": config["patch"]}


def _train_config(member: RealMember, config: dict) -> TrainConfig:
    return TrainConfig(**{"seed": int(config["seed"]), **config["train"], "n_epochs": member.steps})


def _check_bank_folder(out: Path, members: list[RealMember], records: dict) -> None:
    """Refuse a study folder whose models are not this config's: a model no member names (it would be
    ranked too), or a member's model trained on other images or settings."""
    old = json.loads((out / "bank.json").read_text()) if (out / "bank.json").exists() else {}
    names = {m.name for m in members}
    strangers = sorted(p.name for p in (out / "bank").glob("*.pth") if p.stem not in names)
    if strangers:
        raise InputError(f"{out / 'bank'}: holds {strangers[0]}, which no bank member of the config names (it would "
                         "be ranked too); choose another --out or move it away")
    for m in members:
        if (out / "bank" / f"{m.name}.pth").exists() and m.name in old and old[m.name] != records[m.name]:
            differs = next(k for k in records[m.name] if old[m.name].get(k) != records[m.name][k])
            raise InputError(f"{out / 'bank' / (m.name + '.pth')}: trained with another {differs!r} than the "
                             "config gives; choose another --out, or delete the model to train it again")


def _train_real_bank(config: dict, out: Path, quiet: bool, cluster: Cluster, resources: dict | None) -> list[Path]:
    """Write the splits, build the caches the untrained members need, train them (:func:`train_bank`)."""
    members = config_members(config)
    (out / "splits").mkdir(exist_ok=True)
    _, target_files = _target_split(config, out)
    splits = {m.name: _member_split(m, config, out, target_files) for m in members}
    records = {m.name: _record(m, splits[m.name][1][2], config) for m in members}
    _check_bank_folder(out, members, records)
    write_json(out / "bank.json", records)
    todo = [m for m in members if not (out / "bank" / f"{m.name}.pth").exists()]
    first: dict[tuple, str] = {}  # images key -> the first member that trains on them (its cache's name)
    for m in todo:
        first.setdefault(splits[m.name][1], m.name)
    caches = patch_caches({name: {"train": splits[name][0]} for name in first.values()}, config, out, quiet)
    return train_bank(out / "bank", members, lambda m: caches[first[splits[m.name][1]]],
                      lambda m: _train_config(m, config), int(config["seed"]), quiet=quiet, cluster=cluster,
                      resources=resources)


def rank_study_config(config: dict | str | os.PathLike, out: str | os.PathLike,
                      data_root: str | os.PathLike | None = None, quiet: bool = True,
                      dropout_site: str | None = None, dropout_draw: str | None = None, empty: str | None = None,
                      cluster: Cluster | None = None, train_resources: str | dict | None = None) -> RankStudyResult:
    """Train the config's bank (a finished model is kept), rank it on the target with every perturbation and
    write the study's tables, correlations and plot in ``out``; returns the study's summary.

    ``config`` is a config file (``data_root`` relative to it) or a dict (``data_root`` as given);
    ``data_root`` replaces the config's. ``dropout_site``, ``dropout_draw`` and ``empty`` go to every ranking
    (None: rank_bank's defaults). ``cluster`` (``--workers``/``--scheduler``): the members train as one Dask
    task each (asking for ``train_resources``, e.g. ``"GPU=1"``) and the rankings run as (model, image) tasks.
    """
    if isinstance(config, dict):
        config = check_rank_config({**config, **({"data_root": str(data_root)} if data_root is not None else {})})
    else:
        config = load_rank_config(config, data_root=data_root)
    out = Path(out)
    roots = [_base(config) / config["target"]["root"], *(_base(config) / m.root for m in config_members(config))]
    resources = parse_resources(train_resources)
    with study_folder(out, quiet, cluster, inputs=roots) as cluster:
        _train_real_bank(config, out, quiet, cluster, resources)
        kill_point("rank-study:bank")  # tests: the bank trained, nothing ranked yet
        split = out / "splits" / "target.json"
        diameter = {} if config["diameter"] is None else {"diameter": float(config["diameter"])}
        options = {**rank_options(dropout_site, dropout_draw, empty), **diameter}
        result = rank_target(out, split, split, config["target"]["name"], [m.name for m in config_members(config)],
                             config["perturbations"], int(config["seed"]), quiet, options, cluster)
        if config.get("variants"):
            from dqtool.ranking.perturb import DEFAULT_DROPOUT_DRAW, DEFAULT_DROPOUT_SITE
            from dqtool.ranking.rank import DEFAULT_EMPTY
            from dqtool.studies.rank_variants import run_variants

            defaults = {"dropout_site": DEFAULT_DROPOUT_SITE, "dropout_draw": DEFAULT_DROPOUT_DRAW,
                        "empty": DEFAULT_EMPTY}
            ran_with = {k: options.get(k, v) for k, v in defaults.items()}
            run_variants(config["variants"], out, split, split, int(config["seed"]), options, ran_with, quiet,
                         cluster, default_results=result.rankings)
        return result
