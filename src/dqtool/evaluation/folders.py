"""Evaluate a folder of predicted label maps against a folder of ground truth (``dqtool eval``).

Pairing follows the layouts users have (REFERENCE.md section 7) by :mod:`dqtool.data.naming`'s one
rule: a file's key is its stem without the label suffix (``_cp_masks``, ``_masks``, ``_mask``,
``_labels``, ``_label``, ``_gt``) and then without ``_img``, so ``001_masks.png`` (Cellpose GT),
``001_img_cp_masks.png`` (Cellpose output), ``cell_00001_label.tiff`` (NeurIPS) and plain ``001.tif``
pair by ``001`` / ``cell_00001``. When a folder holds any label file, only those are labels (images
next to them are ignored); Cellpose outputs (``_flows.tif``...) are never labels, and nothing under an
images folder (``images``, ``imgs``, ``img``, ``Tissue Images``) is a label. Subfolders are domains
(``GT/fluo/...`` -> domain ``fluo``; folders named ``labels``, ``masks``, ``gt``, ``images``, ``pred``
are layout, not domain); files are paired within the same subfolder first, then by key alone where
that is unique. Labels are read through ``dqtool.data.io.read_labels``. A pair that cannot be read or whose shapes differ is reported and the
others are still scored.

Writes to ``out``: ``per_image.csv`` (+ .md, .json), ``summary.csv``, ``summary.md`` (readable
tables), ``summary.json`` (everything, with the problems) and, when there were any, ``problems.csv``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from dqtool.common.errors import InputError
from dqtool.common.outputs import folder_marker, writes_folder
from dqtool.common.files import atomic_write_text
from dqtool.common.tables import format_markdown, write_json, write_table
from dqtool.data.io import read_labels
from dqtool.data.naming import (IMAGE_DIRS, LABEL_DIRS, check_name, is_cellpose_output, is_image_file, is_label_file,
                                is_seg_file, label_key)
from dqtool.evaluation.metrics import EvaluationResult, evaluate, parse_thresholds, summary_tables

#: Folder names that say where a file is in a layout, not which domain it belongs to (lower case).
LAYOUT_DIRS = {*IMAGE_DIRS, *LABEL_DIRS, "label", "mask", "pred", "preds", "predictions", "test", "train", "val"}

EXIT_OK, EXIT_FAILED, EXIT_PARTIAL = 0, 1, 3


@dataclass(frozen=True)
class LabelFile:
    path: Path
    domain: str  # subfolder without layout folders; '' at the top
    key: str


def find_label_files(root: str | os.PathLike) -> list[LabelFile]:
    """Label files under ``root`` (recursive, sorted), with their domain and pairing key."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and ((is_image_file(p) and not is_cellpose_output(p)) or is_seg_file(p))
                   and not any(part.startswith(".") or part.lower() in IMAGE_DIRS
                               for part in p.relative_to(root).parts[:-1]))
    for p in files:
        check_name(p)  # names go into UTF-8 tables
    by_folder: dict[Path, list[Path]] = {}
    for p in files:
        by_folder.setdefault(p.parent, []).append(p)
    out = []
    for folder, paths in by_folder.items():
        if any(is_label_file(p) for p in paths):
            paths = [p for p in paths if is_label_file(p)]
        parts = [x for x in folder.relative_to(root).parts if x.lower() not in LAYOUT_DIRS]
        out += [LabelFile(p, "/".join(parts), label_key(p.stem)) for p in paths]
    return out


@dataclass
class Pairing:
    pairs: list[tuple[str, str, Path, Path]] = field(default_factory=list)  # name, domain, gt, pred
    unpaired_gt: list[Path] = field(default_factory=list)
    unpaired_pred: list[Path] = field(default_factory=list)


def _index(files: Sequence[LabelFile], what: str, by_domain: bool) -> dict:
    index: dict = {}
    for f in files:
        key = (f.domain, f.key) if by_domain else f.key
        if key in index:
            raise InputError(f"{index[key].path} and {f.path}: two {what} files for the same image "
                             f"{f.key!r}; expected one per image")
        index[key] = f
    return index


def pair_folders(gt_dir: str | os.PathLike, pred_dir: str | os.PathLike) -> Pairing:
    """Pair ground-truth and predicted label files (see the module docstring)."""
    gt_files, pred_files = find_label_files(gt_dir), find_label_files(pred_dir)
    if not gt_files:
        raise InputError(f"{gt_dir}: no label images found (expected .tif/.tiff/.png files)")
    if not pred_files:
        raise InputError(f"{pred_dir}: no label images found (expected .tif/.tiff/.png files)")
    gt_index = _index(gt_files, "ground-truth", by_domain=True)
    pred_index = _index(pred_files, "predicted", by_domain=True)
    matched: dict[tuple, LabelFile] = {k: pred_index[k] for k in gt_index if k in pred_index}
    left_gt = [f for k, f in gt_index.items() if k not in matched]
    used = {id(f) for f in matched.values()}
    left_pred = [f for f in pred_files if id(f) not in used]
    # A flat prediction folder against a GT tree with domains: pair by key where that is unique.
    gt_keys, pred_keys = _count([f.key for f in left_gt]), _count([f.key for f in left_pred])
    pred_by_key = {f.key: f for f in left_pred if pred_keys[f.key] == 1}
    still_gt = []
    for f in left_gt:
        if gt_keys[f.key] == 1 and f.key in pred_by_key:
            matched[(f.domain, f.key)] = pred_by_key.pop(f.key)
        else:
            still_gt.append(f)
    used = {id(f) for f in matched.values()}
    result = Pairing(unpaired_gt=[f.path for f in still_gt],
                     unpaired_pred=[f.path for f in pred_files if id(f) not in used])
    for (domain, key), pred in sorted(matched.items()):
        gt = gt_index[(domain, key)]
        name = f"{domain}/{key}" if domain else key
        result.pairs.append((name, domain or "all", gt.path, pred.path))
    return result


def _count(keys):
    counts: dict[str, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    return counts


def _loader(path: Path):
    return lambda: read_labels(path)


@dataclass
class FolderEvaluation:
    """What ``dqtool eval`` reports: the scores, the problems, the files written, an exit code."""

    result: EvaluationResult
    pairing: Pairing
    paths: dict[str, Path]

    @property
    def errors(self) -> list[tuple[str, str]]:
        """(name, message) of the pairs that could not be read or scored."""
        return self.result.errors

    @property
    def exit_code(self) -> int:
        """0: every file paired and scored; 3: some files unpaired or bad, the rest scored; 1: none scored."""
        if not self.result.per_image:
            return EXIT_FAILED
        if self.errors or self.pairing.unpaired_gt or self.pairing.unpaired_pred:
            return EXIT_PARTIAL
        return EXIT_OK

    def problems(self) -> list[dict]:
        rows = [{"kind": "no prediction", "file": str(p), "message": "ground truth without a prediction"}
                for p in self.pairing.unpaired_gt]
        rows += [{"kind": "no ground truth", "file": str(p), "message": "prediction without a ground truth"}
                 for p in self.pairing.unpaired_pred]
        rows += [{"kind": "bad pair", "file": name, "message": msg.removeprefix(f"{name}: ")}
                 for name, msg in self.errors]
        return rows

    def summary_text(self) -> str:
        """The summary as Markdown tables (pixel scores, then instance scores per threshold)."""
        pixel, instance = summary_tables(self.result)
        n = len(self.result.per_image)
        return (f"Scored {n} image pair{'s' if n != 1 else ''} (mean ± sample std over images).\n\n"
                + format_markdown(pixel) + "\n" + format_markdown(instance))

    def problem_lines(self) -> list[str]:
        """One line per problem, for stderr."""
        return [f"{r['kind']}: {r['file']}" + ("" if r["kind"] != "bad pair" else f": {r['message']}")
                for r in self.problems()]


def _refuse_same_folder(gt_dir, pred_dir) -> None:
    """Truth and prediction in one folder (or one inside the other) would score files against themselves."""
    gt, pred = Path(gt_dir).resolve(), Path(pred_dir).resolve()
    if gt == pred:
        raise InputError(f"{gt_dir}: given as both the ground truth (--gt) and the prediction (--pred); expected "
                         "two different folders")
    for outer, inner, a, b in ((gt, pred, "--pred", "--gt"), (pred, gt, "--gt", "--pred")):
        if outer in inner.parents:
            raise InputError(f"{inner}: the {a} folder is inside the {b} folder {outer}; its files would be read "
                             "as both; expected two separate folders")


@writes_folder("eval", out="out_dir", inputs=("gt_dir", "pred_dir"))  # refused, marked, locked
def evaluate_folders(gt_dir: str | os.PathLike, pred_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     thresholds=(0.5,), empty_value: float = 1.0, workers: int | None = None,
                     quiet: bool = True, cluster=None) -> FolderEvaluation:
    """Pair, read, score and write the tables of ``dqtool eval`` (see the module docstring).

    ``out_dir`` is one of dqtool's output folders (:func:`dqtool.common.outputs.writing_folder`: never the
    ground truth, the prediction or a lab's non-empty folder; one writer at a time).
    """
    thresholds = parse_thresholds(thresholds)
    _refuse_same_folder(gt_dir, pred_dir)
    pairing = pair_folders(gt_dir, pred_dir)
    if not pairing.pairs:
        shown = ", ".join(str(p) for p in pairing.unpaired_gt[:3])
        raise InputError(f"{pred_dir}: no prediction pairs with a ground-truth file in {gt_dir} "
                         f"(e.g. {shown}); expected names like <name>_cp_masks.png, <name>_label.tiff "
                         "or the ground truth's own stem")
    if cluster is not None and cluster.active:
        result = _evaluate_on_cluster(pairing.pairs, thresholds, empty_value, cluster, quiet)
    else:
        lazy = ((name, domain, _loader(gt), _loader(pred)) for name, domain, gt, pred in pairing.pairs)
        result = evaluate(lazy, thresholds=thresholds, quiet=quiet, empty_value=empty_value, on_error="collect",
                          workers=workers, total=len(pairing.pairs))
    files = {name: (gt, pred) for name, _, gt, pred in pairing.pairs}
    for k, (name, message) in enumerate(result.errors):
        gt, pred = files[name]
        if str(gt) not in message and str(pred) not in message:
            message += f" (files {gt}, {pred})"
        result.errors[k] = (name, message)
    for row in result.per_image:
        gt, pred = files[row["name"]]
        row["gt_file"], row["pred_file"] = str(gt), str(pred)
    report = FolderEvaluation(result, pairing, {})
    report.paths = _write(report, Path(out_dir))
    return report


def score_files(item, thresholds, empty_value: float):
    """One pair as a Dask task of ``eval --workers``: the row :func:`~dqtool.evaluation.metrics.evaluate`
    scores for it, or ``("error", message)`` for a pair it would collect as a problem. The worker reads the
    files by their absolute paths; a message names them as the user gave them, as the serial run does."""
    from dqtool.evaluation.metrics import _score_pair

    name, domain, gt, pred, gt_abs, pred_abs = item
    try:  # instance_empty_value 0.0: evaluate's default, which the serial path uses
        return _score_pair((name, domain, _loader(Path(gt_abs)), _loader(Path(pred_abs))), thresholds, empty_value,
                           0.0)
    except (ValueError, OSError) as exc:  # InputError, unreadable or missing files: a problem, not a failure
        return ("error", str(exc).replace(gt_abs, gt).replace(pred_abs, pred))


def _evaluate_on_cluster(pairs, thresholds, empty_value, cluster, quiet):
    """The serial path's result, one pair a Dask task, rows and problems in the order of ``pairs``."""
    import functools

    from dqtool.common.cluster import iter_tasks
    from dqtool.evaluation.metrics import EvaluationResult, summarise

    items = [(name, domain, str(gt), str(pred), str(Path(gt).absolute()), str(Path(pred).absolute()))
             for name, domain, gt, pred in pairs]
    result = EvaluationResult(thresholds)
    stream = iter_tasks(functools.partial(score_files, thresholds=thresholds, empty_value=empty_value), items,
                        cluster, kind="eval", desc="scoring", quiet=quiet, unit="image")
    for item, row in zip(items, stream):
        if isinstance(row, tuple):
            result.errors.append((str(item[0]), row[1]))
        else:
            result.per_image.append(row)
    stream.close()
    result.summary = summarise(result.per_image, thresholds)
    return result


def _write(report: FolderEvaluation, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    per_image = write_table(report.result.per_image, out / "per_image")
    paths["per_image"] = per_image["csv"]
    summary = write_table(report.result.summary, out / "summary")
    paths["summary_csv"] = summary["csv"]
    text = report.summary_text()
    problems = report.problems()
    if problems:
        text += "\n## Problems\n\n" + format_markdown(problems)
        paths["problems"] = write_table(problems, out / "problems")["csv"]
    elif (marker := folder_marker(out) or {}).get("command") == "eval" and "legacy" not in marker:
        # a clean rerun into a folder an earlier `dqtool eval` marked must not keep that run's problems;
        # in any other folder (another command's, or an eval folder of a release without the marker) a
        # problems file may be a user's and is left alone
        for suffix in (".csv", ".md", ".json"):
            (out / "problems").with_suffix(suffix).unlink(missing_ok=True)
    paths["summary_md"] = atomic_write_text(out / "summary.md", text)
    paths["summary_json"] = write_json(out / "summary.json", {
        "thresholds": list(report.result.thresholds), "summary": report.result.summary, "problems": problems})
    return paths
