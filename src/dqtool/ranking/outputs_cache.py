"""The cache of unperturbed predictions a ranking writes beside its output (``<out>/cache/``).

One ``.npz`` file per (model sha256, image sha256, eval settings): the masks, flows (dP) and
cell-probability logit of the unperturbed pass, and a ``key`` (JSON) that says what they were
computed from. A later ranking with another perturbation or strength reads them instead of running
the unperturbed pass again. The cache never changes a result: arrays go to disk and back unchanged
(``np.savez``, no compression, no dtype change). Files are written through
:func:`dqtool.common.files.atomic_write`, so a killed run leaves whole files or none.

A file is used only when its stored key equals the wanted one; a file that cannot be read (a
truncated copy) or whose key differs (another model or other settings under that name) is
recomputed and overwritten, and the ranking says so in a note.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dqtool.common.files import atomic_write
from dqtool.ranking.passes import Prediction

__all__ = ["CACHE_VERSION", "OutputsCache"]

CACHE_VERSION = 1


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


@dataclass
class OutputsCache:
    """Unperturbed predictions under ``folder``, keyed by model, image and eval settings."""

    folder: Path
    settings: dict  # EvalSettings.key()
    hits: int = 0
    written: int = 0
    notes: list = field(default_factory=list)

    def __post_init__(self):
        self.folder = Path(self.folder)
        self.settings_digest = _digest({"version": CACHE_VERSION, **self.settings})

    def key(self, model_sha: str, image_sha: str) -> dict:
        return {"version": CACHE_VERSION, "model_sha256": model_sha, "image_sha256": image_sha,
                "settings": self.settings}

    def path(self, model_sha: str, image_sha: str) -> Path:
        return self.folder / f"{model_sha[:16]}-{image_sha[:16]}-{self.settings_digest[:12]}.npz"

    def load(self, model_sha: str, image_sha: str, what: str) -> Prediction | None:
        """The cached prediction, or None (missing, unreadable or another key: said in ``notes``)."""
        path = self.path(model_sha, image_sha)
        if not path.exists():
            others = list(self.folder.glob(f"{model_sha[:16]}-{image_sha[:16]}-*.npz")) if self.folder.is_dir() else []
            if others:
                self.notes.append(f"cache {self.folder}: {what} was cached with other eval settings; recomputed")
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                stored = json.loads(str(z["key"]))
                pred = Prediction(z["masks"], z["flows"], z["cellprob"])
        except Exception as exc:  # a truncated or foreign file: recompute, never fail the ranking
            self.notes.append(f"cache {path}: unreadable ({type(exc).__name__}); {what} recomputed")
            return None
        if stored != self.key(model_sha, image_sha):
            self.notes.append(f"cache {path}: computed from another model, image or eval settings; "
                              f"{what} recomputed")
            return None
        self.hits += 1
        return pred

    def store(self, model_sha: str, image_sha: str, pred: Prediction) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(model_sha, image_sha)
        with atomic_write(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, masks=pred.masks, flows=pred.flows, cellprob=pred.cellprob,
                         key=np.array(json.dumps(self.key(model_sha, image_sha), sort_keys=True)))
                fh.flush()
                os.fsync(fh.fileno())
        self.written += 1
        return path

    def to_dict(self) -> dict:
        return {"folder": str(self.folder), "hits": self.hits, "written": self.written}
