"""Finetuning, replay and sequential transfer, each followed by a forgetting report (paper Sec. III.E-G,
IV.E-G; Tables V-VIII).

* ``finetune``: naive finetuning of a model on a target cache (Tables V, VI).
* ``replay``: finetuning on the full target plus a fraction ``source_rate`` of the source's patches,
  chosen by DQ or at random (Table VIII); the subset is computed once and kept in the output folder.
* ``sequence``: training through caches A -> B -> C ... (Table VII), a model saved after each stage.

After every stage the model is evaluated on the test split of every domain given (``evals``:
name -> folder) with ``dqtool.metrics``; the *forgetting matrix* has one row per stage and one column
per (domain, metric), with the change against the best earlier stage:

    change[k, j] = a[k, j] - max_{l < k} a[l, j]      (negative = forgetting on column j)

(the usual continual-learning forgetting measure, sign flipped so that a drop reads as negative).
It is written as CSV/Markdown/JSON (``forgetting.*``) and a heatmap PNG after every stage, so a later
stage that fails loses nothing already trained or evaluated: models, their records and evaluations
stay, and re-running the same command reuses them (``resume=True`` continues an interrupted stage).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dqtool.common.figures import pyplot, save_figure
from dqtool.common.errors import InputError
from dqtool.common.tables import format_markdown, write_json, write_table
from dqtool.common.files import atomic_write_text, file_sha256
from dqtool.common.outputs import writing
from dqtool.segmentation.model_files import check_model_path, load_state_dict
from dqtool.segmentation.train import TrainConfig, TrainResult, check_channels, load_patches, train_patches
from dqtool.selection.subsets import Subset, random_subset, subset_total

#: Metrics of the forgetting matrix (``dqtool.metrics`` summary keys, mean over test images).
DEFAULT_METRICS = ("iou", "f1@0.50", "panoptic_quality@0.50")


@dataclass
class Stage:
    """One row of a study: a model and how it was made (``train`` is None for a given model)."""

    name: str
    model: Path
    train: TrainResult | None = None
    scores: dict = field(default_factory=dict)  # domain -> {metric: mean over test images}
    stds: dict = field(default_factory=dict)  # domain -> {metric: std over test images (ddof 1)}


@dataclass
class TransferResult:
    stages: list[Stage]
    matrix: list[dict]
    forgetting: dict | None  # paths of forgetting.{csv,md,json,png}


# --------------------------------------------------------------------------------------------------
# evaluation


def evaluate_model(model: str | os.PathLike, test_dir: str | os.PathLike, domain: str,
                   channels: Sequence[int] = (0, 0), quiet: bool = True) -> dict:
    """Segment the test split in ``test_dir`` with ``model`` and score it; returns the 'all' summary row
    of ``dqtool.metrics.evaluate`` (means and stds over images)."""
    from dqtool.data.datasets import open_dataset
    from dqtool.evaluation.metrics import evaluate
    from dqtool.segmentation.predict import PredictOptions, load_model, segment

    dataset = open_dataset(test_dir, split="test")
    if not all(s.has_labels for s in dataset):
        raise InputError(f"{test_dir}: evaluation needs labelled test images")
    net = load_model(model)
    options = PredictOptions(channels=tuple(channels))
    pairs = ((s.name, domain, s.labels, segment(net, s.image, options)) for s in dataset)
    result = evaluate(pairs, thresholds=(0.5,), quiet=quiet, total=len(dataset))
    summary = {row["domain"]: row for row in result.summary}
    return summary.get(domain, summary.get("all"))


def _eval_key(model: Path, test_dir: str | os.PathLike, channels) -> str:
    root = Path(test_dir).resolve()
    if root.is_file():  # a split file (dqtool.data.datasets.write_split): its list of images is the identity
        listing = [file_sha256(root)]
    else:
        listing = sorted(p.name for p in root.rglob("*") if p.is_file())
    blob = json.dumps([file_sha256(model)[:16], str(root), listing, list(channels)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _known_summary(folders: Sequence[Path], key: str) -> dict | None:
    """The summary of an evaluation record with ``key`` in any of ``folders`` (read only), or None."""
    for folder in folders:
        for path in sorted(Path(folder).glob("*__*.json")):
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError):  # a record being replaced, or not one of ours: not a match
                continue
            if isinstance(old, dict) and old.get("key") == key and isinstance(old.get("summary"), dict):
                return old["summary"]
    return None


def score_stage(stage: Stage, evals: Mapping[str, str], out_dir: Path, channels, metrics=DEFAULT_METRICS,
                quiet: bool = True, known: Sequence[str | os.PathLike] = ()) -> dict:
    """Evaluate a stage's model on every test domain (cached in ``out_dir/evals``), fill ``stage.scores``.

    A record's key is (model file sha256, test split, channels): the same model file scored on the same
    split, under any stage name, in ``out_dir/evals`` or in one of the ``known`` evaluation folders (read
    only: another study's, written before this one started), is not evaluated again; its summary is copied
    into this stage's own record.
    """
    folder = out_dir / "evals"
    folder.mkdir(parents=True, exist_ok=True)
    for domain, test_dir in evals.items():
        record = folder / f"{stage.name}__{domain}.json"
        key = _eval_key(stage.model, test_dir, channels)
        row = None
        if record.exists():
            old = json.loads(record.read_text())
            row = old["summary"] if old.get("key") == key else None
        if row is None and (row := _known_summary([folder, *map(Path, known)], key)) is not None:
            write_json(record, {"key": key, "model": str(stage.model), "test_dir": str(test_dir), "summary": row})
        if row is None:
            row = evaluate_model(stage.model, test_dir, domain, channels, quiet=quiet)
            write_json(record, {"key": key, "model": str(stage.model), "test_dir": str(test_dir), "summary": row})
        # JSON keeps a NaN mean or std (one test image, no cell) as null: read it back as NaN, so a
        # rerun writes the tables of the first run byte for byte
        row = {k: float("nan") if v is None else v for k, v in row.items()}
        missing = [m for m in metrics if f"{m}_mean" not in row]
        if missing:
            raise InputError(f"metric {missing[0]!r} is not in the evaluation summary (have "
                             f"{', '.join(k[:-5] for k in row if k.endswith('_mean'))})")
        stage.scores[domain] = {m: row[f"{m}_mean"] for m in metrics}
        stage.stds[domain] = {m: row.get(f"{m}_std", float("nan")) for m in metrics}
    return stage.scores


# --------------------------------------------------------------------------------------------------
# forgetting matrix


def forgetting_matrix(stages: Sequence[Stage], metrics: Sequence[str] = DEFAULT_METRICS) -> list[dict]:
    """Rows ``{"stage", "<domain> <metric>", "<domain> <metric> change"}``; change per the module docstring."""
    columns = [(d, m) for d in (stages[0].scores if stages else {}) for m in metrics]
    best: dict = {}
    rows = []
    for k, stage in enumerate(stages):
        row = {"stage": stage.name}
        for d, m in columns:
            value = stage.scores.get(d, {}).get(m, float("nan"))
            row[f"{d} {m}"] = value
            row[f"{d} {m} change"] = value - best[(d, m)] if k and (d, m) in best else float("nan")
        for d, m in columns:
            v = row[f"{d} {m}"]
            if np.isfinite(v):
                best[(d, m)] = max(best.get((d, m), -np.inf), v)
        rows.append(row)
    return rows


def _markdown(rows: list[dict]) -> str:
    """Values with the change against the best earlier stage in parentheses."""
    if not rows:
        return "(no stages)\n"
    value_cols = [c for c in rows[0] if c != "stage" and not c.endswith(" change")]
    table = []
    for row in rows:
        cells = {"stage": row["stage"]}
        for c in value_cols:
            v, ch = row[c], row[f"{c} change"]
            cells[c] = "nan" if not np.isfinite(v) else (f"{v:.3f}" if not np.isfinite(ch) else f"{v:.3f} ({ch:+.3f})")
        table.append(cells)
    return format_markdown(table, ["stage"] + value_cols)


def write_forgetting(rows: list[dict], out_dir: Path, title: str = "forgetting matrix") -> dict:
    """forgetting.csv/.md/.json and forgetting.png (a heatmap of the values, changes annotated)."""
    paths = write_table(rows, out_dir / "forgetting")
    atomic_write_text(paths["md"], f"# {title}\n\nValues are means over test images; in parentheses the change "
                      "against the best earlier stage (negative = forgetting).\n\n" + _markdown(rows))
    paths["png"] = plot_forgetting(rows, out_dir / "forgetting.png", title)
    return paths


def plot_forgetting(rows: list[dict], path: Path, title: str = "forgetting matrix") -> Path:
    plt = pyplot()

    value_cols = [c for c in rows[0] if c != "stage" and not c.endswith(" change")]
    values = np.array([[row[c] for c in value_cols] for row in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(value_cols), 1.0 + 0.5 * len(rows)), dpi=100)
    im = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i, row in enumerate(rows):
        for j, c in enumerate(value_cols):
            ch = row[f"{c} change"]
            text = f"{values[i, j]:.2f}" + (f"\n{ch:+.2f}" if np.isfinite(ch) else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if not np.isfinite(values[i, j]) or values[i, j] < 0.6 else "black")
    ax.set_xticks(range(len(value_cols)), [c.replace(" ", "\n") for c in value_cols], fontsize=7)
    ax.set_yticks(range(len(rows)), [r["stage"] for r in rows], fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------------
# the study folder


def _open_study(out_dir: str | os.PathLike, spec: dict) -> Path:
    """Create ``out_dir`` or check that it holds the same study (``study.json``)."""
    out_dir = Path(out_dir)
    record = out_dir / "study.json"
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    if record.exists():
        old = json.loads(record.read_text())
        if old != json.loads(json.dumps(spec)):
            diff = sorted(k for k in set(old) | set(spec) if old.get(k) != json.loads(json.dumps(spec)).get(k))
            raise InputError(f"{out_dir}: holds a study with a different config (differs in: {', '.join(diff)}); "
                             "choose another --out or delete it")
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir}: exists, is not empty and holds no dqtool study; choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(record, spec)
    return out_dir


def _one_writer(command: str):
    """Run a transfer study under the lock of its folder (one writer at a time, one-line disk faults).

    The folder's own refusal (a non-empty folder without ``study.json``) stays :func:`_open_study`'s.
    """
    def decorate(func):
        signature = inspect.signature(func)

        @functools.wraps(func)
        def locked(*args, **kwargs):
            out_dir = Path(signature.bind(*args, **kwargs).arguments["out_dir"])
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            with writing(out_dir, command, kind="folder", check=False):
                return func(*args, **kwargs)

        return locked

    return decorate


def _check_evals(evals: Mapping[str, str] | None) -> dict:
    evals = dict(evals or {})
    for name, folder in evals.items():
        if not (Path(folder).is_dir() or (Path(folder).is_file() and Path(folder).suffix == ".json")):
            raise FileNotFoundError(f"--eval {name}={folder}: no such folder (or split file)")
    return evals


def _cache_info(path: str | os.PathLike) -> dict:
    from dqtool.data.cache import PatchCache

    with PatchCache(path) as cache:
        return {"path": str(Path(path).resolve()), "hash": cache.content_hash, "n_channels": cache.n_channels}


def _run_stages(out_dir: Path, plan: list[tuple[str, object]], evals: dict, config: TrainConfig,
                init: str | None, resume: bool, quiet: bool, metrics=DEFAULT_METRICS,
                title: str = "forgetting matrix", known_evals: Sequence[str | os.PathLike] = ()) -> TransferResult:
    """Run ``plan`` [(name, None | callable(previous_model) -> (images, labels, provenance))] in order.

    A stage with None is the given ``init`` model, evaluated only. After each stage: evaluate, rewrite the
    forgetting matrix. ``known_evals``: evaluation folders of other studies whose records of the same model
    file on the same split are reused (:func:`score_stage`).
    """
    models = out_dir / "models"
    models.mkdir(exist_ok=True)
    stages: list[Stage] = []
    previous = init
    rows: list[dict] = []
    paths = None
    for k, (name, data) in enumerate(plan):
        if data is None:
            stage = Stage(name=name, model=check_model_path(previous))
        else:
            images, labels, provenance = data()
            model = models / f"{k:02d}_{name}"
            # retention keeps what the stage's starting model knew: a first stage from scratch has none
            stage_config = config if previous is not None else dataclasses.replace(config, retain="none",
                                                                                   retain_weight=None)
            result = train_patches(images, labels, model, stage_config, init=previous, provenance=provenance,
                                   resume=resume, quiet=quiet)
            stage = Stage(name=name, model=model, train=result)
        if evals:
            score_stage(stage, evals, out_dir, config.channels, metrics, quiet=quiet, known=known_evals)
        stages.append(stage)
        previous = str(stage.model)
        if evals:
            rows = forgetting_matrix(stages, metrics)
            paths = write_forgetting(rows, out_dir, title)
    write_json(out_dir / "stages.json", [{"name": s.name, "model": str(s.model), "scores": s.scores}
                                         for s in stages])
    return TransferResult(stages=stages, matrix=rows, forgetting=paths)


def _patches(cache: str | os.PathLike, config: TrainConfig, indices=None):
    images, labels, provenance = load_patches(cache, indices)
    check_channels(config.channels, provenance["n_channels"], str(cache))
    return list(images), list(labels), provenance


# --------------------------------------------------------------------------------------------------
# public entry points


@_one_writer("finetune")
def finetune(init: str | os.PathLike, target: str | os.PathLike, out_dir: str | os.PathLike,
             subset: str | os.PathLike | None = None, evals: Mapping[str, str] | None = None,
             config: TrainConfig | None = None, resume: bool = False, quiet: bool = False,
             known_evals: Sequence[str | os.PathLike] = ()) -> TransferResult:
    """Naive finetuning (Tables V, VI): stages "init" (the given model) and "finetune" (trained on ``target``).

    ``known_evals`` (every study entry point): folders of evaluation records written earlier (another
    study's ``evals/``), read only; a stage whose model file and test split are scored there is not
    evaluated again (a study's source model, the ``init`` of many finetunings)."""
    config = config or TrainConfig()
    load_state_dict(init)
    evals = _check_evals(evals)
    spec = {"kind": "finetune", "init": str(check_model_path(init)), "target": _cache_info(target),
            "subset": str(Path(subset).resolve()) if subset else None, "evals": evals, "config": config.to_dict()}
    out_dir = _open_study(out_dir, spec)
    indices = Subset.read(subset, cache=target).index_array() if subset else None

    def data():
        images, labels, provenance = _patches(target, config, indices)
        if subset:
            provenance["subset"] = str(Path(subset).resolve())
        return images, labels, provenance

    plan = [("init", None), ("finetune", data)]
    return _run_stages(out_dir, plan, evals, config, str(init), resume, quiet, title="naive finetuning",
                       known_evals=known_evals)


def source_subset(source: str | os.PathLike, rate: float, method: str, seed: int, out_dir: Path,
                  quiet: bool = True) -> Subset:
    """The source's replay subset, computed once and kept as ``out_dir/source_subset.json``.

    ``method='random'`` draws ``round(rate * N)`` patches uniformly (no features needed; ``bins``,
    ``features_hash`` and ``coverage`` stay null); ``'dq'`` uses ``dqtool.selection.select_subset`` on the
    features stored in the cache (the ones ``dqtool embed`` or a study put there, left as they are),
    computed by ``dqtool.features.embed_cache`` only when none are stored or they are stale. A subset file
    already there is reused when its method, rate, seed (in its ``config``) and cache content match.
    """
    from dqtool.data.cache import PatchCache  # h5py

    path = out_dir / "source_subset.json"
    with PatchCache(source) as cache:
        n, chash = len(cache), cache.content_hash
    if path.exists():
        old = Subset.read(path, cache=source)
        if (old.method, old.rate, (old.config or {}).get("seed"), old.cache_hash) == (method, rate, seed, chash):
            return old
    if method == "random":
        total = subset_total(n, rate)
        if total == 0:
            raise InputError(f"--source-rate {rate} selects no patch of the {n} in {source}")
        subset = Subset(indices=random_subset(n, total, seed), rate=rate, method="random", n_total=n,
                        cache=str(Path(source).resolve()), cache_hash=chash,
                        config={"rate": rate, "method": "random", "seed": seed,
                                "rounding": "total round(rate*N) with halves up"})
    elif method == "dq":
        # torch and numba (the MAE and the bins kernel) load only for a DQ replay
        from dqtool.features.embed import embed_cache
        from dqtool.features.store import load_features
        from dqtool.selection.quantize import select_subset

        try:  # the features already in the cache (from `dqtool embed` or a study): never replace them here
            load_features(source)
        except InputError:
            embed_cache(source, seed=seed, quiet=quiet)
        subset = select_subset(source, rate, method="dq", seed=seed, quiet=quiet)
    else:
        raise InputError(f"source method {method!r}: expected 'dq' or 'random'")
    subset.write(path)
    return subset


@_one_writer("replay")
def replay(init: str | os.PathLike, source: str | os.PathLike, target: str | os.PathLike,
           out_dir: str | os.PathLike, source_rate: float = 0.05, source_method: str = "dq",
           evals: Mapping[str, str] | None = None, config: TrainConfig | None = None, resume: bool = False,
           quiet: bool = False, known_evals: Sequence[str | os.PathLike] = ()) -> TransferResult:
    """Replay (Table VIII): finetune ``init`` on all of ``target`` plus the source subset at ``source_rate``."""
    config = config or TrainConfig()
    if not 0 < source_rate <= 1:
        raise InputError(f"source rate {source_rate}: expected a fraction in (0, 1]")
    load_state_dict(init)
    evals = _check_evals(evals)
    spec = {"kind": "replay", "init": str(check_model_path(init)), "source": _cache_info(source),
            "target": _cache_info(target), "source_rate": source_rate, "source_method": source_method,
            "evals": evals, "config": config.to_dict()}
    out_dir = _open_study(out_dir, spec)

    def data():
        subset = source_subset(source, source_rate, source_method, config.seed, out_dir, quiet=quiet)
        s_img, s_lab, s_prov = _patches(source, config, subset.index_array())
        t_img, t_lab, t_prov = _patches(target, config)
        provenance = {"source": {**s_prov, "rate": source_rate, "method": source_method,
                                 "subset": str(out_dir / "source_subset.json")},
                      "target": t_prov, "cache": f"{source} + {target}"}
        return s_img + t_img, s_lab + t_lab, provenance

    plan = [("init", None), (f"replay_{source_method}_{source_rate:g}", data)]
    return _run_stages(out_dir, plan, evals, config, str(init), resume, quiet,
                       title=f"replay ({source_method}, source rate {source_rate:g})", known_evals=known_evals)


@_one_writer("sequence")
def sequence(caches: Sequence[str | os.PathLike], out_dir: str | os.PathLike, init: str | os.PathLike | None = None,
             evals: Mapping[str, str] | None = None, config: TrainConfig | None = None, resume: bool = False,
             names: Sequence[str] | None = None, quiet: bool = False,
             known_evals: Sequence[str | os.PathLike] = ()) -> TransferResult:
    """Sequential transfer (Table VII): train on ``caches[0]``, then continue on ``caches[1]``, ...;
    a model after each stage (``models/NN_<name>``), evaluated on every test domain. ``config.retain``
    applies to every stage that starts from a model (without ``init`` the first stage trains without it)."""
    config = config or TrainConfig()
    if not caches:
        raise InputError("sequence: give at least one cache")
    if init is not None:
        load_state_dict(init)
    evals = _check_evals(evals)
    names = list(names) if names else [Path(c).stem for c in caches]
    if len(names) != len(caches) or len(set(names)) != len(names):
        names = [f"{i + 1}_{n}" for i, n in enumerate(names)]
    spec = {"kind": "sequence", "init": str(check_model_path(init)) if init else None,
            "caches": [_cache_info(c) for c in caches], "evals": evals, "config": config.to_dict()}
    out_dir = _open_study(out_dir, spec)
    plan = [("init", None)] if init is not None else []
    plan += [(name, (lambda c=c: _patches(c, config))) for name, c in zip(names, caches)]
    return _run_stages(out_dir, plan, evals, config, str(init) if init else None, resume, quiet,
                       title="sequential transfer: " + " -> ".join(names), known_evals=known_evals)
