"""``dqtool experiment``: a whole study of the paper from one JSON config (Tables I, IV-VIII, Fig. 1).

Steps, each reusing what an earlier run of the same config already wrote (models, evaluations, caches):

1. caches: the train split of every domain cut into patches (``dqtool.cache.build_cache``);
2. redundancy curve (Table I, Fig. 1): on the source domain, a model from scratch per rate and
   selection method (``dq`` / ``random``) plus one on all patches, scored on the source test split;
3. zero-shot (Table IV): the all-patches source model on every domain's test split;
4. naive finetuning (Tables V, VI): the source model finetuned on each target (``dqtool.transfer.finetune``);
5. replay (Table VIII): the same with a source subset at each replay rate (``dqtool.transfer.replay``);
6. sequences (Table VII): multi-stage paths (``dqtool.transfer.sequence``).

Tables go to ``OUT/tables/*.{csv,md,json}``, the Fig. 1 plot to ``OUT/fig1_rate_curve.png`` and a
Markdown summary to ``OUT/report.md``, rewritten after every step; :func:`run_experiment` returns the tables
as an :class:`ExperimentResult`. A killed study continues where it stopped when run again with the same
config (each training resumes from its last checkpoint). ``QUICK`` is a built-in config for the embedded
synthetic domains, sized for a 2-core CPU (27 min measured with nothing else running).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dqtool.common.errors import InputError
from dqtool.common.figures import pyplot, save_figure
from dqtool.common.files import atomic_write_text
from dqtool.common.outputs import write_marker, writing
from dqtool.common.tables import format_markdown, write_json, write_table
from dqtool.segmentation.train import TrainConfig, load_patches, train_patches
from dqtool.segmentation.transfer import DEFAULT_METRICS, Stage, finetune, replay, score_stage, sequence
from dqtool.selection.subsets import random_subset, subset_total

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


@dataclass(frozen=True)
class ExperimentResult:
    """The tables of a study (rows as written to ``OUT/tables/<name>.{csv,md,json}``) and its folder."""

    out: Path
    source_model: Path  # the all-patches model of the source domain, the start of every transfer
    redundancy: list[dict] = field(default_factory=list)  # Table I / Fig. 1: one row per (method, rate)
    zero_shot: list[dict] = field(default_factory=list)  # Table IV: the source model on every test domain
    transfer: list[dict] = field(default_factory=list)  # Tables V, VI, VIII: finetuning and replay per target
    sequences: list[dict] = field(default_factory=list)  # Table VII: after each stage of each sequence

    def tables(self) -> dict[str, list[dict]]:
        """{table name: rows} of the tables the study filled."""
        names = ("redundancy", "zero_shot", "transfer", "sequences")
        return {name: getattr(self, name) for name in names if getattr(self, name)}

    def to_dict(self) -> dict:
        return {"out": str(self.out), "source_model": str(self.source_model), **self.tables()}


_KEYS = {"data", "domains", "seed", "patch", "train", "source", "targets", "rates", "methods", "embed_epochs",
         "replay_rates", "replay_method", "sequences", "metrics"}


def load_config(path: str | os.PathLike) -> dict:
    """Read and check a study config (JSON)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(f"{path}: not a JSON config ({exc})") from exc
    return check_config(config, str(path))


def check_config(config: dict, where: str = "config") -> dict:
    if not isinstance(config, dict):
        raise InputError(f"{where}: expected a JSON object")
    unknown = sorted(set(config) - _KEYS)
    if unknown:
        raise InputError(f"{where}: unknown keys {', '.join(unknown)} (expected some of {', '.join(sorted(_KEYS))})")
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
        if m not in ("dq", "random"):
            raise InputError(f"{where}: method {m!r}: expected 'dq' or 'random'")
    return config


def _domains(config: dict, out: Path, quiet: bool) -> dict[str, dict[str, Path]]:
    if config.get("data") == "synthetic":
        from dqtool.data.synthetic import generate

        root = generate(out / "data", seed=int(config["seed"]), quiet=quiet)
        names = [config["source"], *config["targets"]]
        return {d: {"train": root / d / "train", "test": root / d / "test"} for d in dict.fromkeys(names)}
    domains = {}
    for name, spec in config["domains"].items():
        if not isinstance(spec, dict) or "train" not in spec or "test" not in spec:
            raise InputError(f"domain {name!r}: expected {{'train': DIR, 'test': DIR}}")
        domains[name] = {"train": Path(spec["train"]), "test": Path(spec["test"])}
    for name in [config["source"], *config["targets"], *(d for s in config["sequences"] for d in s)]:
        if name not in domains:
            raise InputError(f"domain {name!r} is used but not defined in 'domains'")
    return domains


def _caches(domains: dict, config: dict, out: Path, quiet: bool) -> dict[str, Path]:
    from dqtool.data.cache_build import PatchOptions, build_cache
    from dqtool.data.datasets import open_dataset

    folder = out / "caches"
    folder.mkdir(parents=True, exist_ok=True)
    options = PatchOptions(size=int(config["patch"]["size"]), stride=int(config["patch"]["stride"]))
    return {name: Path(build_cache(open_dataset(d["train"], domain=name), folder / f"{name}.h5", options,
                                   quiet=quiet).path)
            for name, d in domains.items()}


def _scores_row(stage: Stage, metrics) -> dict:
    return {f"{d} {m}": v for d, s in stage.scores.items() for m, v in s.items()}


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
                   quiet: bool = False) -> ExperimentResult:
    """Run the study (``quick``: the built-in :data:`QUICK` config); writes the tables, Fig. 1 and
    ``report.md`` and returns them as an :class:`ExperimentResult`."""
    if quick:
        config = dict(QUICK)
    elif config is None:
        raise InputError("give a CONFIG file or --quick")
    config = load_config(config) if not isinstance(config, dict) else check_config(config)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with writing(out, "experiment", kind="folder"):  # a study folder: refused if a lab's, locked, one-line faults
        return _run_experiment(config, out, quiet)


def _run_experiment(config: dict, out: Path, quiet: bool) -> ExperimentResult:
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
    caches = _caches(domains, config, out, quiet)
    evals = {name: str(d["test"]) for name, d in domains.items()}
    source = config["source"]
    tables: dict[str, list[dict]] = {}

    # 2. redundancy curve on the source
    from dqtool.data.cache import PatchCache  # h5py

    with PatchCache(caches[source]) as c:
        n_source = len(c)
    if "dq" in config["methods"]:
        from dqtool.features.embed import embed_cache  # torch and the MAE, for DQ only

        embed_cache(caches[source], epochs=config.get("embed_epochs"), seed=tconf.seed, quiet=quiet)
    runs = [("all", 1.0)] + [(m, float(r)) for r in config["rates"] for m in config["methods"]]
    rows, source_model = [], None
    for method, rate in runs:
        if method == "all":
            indices = np.arange(n_source)
        elif method == "dq":
            from dqtool.selection.quantize import select_subset  # numba and torch (the bins kernel), for DQ only

            indices = select_subset(caches[source], rate, method="dq", seed=tconf.seed).index_array()
        else:
            indices = random_subset(n_source, subset_total(n_source, rate), tconf.seed)
        images, labels, provenance = load_patches(caches[source], indices)
        provenance.update(method=method, rate=rate)
        model = out / "models" / "redundancy" / f"{source}_{method}_{rate:g}"
        result = train_patches(list(images), list(labels), model, tconf, provenance=provenance, resume=True,
                               quiet=quiet)
        stage = Stage(name=f"{method}_{rate:g}", model=model, train=result)
        score_stage(stage, {source: evals[source]}, out / "models" / "redundancy", tconf.channels, metrics, quiet)
        rows.append({"domain": source, "method": method, "rate": rate, "patches": int(indices.size),
                     "trained_on": result.n_patches, **stage.scores[source]})
        if method == "all":
            source_model = model
    tables["redundancy"] = rows
    _emit(out, tables, config)
    full = next(r for r in rows if r["method"] == "all")
    plot_rate_curve(rows, out / "fig1_rate_curve.png", metrics[1] if len(metrics) > 1 else metrics[0],
                    full[metrics[1] if len(metrics) > 1 else metrics[0]], source)

    # 3. zero-shot
    zero = Stage(name="zero_shot", model=source_model)
    score_stage(zero, evals, out / "models" / "redundancy", tconf.channels, metrics, quiet)
    tables["zero_shot"] = [{"model": f"{source} (all patches)", "test domain": d, **s} for d, s in zero.scores.items()]
    _emit(out, tables, config)

    # 4-5. finetuning and replay: what happens to the source
    transfer_rows = []
    for target in config["targets"]:
        pair = {source: evals[source], target: evals[target]}
        ft = finetune(source_model, caches[target], out / f"finetune_{target}", evals=pair, config=tconf,
                      resume=True, quiet=quiet)
        for stage in ft.stages:
            transfer_rows.append({"target": target, "model": "source model" if stage.name == "init" else
                                  "naive finetune", **_scores_row(stage, metrics)})
        for rate in config["replay_rates"]:
            rp = replay(source_model, caches[source], caches[target], out / f"replay_{target}_{rate:g}",
                        source_rate=float(rate), source_method=config["replay_method"], evals=pair, config=tconf,
                        resume=True, quiet=quiet)
            transfer_rows.append({"target": target, "model": f"replay {config['replay_method']} {rate:g}",
                                  **_scores_row(rp.stages[-1], metrics)})
        tables["transfer"] = transfer_rows
        _emit(out, tables, config)

    # 6. sequences
    seq_rows = []
    for k, path in enumerate(config["sequences"]):
        res = sequence([caches[d] for d in path], out / f"sequence_{k}_{'-'.join(path)}", evals=evals, config=tconf,
                       names=path, resume=True, quiet=quiet)
        for stage in res.stages:
            seq_rows.append({"path": " -> ".join(path), "after": stage.name, **_scores_row(stage, metrics)})
        tables["sequences"] = seq_rows
        _emit(out, tables, config)
    _emit(out, tables, config)
    return ExperimentResult(out=out, source_model=source_model, **tables)


def _emit(out: Path, tables: dict, config: dict) -> None:
    """Write every table finished so far and the report: a later step that fails loses none of them."""
    for name, rows in tables.items():
        if rows:
            write_table(rows, out / "tables" / name)
    _report(out, tables, config)


def _report(out: Path, tables: dict, config: dict) -> Path:
    parts = ["# dqtool study\n", f"Config: `{out / 'experiment.json'}`. Scores are means over test images.\n"]
    titles = {"redundancy": f"Redundancy on {config['source']} (Table I); plot: fig1_rate_curve.png",
              "zero_shot": "Zero-shot (Table IV)",
              "transfer": "Source model, naive finetuning and replay on each target (Tables V, VI, VIII)",
              "sequences": "Sequential transfer (Table VII); forgetting matrices in sequence_*/forgetting.md"}
    for name, rows in tables.items():
        parts.append(f"\n## {titles.get(name, name)}\n\n" + format_markdown(rows))
    return atomic_write_text(out / "report.md", "".join(parts))
