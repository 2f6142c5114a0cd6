"""``dqtool report RUN_DIR``: one page that says what a run found, as self-contained HTML and as Markdown.

The HTML file embeds every picture as a base64 PNG and links nothing outside itself, so it opens without a
network; the Markdown file holds the same sections, with its pictures written beside it in
``report_files/``. The page replaces only its own files (a page of ``dqtool report`` is recognised by its
content, :func:`dqtool.common.outputs.is_report_page`), never a lab's file of that name nor the ``report.md``
of a ``dqtool experiment`` folder; :func:`write_report` holds the output folder's lock.

Sections: what the run found (summary), data, DQ selection and coverage, each model's training (loss per
epoch), scores and ranking with its validation, predicted outlines of the best and worst ranked models. A
part the run lacks is said in its section and listed under "What is missing".
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dqtool.common.files import atomic_write_text
from dqtool.common.tables import format_markdown
from dqtool.report.contents import (
    Figure,
    Missing,
    Section,
    Table,
    Text,
    data_section,
    existing,
    find_rankings,
    images_of_ranking,
    ranked_models,
    ranking_section,
    selection_section,
    training_section,
)


@dataclass
class ReportResult:
    html: Path
    markdown: Path
    sections: list = field(default_factory=list)
    missing: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------ figures


def _png(fig) -> bytes:
    from dqtool.common.figures import pyplot

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    finally:
        pyplot().close(fig)
    return buf.getvalue()


def loss_figure(losses: dict[str, list[float]]) -> bytes:
    """Training loss per epoch, one line per model (log scale)."""
    from dqtool.common.figures import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, loss in losses.items():
        ax.plot(np.arange(1, len(loss) + 1), loss, label=name, lw=1.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    if all(min(v) > 0 for v in losses.values() if v):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _outlined(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Gray image (percentile-stretched) with instance outlines in yellow, as RGB float."""
    from skimage.segmentation import find_boundaries

    from dqtool.data.io import to_gray

    gray = to_gray(image).astype(np.float64)
    lo, hi = np.percentile(gray, (1, 99.8))
    gray = np.clip((gray - lo) / max(hi - lo, 1e-9), 0, 1)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    rgb[find_boundaries(masks, mode="inner")] = (1.0, 0.85, 0.0)
    return rgb


def ranked_masks(model: str | os.PathLike, image: Path, cache_dirs: list[Path]) -> np.ndarray | None:
    """The masks a ranking already computed for ``model`` on ``image`` (its unperturbed pass, in the ranking's
    outputs cache), or None: found only under the key of Cellpose's default eval settings at the model's own
    diameter, the settings :func:`dqtool.segmentation.predict.segment` uses, so the outlines are the same
    pixels either way; the cache checks the model's and the image's sha256 and the settings."""
    from dqtool.common.files import file_sha256
    from dqtool.ranking.outputs_cache import OutputsCache
    from dqtool.ranking.passes import EvalSettings

    folders = [d for d in cache_dirs if d.is_dir()]
    if not folders:
        return None
    try:
        model_sha, image_sha = file_sha256(model), file_sha256(image)
    except OSError:
        return None
    for folder in folders:
        pred = OutputsCache(folder, EvalSettings().key()).load(model_sha, image_sha, str(image))
        if pred is not None:
            return np.asarray(pred.masks)
    return None


def outlines_figure(model_paths: list[str], titles: list[str], image_files: list[Path],
                    truth: list[np.ndarray | None], quiet: bool = True, cache_dirs: list[Path] = ()) -> bytes:
    """Rows: images; columns: the truth (when known), then each model's predicted outlines (read from a
    ranking's outputs cache in ``cache_dirs`` where it holds them, else segmented here)."""
    from dqtool.common.figures import pyplot
    from dqtool.common.progress import progress
    from dqtool.data.io import read_image
    from dqtool.segmentation.predict import load_model, segment

    images = [read_image(f) for f in image_files]
    preds = []
    for path in progress(model_paths, desc="report: outlines", quiet=quiet, unit="model"):
        found = [ranked_masks(path, f, cache_dirs) for f in image_files]
        if any(m is None for m in found):
            model = load_model(path)
            found = [segment(model, img) if m is None else m for m, img in zip(found, images)]
        preds.append(found)
    show_truth = any(t is not None for t in truth)
    cols = len(model_paths) + int(show_truth)
    plt = pyplot()
    fig, axes = plt.subplots(len(images), cols, figsize=(3.2 * cols, 3.2 * len(images)), squeeze=False)
    for i, (f, img) in enumerate(zip(image_files, images)):
        panels = ([("truth", truth[i])] if show_truth else []) + [(t, p[i]) for t, p in zip(titles, preds)]
        for j, (title, masks) in enumerate(panels):
            ax = axes[i, j]
            if masks is None:
                ax.imshow(_outlined(img, np.zeros(img.shape[:2], np.uint32)))
                title += " (no label)"
            else:
                ax.imshow(_outlined(img, masks))
                title += f": {int(masks.max())} objects"
            ax.set_title(f"{f.name}\n{title}", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def outlines_section(run: Path, rankings: list[dict], images: str | os.PathLike | None,
                     labels: str | os.PathLike | None, n_images: int, quiet: bool) -> Section:
    from dqtool.data.io import read_labels
    from dqtool.data.naming import LabelFolder, list_input_images

    sec = Section("outlines", "Predicted outlines: best and worst ranked model")
    if not rankings:
        sec.blocks.append(Missing("no ranking, so no best and worst model to show"))
        return sec
    doc = rankings[0]
    ranked = [m for m in ranked_models(doc) if existing(m)]
    if not ranked:
        sec.blocks.append(Missing("no scored model of the ranking is on disk any more"))
        return sec
    folder = existing(images) or existing(images_of_ranking(doc))
    if folder is None:
        sec.blocks.append(Missing("no target images: pass `dqtool report RUN --images DIR` (the folder ranked)"))
        return sec
    files = list_input_images(folder)[:n_images]
    labels_dir = existing(labels) or (folder if labels is None else None)
    found = LabelFolder(labels_dir) if labels_dir is not None and labels_dir.is_dir() else None
    truth = []
    for f in files:
        p = found.find(f) if found is not None else None
        truth.append(read_labels(p) if p is not None else None)
    picks = [ranked[0]] + ([ranked[-1]] if len(ranked) > 1 else [])
    titles = [f"best: {Path(picks[0]).name}"] + ([f"worst: {Path(picks[1]).name}"] if len(picks) > 1 else [])
    caches = [p.parent / "cache" for p in find_rankings(run)]  # each ranking's cache of unperturbed predictions
    png = outlines_figure(picks, titles, files, truth, quiet=quiet, cache_dirs=caches)
    sec.blocks.append(Text(f"{len(files)} images of {folder}; yellow: object outlines (the truth from the labels, "
                           "then each model's prediction at its own training diameter)."))
    sec.blocks.append(Figure("outlines.png", png, "Truth, best and worst ranked model on the same images"))
    return sec


# ------------------------------------------------------------------------------------------ summary


def summary_section(run: Path, data_rows, subset_rows, losses, rankings) -> Section:
    sec = Section("summary", "What the run found")
    lines = []
    if data_rows:
        lines.append("Data: " + "; ".join(f"{r['cache']} holds {r['patches']} patches of {r['source images']} "
                                          f"images ({r['domains']})" for r in data_rows) + ".")
    for r in subset_rows:
        if r.get("method") != "dq":
            lines.append(f"Baseline: {r['subset']} ({r['method']}, rate {r['rate']}) keeps {r['patches']} patches.")
            continue
        dq, rnd = r.get("dq covering radius"), r.get("random covering radius")
        cmp = "" if dq is None or rnd is None else (
            f"; covering radius {dq} vs {rnd} for random ({'DQ covers better' if dq < rnd else 'random covers better' if rnd < dq else 'equal'})")
        lines.append(f"Selection: {r['subset']} ({r['method']}, rate {r['rate']}) keeps {r['patches']} patches{cmp}.")
    if losses:
        lines.append(f"Training: {len(losses)} models; loss fell from first to last epoch for "
                     f"{sum(1 for v in losses.values() if len(v) > 1 and v[-1] < v[0])} of them.")
    for doc in rankings[:1]:
        ok = [r for r in doc["ranking"] if r.get("status") == "ok"]
        if ok:
            best = ok[0]
            f1 = best.get("f1")
            lines.append(f"Ranking: {len(ok)} models scored; best by consistency ({doc.get('score')}): "
                         f"{Path(str(best['model'])).name}" + (f", true F1@0.5 {f1:.3f}" if f1 is not None else "") + ".")
        for c in doc.get("correlations") or []:
            which = c.get("consistency", c.get("score"))
            if which in (None, doc.get("score")) and c.get("performance", "F1@0.5") == "F1@0.5" \
                    and c.get("spearman") is not None:
                p = c.get("spearman_p")
                lines.append(f"Validation: Spearman {c['spearman']:.2f}" + (f" (p {p:.3f})" if p is not None else "") +
                             f" between {doc.get('score')} and the true F1 over {c.get('n_models', '?')} models.")
                break
    sec.blocks.append(Text(" ".join(lines) if lines else "Nothing in this folder reads as a dqtool run yet."))
    return sec


# ---------------------------------------------------------------------------------------- rendering

_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}td,th{border:1px solid #ccc;padding:.25em .5em;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;
border:1px solid #eee}figure{margin:1em 0}figcaption{font-size:.85em;color:#555}.missing{color:#a33}
code{background:#f4f4f4;padding:0 .2em}"""


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _inline(text: str) -> str:
    """Escaped text with `code` spans."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(title: str, sections: list[Section], missing: list[str]) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
           f"<h1>{html.escape(title)}</h1>"]
    for sec in sections:
        out.append(f'<section id="{sec.key}">')
        out.append(f"<h2>{html.escape(sec.title)}</h2>")
        for b in sec.blocks:
            if isinstance(b, Text):
                out.append(f"<p>{_inline(b.text)}</p>")
            elif isinstance(b, Missing):
                out.append(f'<p class="missing">Missing: {_inline(b.text)}</p>')
            elif isinstance(b, Table) and b.rows:
                cols = list(b.rows[0])
                out.append("<table>")
                out.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>")
                for row in b.rows:
                    out.append("<tr>" + "".join(f"<td>{html.escape(_cell(row.get(c)))}</td>" for c in cols) + "</tr>")
                out.append("</table>")
            elif isinstance(b, Figure):
                data = base64.b64encode(b.png).decode("ascii")
                out.append(f'<figure><img alt="{html.escape(b.caption)}" src="data:image/png;base64,{data}">'
                           f"<figcaption>{html.escape(b.caption)}</figcaption></figure>")
        out.append("</section>")
    out.append('<section id="missing">')
    out.append("<h2>What is missing</h2>")
    if missing:
        out.append("<ul>" + "".join(f"<li>{_inline(m)}</li>" for m in missing) + "</ul>")
    else:
        out.append("<p>Nothing: every part of the run is there.</p>")
    out += ["</section>", "</body>", "</html>", ""]
    return "\n".join(out)


def render_markdown(title: str, sections: list[Section], missing: list[str], files_dir: str) -> str:
    out = [f"# {title}", ""]
    for sec in sections:
        out += [f"## {sec.title}", ""]
        for b in sec.blocks:
            if isinstance(b, Text):
                out += [b.text, ""]
            elif isinstance(b, Missing):
                out += [f"**Missing:** {b.text}", ""]
            elif isinstance(b, Table) and b.rows:
                cols = list(b.rows[0])
                out += [format_markdown([{c: _cell(r.get(c)) for c in cols} for r in b.rows], cols), ""]
            elif isinstance(b, Figure):
                out += [f"![{b.caption}]({files_dir}/{b.name})", "", f"*{b.caption}*", ""]
    out += ["## What is missing", ""]
    out += [f"- {m}" for m in missing] if missing else ["Nothing: every part of the run is there."]
    return "\n".join(out) + "\n"


# -------------------------------------------------------------------------------------------- entry


#: The page's own entries in its folder: the two pages, and the folder of the Markdown page's pictures.
PAGES = ("report.html", "report.md")
FILES_DIR = "report_files"


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _foreign_file(folder: Path) -> str | None:
    """The first entry of ``report_files/`` that is not the report's own picture, or None.

    The report's own: listed with its sha256 in the folder's marker (``dqtool report`` writes it), or, in a
    folder of an earlier release (no marker), linked from the ``report.md`` page beside it.
    """
    from dqtool.common.files import file_sha256
    from dqtool.common.outputs import MARKER, folder_marker, is_report_page

    marker = folder_marker(folder)
    page = folder.parent / "report.md"
    if marker is not None:
        listed = marker.get("files") if marker.get("command") == "report" else None
        if not isinstance(listed, dict):
            return MARKER  # another command's folder
        linked = ""
    else:
        listed, linked = {}, page.read_text(encoding="utf-8") if is_report_page(page) else ""
    for entry in sorted(folder.iterdir()):
        if entry.name == MARKER and marker is not None:
            continue
        if not entry.is_file() or entry.is_symlink():
            return entry.name
        digest = listed.get(entry.name)
        if digest is not None and file_sha256(entry) == digest:
            continue
        if marker is None and f"]({FILES_DIR}/{entry.name})" in linked:
            continue
        return entry.name
    return None


def check_report_outputs(out_dir: Path, inputs) -> None:
    """Refuse to write the page into ``out_dir`` where it would replace what is not the report's own.

    Refused, with one line naming the path: ``out_dir`` (or its ``report_files/``) being one of the inputs
    (``--images``, ``--labels``); a ``dqtool experiment`` folder (its ``report.md`` is the study's own);
    an existing ``report.html`` or ``report.md`` that is not a page of ``dqtool report``, or a folder of that
    name; a ``report_files`` that is a file, or a folder holding anything but the report's pictures
    (:func:`_foreign_file`: the folder is replaced whole).
    """
    from dqtool.common.errors import InputError
    from dqtool.common.outputs import folder_marker, is_report_page

    for item in inputs:
        if item is None:
            continue
        for path in (out_dir, out_dir / FILES_DIR):
            if _same(path, Path(item)):
                raise InputError(f"{path}: is also an input of `dqtool report`; give --out another folder")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InputError(f"{out_dir}: is a file; `dqtool report` writes its page into a folder: give --out DIR")
    marker = folder_marker(out_dir)
    if marker is not None and marker.get("command") == "experiment":
        raise InputError(f"{out_dir}: is a `dqtool experiment` folder, whose report.md is the study's own; "
                         "`dqtool report` will not replace it: give --out DIR for the page")
    for name in PAGES:
        path = out_dir / name
        if path.is_dir():
            raise InputError(f"{path}: is a folder; `dqtool report` writes its page here: move it away or give "
                             "--out DIR")
        if path.exists() and not is_report_page(path):
            head = path.read_bytes()[:16] if path.is_file() else b""
            whose = "is `dqtool experiment`'s study report" if head.startswith(b"# dqtool study") else \
                "exists and was not written by `dqtool report`"
            raise InputError(f"{path}: {whose}; dqtool will not overwrite it: move it away or give --out DIR")
    files = out_dir / FILES_DIR
    if files.exists() and not files.is_dir():
        raise InputError(f"{files}: is a file; `dqtool report` writes its pictures into a folder of that name: "
                         "move it away or give --out DIR")
    foreign = _foreign_file(files) if files.is_dir() else None
    if foreign is not None:
        raise InputError(f"{files}: {foreign} was not written by `dqtool report` (or changed since); dqtool will "
                         "not replace this folder: move the file away or give --out DIR")


def write_report(run_dir: str | os.PathLike, images: str | os.PathLike | None = None,
                 labels: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
                 n_images: int = 2, quiet: bool = False) -> ReportResult:
    """Write ``report.html`` (self-contained) and ``report.md`` (+ ``report_files/``) for the run in ``run_dir``.

    ``images``: the target folder whose first ``n_images`` images get predicted outlines (default: the one
    the ranking recorded, if any); ``labels``: their labels (default: beside the images). ``out``: the
    folder for the page (default: ``run_dir``).

    The page replaces only its own files (:func:`check_report_outputs`, before anything is read), with the
    folder's lock (``.OUT.lock`` beside it) held for the whole call: one writer at a time, and none while
    another dqtool command writes that folder whole. Each page is written through a temp file and a rename;
    ``report_files/`` is built beside its old self (with dqtool's marker) and swapped in whole.
    """
    from dqtool.common.errors import InputError
    from dqtool.common.files import temp_path
    from dqtool.common.outputs import output_error, swap_folder, write_marker, writing

    run = Path(run_dir)
    if not run.is_dir():
        raise InputError(f"{run_dir}: not a run folder (expected the folder `make demo` or your commands wrote)")
    out_dir = Path(out) if out is not None else run
    if out_dir.name in ("", ".", ".."):  # `dqtool report .`: its lock goes beside the folder, by its name
        out_dir = out_dir.resolve()
    inputs = [images, labels]
    check_report_outputs(out_dir, inputs)  # before the run is read, a folder made or a lock taken
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(out_dir, exc) from exc
    with writing(out_dir, "report", kind="folder", check=False):  # the folder's lock; faults are one line
        check_report_outputs(out_dir, inputs)  # again: another writer may have finished meanwhile
        title, sections, missing = _build(run, images, labels, n_images, quiet)
        out_dir.mkdir(parents=True, exist_ok=True)
        staged = temp_path(out_dir / FILES_DIR)
        try:
            staged.mkdir()
            figures = {b.name: b.png for sec in sections for b in sec.blocks if isinstance(b, Figure)}
            for name, png in figures.items():
                (staged / name).write_bytes(png)
            digests = {name: hashlib.sha256(png).hexdigest() for name, png in figures.items()}
            write_marker(staged, "report", files=digests)
            swap_folder(staged, out_dir / FILES_DIR)
        finally:
            if staged.exists():
                shutil.rmtree(staged)
        html_path = atomic_write_text(out_dir / "report.html", render_html(title, sections, missing))
        md_path = atomic_write_text(out_dir / "report.md", render_markdown(title, sections, missing, FILES_DIR))
    return ReportResult(html_path, md_path, sections, missing)


def _build(run: Path, images, labels, n_images: int, quiet: bool) -> tuple[str, list[Section], list[str]]:
    """The page's title, sections and missing parts (the run read; nothing written)."""
    data, data_rows = data_section(run)
    selection, subset_rows = selection_section(run)
    training, losses = training_section(run)
    if losses:
        training.blocks.append(Figure("losses.png", loss_figure(losses), "Training loss per epoch"))
    elif not training.missing:
        training.blocks.append(Missing("no per-epoch losses (no MODEL.json beside the models)"))
    ranking, rankings = ranking_section(run)
    outlines = outlines_section(run, rankings, images, labels, n_images, quiet)
    sections = [summary_section(run, data_rows, subset_rows, losses, rankings), data, selection, training,
                ranking, outlines]
    missing = [f"{sec.title}: {m}" for sec in sections for m in sec.missing]
    return f"dqtool report: {run.resolve().name}", sections, missing
