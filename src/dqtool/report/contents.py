"""What a run folder holds, read into the sections of ``dqtool report``; what is not there is said, not guessed.

A run folder is what ``make demo`` leaves (any part may be missing):

- ``*.h5``: patch caches (``dqtool patches``), with their features (``dqtool embed``);
- ``*.json`` with ``indices`` and ``method``: subsets (``dqtool select``), and ``select/*.png`` their pictures;
- ``models/``: a bank of Cellpose models, each with ``MODEL.json`` (config, per-epoch training losses);
- ``*/rank.json``: rankings of the bank (``dqtool rank``), with their validation when labels were given.

Each section is a list of blocks, rendered alike to HTML and Markdown by :mod:`dqtool.report.page`:
``Text``, ``Table``, ``Figure`` (PNG bytes) and ``Missing`` (what is not there and the command that makes it).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Text:
    text: str


@dataclass
class Table:
    rows: list  # dicts, one per row; columns in the order of the first row's keys
    caption: str = ""


@dataclass
class Figure:
    name: str  # file name of the PNG beside the Markdown page
    png: bytes
    caption: str


@dataclass
class Missing:
    text: str


@dataclass
class Section:
    key: str
    title: str
    blocks: list = field(default_factory=list)

    @property
    def missing(self) -> list[str]:
        return [b.text for b in self.blocks if isinstance(b, Missing)]


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _num(value, digits: int = 3):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), digits) if isinstance(value, float) else value


# ------------------------------------------------------------------------------------------ data


def data_section(run: Path) -> tuple[Section, list[dict]]:
    """The patch caches of the run: patches, source images, domains."""
    from dqtool.data.cache import PatchCache

    sec = Section("data", "Data")
    caches = sorted(run.glob("*.h5"))
    rows = []
    for path in caches:
        try:
            with PatchCache(path) as cache:
                s = cache.summary()
        except Exception as exc:  # noqa: BLE001 - a broken or partial cache is reported, the report goes on
            sec.blocks.append(Missing(f"{path.name}: not a readable patch cache ({type(exc).__name__}: {exc})"))
            continue
        rows.append({"cache": path.name, "patches": s["n_patches"], "source images": s["n_sources"],
                     "domains": ", ".join(f"{d} {n}" for d, n in s["patches_per_domain"].items()),
                     "patch size / stride": f"{s['patch_size']} / {s['stride']}",
                     "labelled": "yes" if s["has_labels"] else "no",
                     "features": "yes" if any(g.startswith("features") for g in s["derived"]) else "no"})
    if rows:
        sec.blocks.append(Text("Patch caches in the run (patches per domain; features from `dqtool embed`)."))
        sec.blocks.append(Table(rows))
    else:
        sec.blocks.append(Missing(f"no patch cache (*.h5) in {run}: run `dqtool patches`"))
    return sec, rows


# ------------------------------------------------------------------------------------- selection


def _pictures(folder: Path, names) -> list[Figure]:
    out = []
    for name, caption in names:
        for path in sorted(folder.glob(name)):
            out.append(Figure(f"{folder.name}_{path.name}", path.read_bytes(), caption))
    return out


def selection_section(run: Path) -> tuple[Section, list[dict]]:
    """The subsets of the run (``dqtool select``) and their coverage next to a random subset of the same size."""
    sec = Section("selection", "DQ selection and coverage")
    rows = []
    for path in sorted(run.glob("*.json")):
        doc = _load_json(path)
        if not isinstance(doc, dict) or "indices" not in doc or "method" not in doc:
            continue
        cov = doc.get("coverage") or {}
        row = {"subset": path.name, "method": doc.get("method"), "rate": doc.get("rate"),
               "patches": f"{doc.get('n_selected')} of {doc.get('n_total')}"}
        for who in ("dq", "random"):
            c = cov.get(who) or {}
            row[f"{who} covering radius"] = _num(c.get("covering_radius"))
            row[f"{who} mean distance"] = _num(c.get("mean_distance"))
        rows.append(row)
    if rows:
        sec.blocks.append(Text("Covering radius = max over patches of the distance to the nearest selected patch "
                               "(smaller covers better); mean distance = mean nearest-selected distance. The random "
                               "subset has the same size and seed."))
        sec.blocks.append(Table(rows))
    else:
        sec.blocks.append(Missing(f"no subset (JSON from `dqtool select`) in {run}: run `dqtool select`"))
    figures = []
    for folder in sorted(p for p in run.iterdir() if p.is_dir()):
        figures += _pictures(folder, [("embedding*.png", ("PCA of the patch features, coloured by DQ bin; DQ and "
                                                          "random picks marked (like the paper's Fig. 3)")),
                                      ("patches*.png", "DQ patches next to random ones (like Fig. 2)")])
    if figures:
        sec.blocks += figures
    elif rows:
        sec.blocks.append(Missing("no selection pictures: run `dqtool select ... --plot DIR` with DIR in the run"))
    return sec, rows


# -------------------------------------------------------------------------------------- training


def find_models_dir(run: Path) -> Path | None:
    for name in ("models", "bank"):
        if (run / name).is_dir():
            return run / name
    return None


def training_section(run: Path) -> tuple[Section, dict]:
    """Each model's training: data, budget, per-epoch loss (from ``MODEL.json``)."""
    from dqtool.segmentation.model_files import discover_models, sidecar_paths

    sec = Section("training", "Models and their training")
    models_dir = find_models_dir(run)
    losses: dict[str, list[float]] = {}
    if models_dir is None:
        sec.blocks.append(Missing(f"no model bank ({run}/models): run `dqtool train ... --out {run}/models/NAME`"))
        return sec, losses
    models, skipped = discover_models(models_dir)
    rows = []
    for model in models:
        record = _load_json(sidecar_paths(model)["json"])
        if not isinstance(record, dict):
            rows.append({"model": model.name, "data": "(no MODEL.json: trained outside dqtool)"})
            continue
        cfg, prov = record.get("config", {}), record.get("provenance", {})
        loss = [float(x) for x in record.get("train_losses") or []]
        losses[model.name] = loss
        data = Path(str(prov.get("cache", "?"))).name
        sub = prov.get("subset")
        if isinstance(sub, dict):  # dqtool's record keeps the subset's own description
            data += f" ({sub.get('method', '?')} {sub.get('rate', '?')} subset)"
        elif sub:
            data += f" + {Path(str(sub)).name}"
        rows.append({"model": model.name, "data": data, "training patches": record.get("n_patches"),
                     "epochs": cfg.get("n_epochs"), "patches per epoch": cfg.get("nimg_per_epoch") or "all",
                     "bsize": cfg.get("bsize"), "learning rate": cfg.get("learning_rate"),
                     "first loss": _num(loss[0]) if loss else None, "last loss": _num(loss[-1]) if loss else None,
                     "complete": record.get("complete")})
    if rows:
        sec.blocks.append(Text(f"{len(rows)} models in {models_dir}."))
        sec.blocks.append(Table(rows))
    else:
        sec.blocks.append(Missing(f"no Cellpose model file in {models_dir}: run `dqtool train`"))
    for path, reason in skipped:
        sec.blocks.append(Missing(f"{Path(path).name} in {models_dir.name}/ is not a model: {reason}"))
    return sec, losses


# --------------------------------------------------------------------------------------- ranking


def find_rankings(run: Path) -> list[Path]:
    return sorted(run.glob("*/rank.json"))


def ranking_section(run: Path) -> tuple[Section, list[dict]]:
    """Each ranking of the bank: the consistency scores, true F1 where labels were given, and the validation."""
    sec = Section("ranking", "Scores, ranking and its validation")
    docs = []
    for path in find_rankings(run):
        doc = _load_json(path)
        if not isinstance(doc, dict) or "ranking" not in doc:
            sec.blocks.append(Missing(f"{path.relative_to(run)}: not a ranking written by `dqtool rank`"))
            continue
        docs.append(doc)
        rows = []
        for r in doc["ranking"]:
            rows.append({"rank": r.get("rank"), "model": Path(str(r.get("model"))).name,
                         f"score ({doc.get('score')})": _num(r.get("score"), 4),
                         "adapted Rand": _num(r.get("adapted_rand"), 4), "NHD": _num(r.get("nhd"), 4),
                         "effective invariance": _num(r.get("effective_invariance"), 4),
                         "true F1@0.5": _num(r.get("f1")), "mean accuracy 0.5:0.95": _num(r.get("accuracy")),
                         "status": r.get("status")})
        where = path.parent.relative_to(run)
        sec.blocks.append(Text(f"`{where}/`: perturbation {doc.get('perturbation')} (strength "
                               f"{doc.get('strength')}), seed {doc.get('seed')}; best first. A model's consistency "
                               "score is its median over the target images; true F1 comes from the labels and is "
                               "not used to rank."))
        sec.blocks.append(Table(rows))
        corr = doc.get("correlations") or []
        if corr:
            sec.blocks.append(Text("Validation: correlation of each consistency score with the true F1 over the "
                                   "bank (permutation-test p-values)."))
            sec.blocks.append(Table([{k: _num(v, 3) if isinstance(v, float) else v for k, v in c.items()}
                                     for c in corr]))
        else:
            sec.blocks.append(Missing(f"`{where}/`: no validation (rank with `--labels` to compare with the truth)"))
        for note in doc.get("notes") or []:
            sec.blocks.append(Text(f"Note: {note}"))
        png = path.parent / "ranking.png"
        if png.exists():
            sec.blocks.append(Figure(f"{where}_ranking.png", png.read_bytes(), "Consistency score per model"))
    if not docs and not sec.blocks:
        sec.blocks.append(Missing(f"no ranking ({run}/*/rank.json): run `dqtool rank {run}/models --images DIR "
                                  f"--labels DIR --out {run}/rank`"))
    return sec, docs


def ranked_models(doc: dict) -> list[str]:
    """Model paths of a ranking that were scored, best first."""
    return [str(r["model"]) for r in doc.get("ranking", []) if r.get("status") == "ok"]


def images_of_ranking(doc: dict) -> str | None:
    """The target folder a ranking recorded, when it did."""
    for key in ("images", "target", "images_dir"):
        if isinstance(doc.get(key), str):
            return doc[key]
    return None


def existing(path: str | os.PathLike | None) -> Path | None:
    return Path(path) if path is not None and Path(path).exists() else None
