"""The ranking's options measured side by side on one bank (issue 13, section 3): ``"variants"`` in a rank-study
config.

Each variant is the study's ranking again with other options (where dropout acts, ``dropout_site``; when its
channels are drawn, ``dropout_draw``; how an image where a model finds nothing counts, ``empty``) and,
optionally, fewer perturbations. Every variant reads and extends the study's cache of unperturbed predictions
(``OUT/rank/cache``), so it pays only its perturbed passes; its rankings go to ``OUT/variants/<name>/<perturbation>/``.
The table ``variants_correlations.{csv,md,json}`` puts the study's own ranking (variant ``default``, with the
options it ran with) and each variant's correlations with the true F1 and accuracy in one place: the evidence
for choosing the defaults.
"""

from __future__ import annotations

import re
from pathlib import Path

from dqtool.common.errors import InputError

#: What a variant may set, beside its ``name``: the ranking's options, and the perturbations it ranks with.
OPTIONS = ("dropout_site", "dropout_draw", "empty")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_variants(variants, perturbations: list[str], where: str = "config") -> list[dict]:
    """The ``variants`` list checked: each ``{"name", [dropout_site], [dropout_draw], [empty], [perturbations]}``
    with a file-name-safe unique name (not ``default``), known option values, and perturbations among the
    study's (default: all of them)."""
    from dqtool.ranking.perturb import DROPOUT_DRAWS, DROPOUT_SITES
    from dqtool.ranking.rank import EMPTY_RULES, parse_perturbations

    allowed = {"dropout_site": DROPOUT_SITES, "dropout_draw": DROPOUT_DRAWS, "empty": EMPTY_RULES}
    if not isinstance(variants, list):
        raise InputError(f"{where}: variants: expected a list of {{'name': ..., 'dropout_site': ...}}")
    out, names = [], set()
    for k, v in enumerate(variants):
        if not isinstance(v, dict) or not isinstance(v.get("name"), str):
            raise InputError(f"{where}: variant {k + 1}: expected {{'name': NAME, ...options}}")
        name = v["name"]
        if not _NAME.match(name) or name == "default" or name in names:
            raise InputError(f"{where}: variant name {name!r}: use a new file name of letters, digits, '_', '-', "
                             "'.' (not 'default')")
        names.add(name)
        unknown = sorted(set(v) - {"name", "perturbations", *OPTIONS})
        if unknown:
            raise InputError(f"{where}: variant {name!r}: unknown keys {', '.join(unknown)} (expected "
                             f"{', '.join(OPTIONS)}, perturbations)")
        for key in OPTIONS:
            if key in v and v[key] not in allowed[key]:
                raise InputError(f"{where}: variant {name!r}: {key} {v[key]!r}: expected one of "
                                 f"{', '.join(allowed[key])}")
        kinds = list(parse_perturbations(v.get("perturbations", perturbations)))
        if not set(kinds) <= set(perturbations):
            raise InputError(f"{where}: variant {name!r}: perturbations {kinds}: the study ranks with "
                             f"{perturbations} only")
        out.append({"name": name, "perturbations": kinds, **{key: v[key] for key in OPTIONS if key in v}})
    return out


def _pass_key(options: dict) -> tuple:
    """What a ranking's network passes depend on among its options: all but the ``empty`` rule."""
    from dqtool.ranking.perturb import DEFAULT_DROPOUT_DRAW, DEFAULT_DROPOUT_SITE

    full = {"dropout_site": DEFAULT_DROPOUT_SITE, "dropout_draw": DEFAULT_DROPOUT_DRAW, **options}
    return tuple(sorted((k, repr(v)) for k, v in full.items() if k != "empty"))


def run_variants(variants: list[dict], out: Path, images, labels, seed: int, base_options: dict,
                 default_options: dict, quiet: bool = True, cluster=None,
                 default_results: dict | None = None) -> list[dict]:
    """Rank the bank ``out/bank`` once per variant (``base_options`` under the variant's own) with the study's
    unperturbed cache, and write ``out/variants_correlations``: the default ranking's rows, then each
    variant's, each row the options it ran with and one correlation record (per perturbation and score),
    from the files (:func:`tabulate_variants`).

    A variant whose passes were already computed (the study's own ranking, ``default_results``: perturbation
    -> :class:`dqtool.ranking.rank.RankResult`, or an earlier variant's) and that changes only the ``empty``
    rule is summarised again from their per-image records (:func:`dqtool.ranking.rank.rescore_empty`): no
    network pass, the files a ranking with its options writes."""
    from dqtool.ranking.rank import DEFAULT_EMPTY, rank_bank

    computed: dict[tuple, dict] = {}  # pass key -> perturbation -> RankResult whose passes ran
    if default_results:
        computed[_pass_key(base_options)] = dict(default_results)
    for v in variants:
        options = {**base_options, **{k: v[k] for k in OPTIONS if k in v}}
        have = computed.get(_pass_key(options), {})
        if all(k in have for k in v["perturbations"]):
            rescore_variant(out, v["name"], {k: have[k] for k in v["perturbations"]},
                            options.get("empty", DEFAULT_EMPTY), images, labels)
        else:
            results = rank_bank(out / "bank", images, labels=labels, perturbations=v["perturbations"],
                                out=out / "variants" / v["name"],
                                seed=seed, quiet=quiet, subfolders=True, cache_dir=out / "rank" / "cache", reuse=True,
                                **options, **({"cluster": cluster} if cluster is not None and cluster.active else {})
                                ).results
            computed.setdefault(_pass_key(options), {}).update(results)
    return tabulate_variants(out, variants, default_options)


def rescore_variant(out: Path, name: str, results: dict, empty: str, images, labels) -> dict:
    """Variant ``name`` of the study in ``out`` from rankings whose network passes already ran (``results``:
    perturbation -> :class:`dqtool.ranking.rank.RankResult`, in memory or read back from their folders with
    :func:`dqtool.ranking.rank.read_ranking`) under the ``empty`` rule: written into
    ``out/variants/<name>/<perturbation>/``, the files a ranking with those options writes."""
    from dqtool.common.outputs import writing_folder
    from dqtool.ranking.rank import rescore_empty, target_files, write_outputs

    names = [f.name for f in target_files(images)]
    folder = out / "variants" / name
    rescored = {k: rescore_empty(r, empty) for k, r in results.items()}
    with writing_folder(folder, "rank", [out / "bank", images, labels]):  # as rank_bank's folder
        for k, result in rescored.items():
            result.paths = write_outputs(result, folder / k, names)
    return rescored


def tabulate_variants(out: Path, variants: list[dict], default_options: dict) -> list[dict]:
    """``out/variants_correlations`` written again from the files: the study's ``study_correlations.json`` and
    each variant's ``rank.json`` (the table :func:`run_variants` writes)."""
    import json

    from dqtool.common.tables import write_table
    from dqtool.ranking.rank import read_ranking

    out = Path(out)
    rows = [{"variant": "default", **default_options, **c}
            for c in json.loads((out / "study_correlations.json").read_text())]
    for v in variants:
        for kind in v["perturbations"]:
            result = read_ranking(out / "variants" / v["name"] / kind)
            recorded = {k: result.options[k] for k in OPTIONS}
            rows += [{"variant": v["name"], **recorded, "perturbation": kind, **c} for c in result.correlations]
    write_table(rows, out / "variants_correlations")
    return rows
