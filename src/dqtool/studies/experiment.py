"""``dqtool experiment``: a whole study of the paper from one JSON config (Tables I, IV-VIII, Fig. 1).

Steps, each reusing what an earlier run of the same config already wrote (models, evaluations, caches):

1. caches: the train split of every domain cut into patches (``dqtool.cache.build_cache``);
2. redundancy curve (Table I, Fig. 1): on the source domain, a model from scratch per rate and
   selection method (``dq`` / ``random``) plus one on all patches, scored on the source test split;
3. zero-shot (Table IV): the all-patches source model on every domain's test split;
4. naive finetuning (Tables V, VI): the source model finetuned on each target (``dqtool.transfer.finetune``);
5. replay (Table VIII): the same with a source subset at each replay rate (``dqtool.transfer.replay``);
6. sequences (Table VII): multi-stage paths (``dqtool.transfer.sequence``);
7. source-free retention (``retain``, issue 15): the finetunings of step 4 again with each ``--retain``
   method and weight W (:mod:`dqtool.segmentation.retention`), scored on the test splits and on each domain's
   ``val`` split, where W is chosen (:func:`choose_retain_weights`), never on the test split; with
   ``retain_seeds``, naive finetuning, each method at its chosen W and the replays again with each of those
   seeds (:mod:`dqtool.studies.retention_seeds`: table ``retention_seeds``, the spread and the issue's goal);
8. the active-learning round (``active``, issue 15): a start model finetuned on patches added by random, DQ,
   k-center and uncertainty selection (:mod:`dqtool.studies.active`), after the other steps.

Tables go to ``OUT/tables/*.{csv,md,json}``, the Fig. 1 plot to ``OUT/fig1_rate_curve.png`` and a
Markdown summary to ``OUT/report.md``, rewritten after every step; :func:`run_experiment` returns the tables
as an :class:`ExperimentResult`. A killed study continues where it stopped when run again with the same
config (each training resumes from its last checkpoint). With ``--workers``/``--scheduler`` the
independent trainings run as Dask tasks (:func:`run_experiment`). ``QUICK`` is a built-in config for the
embedded synthetic domains, sized for a 2-core CPU (27 min measured with nothing else running).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dqtool.common.cluster import SERIAL, Cluster, connect
from dqtool.common.errors import InputError
from dqtool.common.figures import pyplot, save_figure
from dqtool.common.files import atomic_write_text
from dqtool.common.outputs import kill_point, write_marker, writing
from dqtool.common.tables import format_markdown, seed_spread, write_json, write_table
from dqtool.segmentation.train import TrainConfig, load_patches, train_patches
from dqtool.segmentation.transfer import DEFAULT_METRICS, Stage, finetune, replay, score_stage, sequence
from dqtool.selection.subsets import random_subset, subset_total
from dqtool.studies.caches import patch_caches
from dqtool.studies.config_files import check_keys, read_config
from dqtool.studies.trainings import parse_resources, train_models

#: The built-in quick study on the embedded default domains (``dqtool.synthetic``).
QUICK = {
    "data": "synthetic",
    "seed": 0,
    "patch": {"size": 112, "stride": 112},
    # 100 epochs of one batch of 8 patches: 100 SGD steps per model (30 epochs of 16 left some models
    # predicting nothing), about a minute and a half per model on 2 CPU cores
    "train": {"n_epochs": 100, "bsize": 64, "batch_size": 8, "nimg_per_epoch": 8, "save_every": 25,
              "min_train_masks": 3},
    "source": "fluo",
    "targets": ["histo", "multi"],
    "rates": [0.1, 0.3],
    "methods": ["dq", "random"],
    "embed_epochs": 2,
    "replay_rates": [0.1],
    "replay_method": "dq",
    "sequences": [["fluo", "histo", "multi"]],
}

#: Defaults of a user's config: the paper's training settings, both selection methods.
DEFAULTS = {"seed": 0, "patch": {"size": 224, "stride": 112}, "train": {}, "targets": [],
            "rates": [0.05, 0.1, 0.25, 0.5], "methods": ["dq", "random"], "embed_epochs": None,
            "replay_rates": [0.05], "replay_method": "dq", "sequences": []}

#: Optional keys (absent = the step is not run), see :func:`check_config`:
#: ``data_root`` (folder the domains' paths are relative to; itself relative to the config file),
#: ``repeat_seeds`` and ``repeat_rates`` (the redundancy models at these rates again with these seeds),
#: ``zero_shot_rates`` (DQ models at these rates also scored on every domain, Table IV),
#: ``reverse`` (targets whose from-scratch model is finetuned on the source, Table V),
#: ``joint`` (targets trained together with the source from scratch, Table V),
#: ``replay_random_rates`` (random replay beside the DQ one, Table VIII), ``notes`` (free text),
#: ``retain`` ([{"method": "l2sp"|"lwf", "weight": W}, ...]: the finetunings of Table V again with each),
#: ``retain_seeds`` (with ``retain``: naive finetuning, each method at its W chosen on val, and the replays again
#: with these seeds), ``replay_reverse`` (true: the replays also in the reverse direction, the target's scratch
#: model finetuned on the source with a subset of the target's patches replayed),
#: ``active`` (the active-learning round, :data:`dqtool.studies.active.ACTIVE_DEFAULTS` for its keys; its random
#: start model is the redundancy model at ``start_rate``, which joins Table I).
OPTIONAL = ("data_root", "repeat_seeds", "repeat_rates", "zero_shot_rates", "reverse", "joint",
            "replay_random_rates", "notes", "metrics", "retain", "retain_seeds", "replay_reverse", "active")
#: The rule choosing W on the validation split: the largest source F1 among the weights that keep the target
#: F1 within this of naive finetuning's (issue 15's goal: lose at most 0.02 target F1).
RETAIN_TOLERANCE = 0.02

METHODS = ("dq", "random", "kcenter")


@dataclass(frozen=True)
class ExperimentResult:
    """The tables of a study (rows as written to ``OUT/tables/<name>.{csv,md,json}``) and its folder."""

    out: Path
    source_model: Path  # the all-patches model of the source domain, the start of every transfer
    redundancy: list[dict] = field(default_factory=list)  # Table I / Fig. 1: one row per (method, rate)
    zero_shot: list[dict] = field(default_factory=list)  # Table IV: the source model on every test domain
    transfer: list[dict] = field(default_factory=list)  # Tables V, VI, VIII: finetuning and replay per target
    sequences: list[dict] = field(default_factory=list)  # Table VII: after each stage of each sequence
    retention: list[dict] = field(default_factory=list)  # issue 15: finetuning with --retain, W chosen on val
    retention_seeds: list[dict] = field(default_factory=list)  # issue 15: the chosen W, naive and replay over seeds
    active: list[dict] = field(default_factory=list)  # issue 15: the active-learning round, one row per model

    def tables(self) -> dict[str, list[dict]]:
        """{table name: rows} of the tables the study filled."""
        names = ("redundancy", "zero_shot", "transfer", "sequences", "retention", "retention_seeds", "active")
        return {name: getattr(self, name) for name in names if getattr(self, name)}

    def to_dict(self) -> dict:
        return {"out": str(self.out), "source_model": str(self.source_model), **self.tables()}


_KEYS = {"data", "domains", "seed", "patch", "train", "source", "targets", "rates", "methods", "embed_epochs",
         "replay_rates", "replay_method", "sequences", *OPTIONAL}


def load_config(path: str | os.PathLike, data_root: str | os.PathLike | None = None) -> dict:
    """Read and check a study config (JSON). A relative ``data_root`` in it is taken relative to the
    config file's folder; ``data_root`` given here (``--data-root``) replaces it."""
    return check_config(read_config(path, data_root), str(path))


def check_config(config: dict, where: str = "config") -> dict:
    check_keys(config, _KEYS, where)
    if "source" not in config:
        raise InputError(f"{where}: no 'source' domain")
    config = {**DEFAULTS, **config}
    if config.get("data") != "synthetic" and not isinstance(config.get("domains"), dict):
        raise InputError(f"{where}: give 'domains' ({{name: {{'train': DIR, 'test': DIR}}}}) or \"data\": \"synthetic\"")
    TrainConfig(**config["train"])  # validates the training options
    for r in list(config["rates"]) + list(config["replay_rates"]):
        if not 0 < float(r) <= 1:
            raise InputError(f"{where}: rate {r} is not in (0, 1]")
    for m in config["methods"]:
        if m not in METHODS:
            raise InputError(f"{where}: method {m!r}: expected one of {', '.join(METHODS)}")
    for key in ("repeat_rates", "zero_shot_rates", "replay_random_rates"):
        for r in config.get(key, []):
            if not 0 < float(r) <= 1:
                raise InputError(f"{where}: {key}: rate {r} is not in (0, 1]")
    for key in ("reverse", "joint"):
        for d in config.get(key, []):
            if d not in config["targets"]:
                raise InputError(f"{where}: {key}: {d!r} is not one of the targets {config['targets']}")
    config["retain"] = [_retain_entry(e, where) for e in config.get("retain", [])] if "retain" in config else []
    if not config["retain"]:
        del config["retain"]
    if "retain_seeds" in config:
        seeds = config["retain_seeds"]
        if not config.get("retain"):
            raise InputError(f"{where}: retain_seeds: no 'retain' entries whose chosen W they would repeat")
        if (not isinstance(seeds, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in seeds)
                or len(set(seeds)) != len(seeds) or int(config["seed"]) in seeds):
            raise InputError(f"{where}: retain_seeds: {seeds!r}: expected a list of distinct integer seeds other "
                             f"than the study's seed {config['seed']}")
    if "replay_reverse" in config:
        if not isinstance(config["replay_reverse"], bool):
            raise InputError(f"{where}: replay_reverse: {config['replay_reverse']!r}: expected true or false")
        if config["replay_reverse"] and not config.get("reverse"):
            raise InputError(f"{where}: replay_reverse: no 'reverse' targets to replay in the reverse direction")
    if "active" in config:
        from dqtool.studies.active import check_active

        names = [config["source"], *config["targets"]] if config.get("data") == "synthetic" else list(config["domains"])
        config["active"] = check_active(config["active"], names, config["source"], where)
    return config


def _retain_entry(entry, where: str) -> dict:
    """One ``retain`` entry checked: {"method": "l2sp"|"lwf", "weight": W >= 0, finite}."""
    if not isinstance(entry, dict) or set(entry) != {"method", "weight"}:
        raise InputError(f"{where}: retain: {entry!r}: expected {{'method': 'l2sp' or 'lwf', 'weight': W}}")
    if entry["method"] not in ("l2sp", "lwf"):
        raise InputError(f"{where}: retain: method {entry['method']!r}: expected 'l2sp' or 'lwf'")
    if isinstance(entry["weight"], bool) or not isinstance(entry["weight"], (int, float)):
        raise InputError(f"{where}: retain: weight {entry['weight']!r}: expected a number")
    TrainConfig(retain=entry["method"], retain_weight=entry["weight"])  # W >= 0 and finite, or one line
    return {"method": entry["method"], "weight": float(entry["weight"])}


def _domains(config: dict, out: Path, quiet: bool) -> dict[str, dict[str, Path]]:
    """{domain: {"train": folder or split file, "test": ...}}.

    A domain is ``{"train": DIR, "test": DIR}`` (two folders), or ``{"root": DIR, "test": [image names]}``
    (a fixed split by image of one folder: the named images are the test split, the others the train split;
    ``"train": [names]`` may be given too, and ``"format"`` names the layout). A split is written as split
    files in ``OUT/splits/`` (:func:`dqtool.data.datasets.write_split`); no image is copied. An optional
    ``"val"`` (a folder, or image names of ``root`` kept out of the train split) is the validation split
    on which the retention weights are chosen.
    """
    if config.get("data") == "synthetic":
        from dqtool.data.synthetic import generate

        root = generate(out / "data", seed=int(config["seed"]), quiet=quiet)
        names = [config["source"], *config["targets"]]
        return {d: {"train": root / d / "train", "test": root / d / "test"} for d in dict.fromkeys(names)}
    base = Path(config.get("data_root") or ".")
    domains = {}
    for name, spec in config["domains"].items():
        if not isinstance(spec, dict) or "test" not in spec or ("train" not in spec and "root" not in spec):
            raise InputError(f"domain {name!r}: expected {{'train': DIR, 'test': DIR}} or "
                             "{'root': DIR, 'test': [image names]}")
        if "root" in spec:
            domains[name] = _split_domain(name, spec, base, out)
        else:
            domains[name] = {"train": base / spec["train"], "test": base / spec["test"],
                             **({"val": base / spec["val"]} if "val" in spec else {})}
    for name in [config["source"], *config["targets"], *(d for s in config["sequences"] for d in s)]:
        if name not in domains:
            raise InputError(f"domain {name!r} is used but not defined in 'domains'")
    return domains


def _split_domain(name: str, spec: dict, base: Path, out: Path) -> dict[str, Path]:
    from dqtool.data.datasets import open_dataset, write_split

    root = base / spec["root"]
    fmt = spec.get("format")
    every = [s.name for s in open_dataset(root, format=fmt, domain=name)]
    test = [str(n) for n in spec["test"]]
    if not isinstance(spec["test"], list) or not test:
        raise InputError(f"domain {name!r}: 'test' must list the test images by name")
    val = [str(n) for n in spec.get("val", [])]
    if "val" in spec and (not isinstance(spec["val"], list) or not val):
        raise InputError(f"domain {name!r}: 'val' must list the validation images by name")
    held = set(test) | set(val)
    train = [str(n) for n in spec["train"]] if "train" in spec else [n for n in every if n not in held]
    for a, b, other in ((train, test, "test"), (train, val, "val"), (val, test, "test")):
        both = sorted(set(a) & set(b))
        if both:
            first = "train" if a is train else "val"
            raise InputError(f"domain {name!r}: image {both[0]!r} is in both the {first} and the {other} split")
    folder = out / "splits"
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"train": write_split(folder / f"{name}.train.json", root, train, format=fmt),
              "test": write_split(folder / f"{name}.test.json", root, test, format=fmt)}
    if val:
        splits["val"] = write_split(folder / f"{name}.val.json", root, val, format=fmt)
    return splits


def _scores_row(stage: Stage, metrics) -> dict:
    """{"<domain> <metric>": mean, "<domain> <metric> std": std over test images} of a stage."""
    row = {}
    for d, s in stage.scores.items():
        for m, v in s.items():
            row[f"{d} {m}"] = v
            row[f"{d} {m} std"] = stage.stds.get(d, {}).get(m, float("nan"))
    return row


def plot_rate_curve(rows: list[dict], path: Path, metric: str, full: float | None, domain: str) -> Path:
    """Fig. 1: the metric against the selection rate, one line per method, the all-patches model dashed."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(4.8, 3.4), dpi=100)
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "all"):
        pts = sorted((r["rate"], r[metric]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts), marker="o", label=method)
    if full is not None:
        ax.axhline(full, ls="--", color="gray", label="all patches")
    ax.set_xlabel("selection rate")
    ax.set_ylabel(f"{domain} {metric}")
    ax.set_title("redundancy: score vs rate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def run_experiment(config: dict | str | os.PathLike | None, out_dir: str | os.PathLike, quick: bool = False,
                   quiet: bool = False, data_root: str | os.PathLike | None = None, cluster: Cluster | None = None,
                   train_resources: str | dict | None = None) -> ExperimentResult:
    """Run the study (``quick``: the built-in :data:`QUICK` config); writes the tables, Fig. 1 and
    ``report.md`` and returns them as an :class:`ExperimentResult`.

    ``cluster`` (``--workers``/``--scheduler``): every training is a Dask task, in one batch: each redundancy
    model (trained and scored; the zero-shot ones on every domain), and one task per finetuning, joint
    model, replay and sequence, and one per non-source domain's from-scratch model (trained and scored once).
    A task that starts from the all-patches source model or a scratch model waits for that task only (a Dask
    dependency) and reuses its evaluation records; each task asks for ``train_resources`` (e.g.
    ``"GPU=1"``); the models and tables are the serial run's with one torch thread
    (:mod:`dqtool.studies.trainings`)."""
    if quick:
        config = dict(QUICK)
    elif config is None:
        raise InputError("give a CONFIG file or --quick")
    if isinstance(config, dict):
        config = check_config({**config, **({"data_root": str(data_root)} if data_root is not None else {})})
    else:
        config = load_config(config, data_root=data_root)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    resources = parse_resources(train_resources)
    with writing(out, "experiment", kind="folder"):  # a study folder: refused if a lab's, locked, one-line faults
        with connect(cluster, quiet=quiet) as cluster:  # one client for every batch of trainings
            return _run_experiment(config, out, quiet, cluster, resources)


def _run_experiment(config: dict, out: Path, quiet: bool, cluster: Cluster = SERIAL,
                    resources: dict | None = None) -> ExperimentResult:
    record = out / "experiment.json"
    if record.exists() and json.loads(record.read_text()) != json.loads(json.dumps(config)):
        raise InputError(f"{out}: holds a study with a different config; choose another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "experiment")
    write_json(record, config)
    tables_dir = out / "tables"
    tables_dir.mkdir(exist_ok=True)
    metrics = tuple(config.get("metrics", DEFAULT_METRICS))
    tconf = TrainConfig(**{"seed": int(config["seed"]), **config["train"]})
    domains = _domains(config, out, quiet)
    caches = patch_caches(domains, config, out, quiet)
    evals = {name: str(d["test"]) for name, d in domains.items()}
    evals_val = {name: str(d["val"]) for name, d in domains.items() if "val" in d}  # where W is chosen
    source = config["source"]
    tables: dict[str, list[dict]] = {}

    # 2. redundancy curve on the source
    from dqtool.data.cache import PatchCache  # h5py

    with PatchCache(caches[source]) as c:
        n_source = len(c)
    if any(m != "random" for m in config["methods"]):
        from dqtool.features.embed import embed_cache  # torch and the MAE, for DQ and k-center only

        embed_cache(caches[source], epochs=config.get("embed_epochs"), seed=tconf.seed, quiet=quiet)
    runs = [("all", 1.0, tconf.seed)] + [(m, float(r), tconf.seed) for r in config["rates"] for m in config["methods"]]
    runs += [(m, float(r), int(k)) for k in config.get("repeat_seeds", []) for r in config.get("repeat_rates", [])
             for m in config["methods"]]
    active = config.get("active")
    if active and "random" in active["starts"] and ("random", active["start_rate"], tconf.seed) not in runs:
        runs.append(("random", active["start_rate"], tconf.seed))  # the active round's start model
    if active and any(m != "random" for m in active["methods"]) and all(m == "random" for m in config["methods"]):
        from dqtool.features.embed import embed_cache

        embed_cache(caches[source], epochs=config.get("embed_epochs"), seed=tconf.seed, quiet=quiet)
    zero_shot = {("all", 1.0)} | {("dq", float(r)) for r in config.get("zero_shot_rates", [])}
    evals_all = {**evals, **({f"{d}_val": v for d, v in evals_val.items()} if config.get("retain") else {})}
    red_jobs = []  # the redundancy models are independent: selected here, trained (and scored) as tasks
    for method, rate, seed in runs:
        indices = _selection(caches[source], n_source, method, rate, seed)
        name = f"{source}_{method}_{rate:g}" + (f"_seed{seed}" if seed != tconf.seed else "")
        model = out / "models" / "redundancy" / name
        run_conf = tconf if seed == tconf.seed else TrainConfig(**{**tconf.to_dict(), "seed": seed})
        # a zero-shot model (Table IV) is scored on every domain in its own task; the all-patches one also
        # on the validation splits: every finetuning that starts from it reuses these records
        scored_on = ({source: evals[source]} if seed != tconf.seed or (method, rate) not in zero_shot
                     else evals_all if method == "all" else evals)
        red_jobs.append(ModelJob(cache=str(caches[source]), indices=indices, model=model, config=run_conf,
                                       provenance={"method": method, "rate": rate, "selection_seed": seed},
                                       stage=name.removeprefix(f"{source}_"), evals=scored_on,
                                       eval_dir=out / "models" / "redundancy", metrics=metrics,
                                       quiet=quiet or cluster.active))
    source_model = red_jobs[0].model

    # 4-6. finetuning (both ways), joint training, replay and sequences: independent of each other once the
    # source model exists, so one task each (a target's or a sequence's from-scratch start and what begins
    # from it share one task). All tasks go out as one batch: the source model first, then the transfer
    # tasks (longest first), each waiting only for the source model if it starts from it, then the other
    # redundancy models; the tables are assembled here in the config's order
    if config.get("replay_reverse") and any(m != "random" for m, _ in _replays(config)):
        from dqtool.features.embed import embed_cache  # the reverse replays' DQ subsets: features written here,
                                                       # by the client, before any task reads the cache
        for target in config.get("reverse", []):
            embed_cache(caches[target], epochs=config.get("embed_epochs"), seed=tconf.seed, quiet=quiet)
    transfer_jobs = _transfer_jobs(config, caches, evals, out, tconf, source_model, metrics, quiet or cluster.active,
                                   evals_val)
    batch = [red_jobs[0], *transfer_jobs, *red_jobs[1:]]
    made_by = {source_model: 0}  # a model the batch writes -> the index of its task
    made_by.update({job.makes: 1 + i for i, job in enumerate(transfer_jobs) if job.makes is not None})
    after = [()] + [tuple(sorted({made_by[m] for m in job.starts_from() if m in made_by}))
                    for job in transfer_jobs]
    after += [()] * (len(red_jobs) - 1)
    results = train_models(_study_task, batch, cluster, desc="study models", quiet=quiet, resources=resources,
                           after=after)
    red_results = [results[0], *results[1 + len(transfer_jobs):]]

    # 2. redundancy curve on the source (Table I, Fig. 1)
    rows, models = [], {}
    for (method, rate, seed), job, (result, scores, stds) in zip(runs, red_jobs, red_results):
        rows.append({"domain": source, "method": method, "rate": rate, "seed": seed, "patches": int(job.indices.size),
                     "trained_on": result.n_patches, **_with_std(scores[source], stds[source])})
        models[(method, rate, seed)] = job.model
    tables["redundancy"] = rows
    if config.get("repeat_seeds"):
        tables["redundancy_seeds"] = seed_spread(rows, ("method", "rate"), metrics, min_rows=2)
    _emit(out, tables, config)
    metric = metrics[1] if len(metrics) > 1 else metrics[0]
    full = next(r for r in rows if r["method"] == "all")
    plot_rate_curve([r for r in rows if r["seed"] == tconf.seed], out / "fig1_rate_curve.png", metric,
                    full[metric], source)

    # 3. zero-shot: the all-patches source model (and DQ models at zero_shot_rates) on every domain, from the
    # records their tasks wrote
    zero_rows = []
    for label, model in [(f"{source} (all patches)", source_model)] + [
            (f"{source} (DQ {r:g})", models[("dq", float(r), tconf.seed)]) for r in config.get("zero_shot_rates", [])
            if ("dq", float(r), tconf.seed) in models]:
        zero = Stage(name="zero_shot" if model == source_model else f"zero_shot_{Path(model).name}", model=model)
        score_stage(zero, evals, out / "models" / "redundancy", tconf.channels, metrics, quiet)
        zero_rows += [{"model": label, "test domain": d, **_with_std(s, zero.stds[d])} for d, s in zero.scores.items()]
    tables["zero_shot"] = zero_rows
    _emit(out, tables, config)

    done: dict = {}
    for result in results[1:1 + len(transfer_jobs)]:
        done.update(result)
    transfer_rows, retain_rows, naive = [], [], {}
    for target in config["targets"]:
        ends = [(source, target, ("finetune", target))]
        if target in config.get("reverse", []):  # Table V's other way: the target's scratch model onto the source
            ends.append((target, source, ("reverse", target)))
        for start, end, key in ends:
            for stage in done[key].stages:
                transfer_rows.append({"target": target, "model": f"{start} model" if stage.name == "init" else
                                      f"naive finetune {start} -> {end}", **_scores_row(stage, metrics)})
            naive[(start, end)] = transfer_rows[-1]
            for entry in config.get("retain", []):
                stage = done[(*key, entry["method"], entry["weight"])].stages[-1]
                retain_rows.append({"target": target, "start": start, "end": end, "method": entry["method"],
                                    "weight": entry["weight"], **_scores_row(stage, metrics)})
                transfer_rows.append({"target": target, "model": f"finetune + {entry['method']} "
                                      f"{entry['weight']:g} {start} -> {end}", **_scores_row(stage, metrics)})
        if target in config.get("joint", []):
            transfer_rows.append({"target": target, "model": f"joint {source} + {target}",
                                  **_scores_row(done[("joint", target)], metrics)})
        for method, rate in _replays(config):
            transfer_rows.append({"target": target, "model": f"replay {method} {rate:g}",
                                  **_scores_row(done[("replay", target, method, rate)].stages[-1], metrics)})
            if target in config.get("reverse", []) and config.get("replay_reverse"):
                transfer_rows.append({"target": target, "model": f"replay {method} {rate:g} {target} -> {source}",
                                      **_scores_row(done[("replay_reverse", target, method, rate)].stages[-1],
                                                    metrics)})
    if transfer_rows:
        tables["transfer"] = transfer_rows
    if retain_rows:
        tables["retention"] = choose_retain_weights(retain_rows, naive, metrics[1] if len(metrics) > 1
                                                    else metrics[0])
        if config.get("retain_seeds"):
            _emit(out, tables, config)  # the seed-0 tables first: the seeds' batch is as long again
            tables["retention_seeds"] = _retain_seeds_step(config, caches, evals, out, tconf, source_model, metrics,
                                                           cluster, quiet, resources, tables, done)
    seq_rows = []
    for k, path in enumerate(config["sequences"]):
        for stage in done[("sequence", k)].stages:
            seq_rows.append({"path": " -> ".join(path), "after": path[0] if stage.name == "init" else stage.name,
                             **_scores_row(stage, metrics)})
    if seq_rows:
        tables["sequences"] = seq_rows
    _emit(out, tables, config)

    # 8. the active-learning round, from the models above
    if active:
        tables.update(_active_step(active, source, caches, evals, out, tconf, metrics, cluster, quiet, resources,
                                   models, red_jobs, runs))
        _emit(out, tables, config)
    return ExperimentResult(out=out, source_model=source_model, **{k: v for k, v in tables.items()
                                                                  if k in ExperimentResult.__dataclass_fields__})


@dataclass
class ModelJob:
    """One model of a study: trained on patches ``indices`` of ``cache`` (from ``init`` if given, else from scratch)
    with ``config``, written to ``model``, then scored on ``evals`` ({domain: test split}) as stage ``stage``."""

    cache: str
    indices: np.ndarray
    model: Path
    config: Any  # dqtool.segmentation.train.TrainConfig
    provenance: dict  # what selected the patches (after the cache's own provenance)
    stage: str
    evals: dict
    eval_dir: Path
    metrics: tuple
    quiet: bool = True
    init: Path | None = None


def train_and_score(job: ModelJob) -> tuple:
    """Task: train one :class:`ModelJob` and score it -> (TrainResult, scores, stds).

    Reads the cache (read only); writes only this model's files and its stage's evaluation records
    (``eval_dir/evals/<stage>__<domain>.json``), so it is their one writer; the tables are the client's.
    """
    images, labels, provenance = load_patches(job.cache, job.indices)
    provenance.update(job.provenance)
    result = train_patches(list(images), list(labels), job.model, job.config, init=job.init, provenance=provenance,
                           resume=True, quiet=job.quiet)
    kill_point("experiment:trained")  # tests (serial): a model written, its scores and the tables not yet
    stage = Stage(name=job.stage, model=job.model, train=result)
    score_stage(stage, job.evals, job.eval_dir, job.config.channels, job.metrics, job.quiet)
    return result, stage.scores, stage.stds


def _replays(config: dict) -> list[tuple[str, float]]:
    """(method, rate) of every replay run on each target: the config's method, then random (Table VIII)."""
    return ([(config["replay_method"], float(r)) for r in config["replay_rates"]]
            + [("random", float(r)) for r in config.get("replay_random_rates", [])])


@dataclass
class _TransferJob:
    """One task of steps 4-6: ``calls`` [(key, what, kwargs)] run in order in one process.

    ``scratch`` (a domain): the task trains that domain's from-scratch model (its one writer) and scores it on
    ``scratch_evals`` (``OUT/models/scratch/evals``); the runs that start from it (a reverse finetuning, a
    sequence that starts there) are tasks of their own that wait for it and reuse those records. Each call
    writes only its own study folder; ``what`` names :func:`finetune`, :func:`replay`, :func:`sequence` or
    ``joint``.
    """

    calls: list
    scratch: str | None = None
    caches: dict = field(default_factory=dict)
    out: Path = Path(".")
    config: TrainConfig | None = None
    quiet: bool = True
    known_evals: tuple = ()  # evaluation folders written before the task starts (the start models' records)
    scratch_evals: dict = field(default_factory=dict)  # where the scratch model is scored for the runs from it

    def starts_from(self) -> set:
        """The models its calls start from (the task waits for the tasks that write them)."""
        return {kwargs["init"] for _, _, kwargs in self.calls if kwargs.get("init") is not None}

    @property
    def makes(self) -> Path | None:
        """The from-scratch model this task trains (others start from it), if any."""
        return None if self.scratch is None else _scratch_path(self.out, self.scratch)

    @property
    def trainings(self) -> int:
        n = int(self.scratch is not None)
        for _, what, kwargs in self.calls:
            n += len(kwargs["caches"]) if what == "sequence" else 1
        return n


def _transfer_task(job: _TransferJob) -> dict:
    """Task: run one :class:`_TransferJob` -> {key: TransferResult (or the scored joint Stage)}."""
    init = None
    if job.scratch is not None:
        init = _scratch_model(job.scratch, job.caches, job.out, job.config, job.quiet)
        if job.scratch_evals:  # once here, not once per run that starts from it
            score_stage(Stage(name=f"scratch_{job.scratch}", model=init), job.scratch_evals,
                        job.out / "models" / "scratch", job.config.channels, quiet=job.quiet)
    results = {}
    for key, what, kwargs in job.calls:
        kwargs = {**({"init": init} if init is not None else {}), **kwargs}
        if what == "joint":
            stage = _joint_model(kwargs["source"], kwargs["target"], job.caches, job.out, job.config, job.quiet)
            score_stage(stage, kwargs["evals"], job.out / "models" / "joint", job.config.channels,
                        kwargs["metrics"], job.quiet)
            results[key] = stage
        else:
            func = {"finetune": finetune, "replay": replay, "sequence": sequence}[what]
            config = kwargs.pop("config", job.config)  # a retention call's own; the scratch model is job.config's
            results[key] = func(config=config, resume=True, quiet=job.quiet, known_evals=job.known_evals, **kwargs)
    return results


def _study_task(job: "ModelJob | _TransferJob"):
    """Task: one redundancy model (:func:`~dqtool.studies.trainings.train_and_score`) or one transfer task
    (:func:`_transfer_task`)."""
    return train_and_score(job) if isinstance(job, ModelJob) else _transfer_task(job)


def _transfer_jobs(config: dict, caches: dict, evals: dict, out: Path, tconf: TrainConfig, source_model: Path,
                   metrics: tuple, quiet: bool, evals_val: dict | None = None) -> list[_TransferJob]:
    """The tasks of steps 4-7, the longest first (so that the last to start is a short one)."""
    source = config["source"]
    common = {"caches": caches, "out": out, "config": tconf, "quiet": quiet,
              "known_evals": (out / "models" / "redundancy" / "evals",)}
    single: list[_TransferJob] = []
    starts: dict[str, list] = {}  # a non-source domain -> the calls that start from its scratch model
    retain = config.get("retain", [])
    for target in config["targets"]:
        pair = {source: evals[source], target: evals[target]}
        if retain:  # the finetunings with and without retention are also scored where W is chosen
            pair.update({f"{d}_val": evals_val[d] for d in (source, target) if d in (evals_val or {})})
        single.append(_TransferJob([(("finetune", target), "finetune", {
            "init": source_model, "target": caches[target], "out_dir": out / f"finetune_{target}", "evals": pair})],
            **common))
        for entry in retain:
            m, w = entry["method"], entry["weight"]
            single.append(_TransferJob([(("finetune", target, m, w), "finetune", {
                "init": source_model, "target": caches[target], "out_dir": out / f"finetune_{target}_{m}_{w:g}",
                "evals": pair, "config": dataclasses.replace(tconf, retain=m, retain_weight=w)})], **common))
        if target in config.get("reverse", []):
            starts.setdefault(target, []).append((("reverse", target), "finetune", {
                "target": caches[source], "out_dir": out / f"finetune_{target}_to_{source}", "evals": pair}))
            for entry in retain:
                m, w = entry["method"], entry["weight"]
                starts[target].append((("reverse", target, m, w), "finetune", {
                    "target": caches[source], "out_dir": out / f"finetune_{target}_to_{source}_{m}_{w:g}",
                    "evals": pair, "config": dataclasses.replace(tconf, retain=m, retain_weight=w)}))
        if target in config.get("joint", []):
            single.append(_TransferJob([(("joint", target), "joint", {
                "source": source, "target": target, "evals": pair, "metrics": metrics})], **common))
        for method, rate in _replays(config):
            single.append(_TransferJob([(("replay", target, method, rate), "replay", {
                "init": source_model, "source": caches[source], "target": caches[target],
                "out_dir": out / _replay_folder(config, target, method, rate), "source_rate": rate,
                "source_method": method, "evals": pair})], **common))
            if target in config.get("reverse", []) and config.get("replay_reverse"):
                starts.setdefault(target, []).append((("replay_reverse", target, method, rate), "replay", {
                    "source": caches[target], "target": caches[source],
                    "out_dir": out / _replay_folder(config, target, method, rate, reverse=True), "source_rate": rate,
                    "source_method": method, "evals": pair}))
    for k, path in enumerate(config["sequences"]):
        folder = out / f"sequence_{k}_{'-'.join(path)}"
        if config.get("data") == "synthetic":  # the quick study trains every stage (as it always has)
            single.append(_TransferJob([(("sequence", k), "sequence", {
                "caches": [caches[d] for d in path], "out_dir": folder, "evals": evals, "names": path})], **common))
            continue
        call = (("sequence", k), "sequence", {"caches": [caches[d] for d in path[1:]], "out_dir": folder,
                                              "evals": evals, "names": path[1:]})
        if path[0] == source:  # the source's first stage is its all-patches model
            call[2]["init"] = source_model
            single.append(_TransferJob([call], **common))
        else:
            starts.setdefault(path[0], []).append(call)
    # a domain's from-scratch model is one task; each run that starts from it another, waiting for it (so the
    # runs from one scratch model spread over the workers instead of running one after another in one task)
    scratch = [_TransferJob([], scratch=domain, **common,
                            scratch_evals={d: t for _, _, kw in calls for d, t in kw["evals"].items()})
               for domain, calls in starts.items()]
    after_scratch = {**common, "known_evals": (*common["known_evals"], out / "models" / "scratch" / "evals")}
    for domain, calls in starts.items():
        for key, what, kwargs in calls:
            single.append(_TransferJob([(key, what, {**kwargs, "init": _scratch_path(out, domain)})],
                                       **after_scratch))
    # the scratch models first (others wait for them), then the longest first; stable: equal lengths keep the
    # config's order
    return scratch + sorted(single, key=lambda j: -j.trainings)


def _scratch_path(out: Path, domain: str) -> Path:
    """Where :func:`_scratch_model` writes ``domain``'s from-scratch model."""
    return out / "models" / "scratch" / f"{domain}_all"


def _replay_folder(config: dict, target: str, method: str, rate: float, reverse: bool = False) -> str:
    """``replay_<target>[_to_<source>][_<method>]_<rate>``: a replay's study folder (the method named unless it is
    the config's ``replay_method``)."""
    way = f"_to_{config['source']}" if reverse else ""
    return (f"replay_{target}{way}_{rate:g}" if method == config["replay_method"]
            else f"replay_{target}{way}_{method}_{rate:g}")


def _retain_seeds_step(config: dict, caches: dict, evals: dict, out: Path, tconf: TrainConfig, source_model: Path,
                       metrics: tuple, cluster: Cluster, quiet: bool, resources, tables: dict, done: dict) -> list[dict]:
    """Step 7b (:mod:`dqtool.studies.retention_seeds`): naive finetuning, every method at the W chosen on val and
    the replays, again with each of ``retain_seeds`` from the same start models (one batch, one task each,
    scored on the test splits), then their spread over all seeds with the study's own seed-0 runs."""
    from dqtool.studies.retention_seeds import plan_seed_runs, seed_row, seeds_table

    source = config["source"]
    metric = metrics[1] if len(metrics) > 1 else metrics[0]
    chosen = {(r["start"], r["end"], r["method"]): r["weight"] for r in tables["retention"] if r["chosen"]}
    directions, first = [], []  # first: the seed-0 rows, from the batch above
    for target in config["targets"]:
        ways = [(source, target, ("finetune", target), f"finetune_{target}", source_model, "replay")]
        if target in config.get("reverse", []):
            ways.append((target, source, ("reverse", target), f"finetune_{target}_to_{source}",
                         out / "models" / "scratch" / f"{target}_all", "replay_reverse"))
        for start, end, key, folder, init, replay_key in ways:
            replays = [(m, r, _replay_folder(config, target, m, r, reverse=replay_key == "replay_reverse"))
                       for m, r in _replays(config) if replay_key == "replay" or config.get("replay_reverse")]
            directions.append({"start": start, "end": end, "folder": folder, "replays": replays, "init": init,
                               "target_cache": caches[end], "start_cache": caches[start], "pair": {
                                   source: evals[source], target: evals[target]}})
            stages = done[key].stages
            directions[-1]["start_score"] = _scores_row(stages[0], metrics).get(f"{start} {metric}", float("nan"))
            first.append(seed_row(start, end, "naive", tconf.seed, _scores_row(stages[-1], metrics), metric))
            for (s, e, m), w in chosen.items():
                if (s, e) == (start, end):
                    first.append(seed_row(start, end, f"{m} {w:g}", tconf.seed,
                                          _scores_row(done[(*key, m, w)].stages[-1], metrics), metric))
            for m, r, _ in replays:
                first.append(seed_row(start, end, f"replay {m} {r:g}", tconf.seed,
                                      _scores_row(done[(replay_key, target, m, r)].stages[-1], metrics), metric))
    runs = plan_seed_runs(directions, chosen, list(config["retain_seeds"]))
    way = {(d["start"], d["end"]): d for d in directions}
    common = {"caches": caches, "out": out, "config": tconf, "quiet": quiet or cluster.active,
              "known_evals": (out / "models" / "redundancy" / "evals",)}
    jobs = []
    for run in runs:
        d = way[(run.start, run.end)]
        conf = dataclasses.replace(tconf, seed=run.seed, **({"retain": run.retain, "retain_weight": run.weight}
                                                           if run.retain else {}))
        kwargs = {"init": d["init"], "target": d["target_cache"], "out_dir": out / run.folder, "evals": d["pair"],
                  "config": conf}
        if run.replay_method is None:
            jobs.append(_TransferJob([(run, "finetune", kwargs)], **common))
        else:
            jobs.append(_TransferJob([(run, "replay", {**kwargs, "source": d["start_cache"],
                                                       "source_rate": run.replay_rate,
                                                       "source_method": run.replay_method})], **common))
    results = train_models(_study_task, jobs, cluster, desc="retention seeds", quiet=quiet, resources=resources)
    rows = list(first)
    for run, result in zip(runs, results):
        rows.append(seed_row(run.start, run.end, run.run, run.seed, _scores_row(result[run].stages[-1], metrics),
                             metric))
    return seeds_table(rows, {k: d["start_score"] for k, d in way.items()}, metric)


def choose_retain_weights(rows: list[dict], naive: dict, metric: str, tolerance: float = RETAIN_TOLERANCE) -> list[dict]:
    """The retention rows with W chosen per (start, end, method) on the validation splits, never the test ones.

    For finetuning ``start -> end`` with a method, among its weights W: those with
    ``val_end(W) >= val_end(naive) - tolerance`` (the target kept within ``tolerance`` of naive finetuning's), the
    one of largest ``val_start(W)`` (the source best kept; ties: the smaller W); if none keeps the target, the one
    of largest ``val_end(W)``. ``val_d`` is the row's ``"<d>_val <metric>"``; ``naive[(start, end)]`` the naive
    finetuning's row. Each row gets ``chosen`` (True/False; None where a domain has no val split) and the naive
    row's validation scores beside its own.
    """
    out = [dict(r) for r in rows]
    groups: dict = {}
    for r in out:
        groups.setdefault((r["start"], r["end"], r["method"]), []).append(r)
    for (start, end, _), group in groups.items():
        base = naive.get((start, end), {})
        src, tgt = f"{start}_val {metric}", f"{end}_val {metric}"
        for r in group:
            r[f"naive {src}"], r[f"naive {tgt}"] = base.get(src, float("nan")), base.get(tgt, float("nan"))
        values = [(r.get(src, float("nan")), r.get(tgt, float("nan"))) for r in group]
        if not values or any(np.isnan(v) for pair in values for v in pair) or np.isnan(base.get(tgt, float("nan"))):
            for r in group:
                r["chosen"] = None
            continue
        keep = [i for i, (_, t) in enumerate(values) if t >= base[tgt] - tolerance]
        order = sorted(keep, key=lambda i: (-values[i][0], group[i]["weight"])) if keep else \
            sorted(range(len(group)), key=lambda i: (-values[i][1], group[i]["weight"]))
        for i, r in enumerate(group):
            r["chosen"] = i == order[0]
    return out


def _selection(cache: Path, n: int, method: str, rate: float, seed: int) -> np.ndarray:
    """The source patches of one redundancy model: all, a DQ or k-center subset, or a random one."""
    if method == "all":
        return np.arange(n)
    if method == "random":
        return random_subset(n, subset_total(n, rate), seed)
    from dqtool.selection.quantize import select_subset  # numba and torch (the bins kernel), for DQ only

    return select_subset(cache, rate, method=method, seed=seed).index_array()


def _with_std(scores: dict, stds: dict) -> dict:
    """{metric: mean, "metric std": std} (means and stds over test images)."""
    row = {}
    for m, v in scores.items():
        row[m] = v
        row[f"{m} std"] = stds.get(m, float("nan"))
    return row


def _active_step(active: dict, source: str, caches: dict, evals: dict, out: Path, tconf: TrainConfig, metrics: tuple,
                 cluster: Cluster, quiet: bool, resources, models: dict, red_jobs: list, runs: list) -> dict:
    """Step 8 (:mod:`dqtool.studies.active`): the start models (the random redundancy model; other domains' scratch
    models, trained as tasks if missing), the selections here in the client (the uncertainty scores as tasks on
    ``cluster``, written to the source cache by the client alone), then one batch of finetunings, each its own
    model ``OUT/models/active/<start>__<method>_<rate>_seed<s>`` and evaluation records."""
    from dqtool.data.cache import PatchCache
    from dqtool.studies.active import ActiveStart, plan_round, round_tables

    starts = []
    domains = [d for d in active["starts"] if d != "random"]
    if "random" in active["starts"]:
        key = ("random", active["start_rate"], tconf.seed)
        starts.append(ActiveStart(f"random {active['start_rate']:g}", models[key], red_jobs[runs.index(key)].indices))
    if domains:
        scratch = train_models(_scratch_task, [(d, caches, out, tconf, quiet or cluster.active) for d in domains],
                               cluster, desc="active start models", quiet=quiet, resources=resources)
        starts += [ActiveStart(f"{d} model", model, np.zeros(0, np.int64)) for d, model in zip(domains, scratch)]
    cache = caches[source]
    with PatchCache(cache) as c:
        n = len(c)

    def select(method: str, seed: int, start) -> np.ndarray:
        if method == "random":
            return random_subset(n, subset_total(n, active["rate"]), seed)
        from dqtool.selection.quantize import select_subset
        from dqtool.selection.uncertain import PatchScorer

        uncertain = method.startswith("uncertain")
        return select_subset(cache, active["rate"], method="uncertain" if uncertain else method,
                             bins=None if method == "uncertain_nobins" else int(active["bins"]), seed=seed,
                             scorer=PatchScorer(str(start.model), active["score"], cluster) if uncertain else None,
                             quiet=quiet).index_array()

    planned = plan_round(starts, active, select)
    folder = out / "models" / "active"
    jobs = [ModelJob(cache=str(cache), indices=r.indices, init=r.start.model, model=folder / r.name,
                     config=dataclasses.replace(tconf, seed=r.seed),
                     provenance={"active_start": r.start.name, "method": r.method, "rate": active["rate"],
                                 "selection_seed": r.seed},
                     stage=r.name, evals={source: evals[source]}, eval_dir=folder, metrics=metrics,
                     quiet=quiet or cluster.active) for r in planned]
    results = train_models(train_and_score, jobs, cluster, desc="active round", quiet=quiet, resources=resources)
    return round_tables(planned, results, source, metrics)


def _scratch_task(job: tuple) -> Path:
    """Task: :func:`_scratch_model` of ``job`` = (domain, caches, out, tconf, quiet)."""
    return _scratch_model(*job)


def _scratch_model(domain: str, caches: dict, out: Path, tconf: TrainConfig, quiet: bool) -> Path:
    """A model trained from scratch on all of ``domain``'s patches (``OUT/models/scratch/<domain>_all``)."""
    images, labels, provenance = load_patches(caches[domain])
    provenance.update(method="all", rate=1.0)
    model = _scratch_path(out, domain)
    train_patches(list(images), list(labels), model, tconf, provenance=provenance, resume=True, quiet=quiet)
    return model


def _joint_model(source: str, target: str, caches: dict, out: Path, tconf: TrainConfig, quiet: bool) -> Stage:
    """Joint training (Table V): one model from scratch on all patches of both domains."""
    s_img, s_lab, s_prov = load_patches(caches[source])
    t_img, t_lab, t_prov = load_patches(caches[target])
    model = out / "models" / "joint" / f"{source}+{target}"
    result = train_patches(list(s_img) + list(t_img), list(s_lab) + list(t_lab), model, tconf,
                           provenance={"source": s_prov, "target": t_prov, "cache": f"{source} + {target}"},
                           resume=True, quiet=quiet)
    return Stage(name=f"joint_{source}+{target}", model=model, train=result)


def _emit(out: Path, tables: dict, config: dict) -> None:
    """Write every table finished so far and the report: a later step that fails loses none of them."""
    for name, rows in tables.items():
        if rows:
            write_table(rows, out / "tables" / name)
            kill_point("experiment:table")  # tests: one table written, the others and the report not yet
    _report(out, tables, config)


def _report(out: Path, tables: dict, config: dict) -> Path:
    parts = ["# dqtool study\n", f"Config: `{out / 'experiment.json'}`. Scores are means over test images; "
             "'std' columns are their standard deviations over the same images.\n"]
    titles = {"redundancy": f"Redundancy on {config['source']} (Table I); plot: fig1_rate_curve.png",
              "redundancy_seeds": "Redundancy: spread over seeds (mean and std of the per-seed test means)",
              "zero_shot": "Zero-shot (Table IV)",
              "transfer": "Source model, naive finetuning (both ways), joint training and replay on each target "
                          "(Tables V, VI, VIII)",
              "sequences": "Sequential transfer (Table VII); forgetting matrices in sequence_*/forgetting.md",
              "retention": "Finetuning without the source data (--retain), W chosen on the validation splits "
                           f"(target kept within {RETAIN_TOLERANCE} of naive finetuning, then the best source)",
              "retention_seeds": "Retention over seeds: naive finetuning, each method at its chosen W and replay "
                                 "(means and stds over seeds of the test scores; drop removed = (S - S_naive) / "
                                 "(S_start - S_naive) on the source, target lost = T_naive - T; goal: removed >= 0.5 "
                                 "and lost <= 0.02)",
              "active": "Active-learning round: a start model finetuned on the patches added by each selection "
                        "('new': not annotated before), scored on the source test split",
              "active_seeds": "Active-learning round: mean and std over seeds"}
    for name, rows in tables.items():
        parts.append(f"\n## {titles.get(name, name)}\n\n" + format_markdown(rows))
    return atomic_write_text(out / "report.md", "".join(parts))
