"""Progress bars for anything that takes more than a few seconds (tqdm on stderr; ``quiet`` hides them)."""

from __future__ import annotations

from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", quiet: bool = False,
             unit: str = "it", **kwargs) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar unless ``quiet``."""
    return tqdm(iterable, total=total, desc=desc, disable=quiet, unit=unit, dynamic_ncols=True,
                leave=False, **kwargs)


def bar(total: int, desc: str = "", quiet: bool = False, unit: str = "it", **kwargs):
    """A manual tqdm bar (``.update(n)``, ``.set_postfix(...)``, ``.close()``)."""
    return tqdm(total=total, desc=desc, disable=quiet, unit=unit, dynamic_ncols=True, leave=False, **kwargs)
