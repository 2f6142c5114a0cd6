"""A study's JSON config file: read (``data_root`` resolved) and its keys checked (experiment, rank-study)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dqtool.common.errors import InputError

__all__ = ["read_config", "check_keys"]


def read_config(path: str | os.PathLike, data_root: str | os.PathLike | None = None):
    """The config in ``path`` as parsed JSON (not yet checked). A relative ``data_root`` in it is taken
    relative to the config file's folder; ``data_root`` given here (``--data-root``) replaces it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(f"{path}: not a JSON config ({exc})") from None
    if isinstance(config, dict):
        if data_root is not None:
            config["data_root"] = str(Path(data_root).resolve())
        elif config.get("data_root") is not None:
            config["data_root"] = str((path.parent / config["data_root"]).resolve())
    return config


def check_keys(config, keys, where: str = "config") -> None:
    """Refuse a config that is not a JSON object or has keys outside ``keys`` (naming them)."""
    if not isinstance(config, dict):
        raise InputError(f"{where}: expected a JSON object")
    unknown = sorted(set(config) - set(keys))
    if unknown:
        raise InputError(f"{where}: unknown keys {', '.join(unknown)} (expected some of {', '.join(sorted(keys))})")
