"""Perturbations for consistency-based ranking (CTE, paper 004, section 2.2).

Input space (eq. 1), applied to the image *after* the model's own normalisation (Cellpose: 1st
percentile -> 0, 99th -> 1), each with a strength s:

* ``noise``:      x + e, e ~ N(0, s^2) per pixel (seeded)                    (default s = 0.06)
* ``gamma``:      sign(x) |x|^(1 + s)  (gain 1; identity at s = 0)            (default s = 0.3)
* ``brightness``: x + s                                                       (default s = 0.1)
* ``contrast``:   m + (1 + s)(x - m), m the image mean                        (default s = 0.3)

Feature space (eq. 2), the default: test-time channel ("spatial") dropout at Cellpose CPnet's
bottleneck. The bottleneck is the output of the deepest encoder level, T0[-1]; CPnet feeds it to
the decoder (``net.upsample.up[-1](x=T0[-1], y=T0[-1], style)``) as the decoder input ``x``, as the
deepest skip connection ``y`` and to the style vector. Only the decoder input is perturbed: exactly
k = ceil(p * C) of its C channels are zeroed, the same channels for every tile and image of the
run (chosen once from a seeded ``torch.Generator``), and the others are scaled by 1 / (1 - p). The
hook works in eval mode and is removed on exit, leaving the network as it was.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np

__all__ = [
    "INPUT_PERTURBATIONS", "PERTURBATIONS", "DEFAULT_STRENGTH", "perturb_image", "dropout_channels",
    "bottleneck_dropout", "find_bottleneck", "default_strength",
]

INPUT_PERTURBATIONS = ("noise", "gamma", "brightness", "contrast")
PERTURBATIONS = ("dropout",) + INPUT_PERTURBATIONS
DEFAULT_STRENGTH = {"dropout": 0.2, "noise": 0.06, "gamma": 0.3, "brightness": 0.1, "contrast": 0.3}


def default_strength(kind: str) -> float:
    _check_kind(kind, PERTURBATIONS)
    return DEFAULT_STRENGTH[kind]


def _check_kind(kind: str, allowed) -> None:
    if kind not in allowed:
        raise ValueError(f"perturbation must be one of {', '.join(allowed)}; got {kind!r}")


def perturb_image(image: np.ndarray, kind: str, strength: float | None = None, seed: int = 0) -> np.ndarray:
    """Perturb a normalised image (eq. 1). Returns a new float32 array; the input is not changed.

    ``seed`` only matters for ``noise``; the same image, strength and seed give the same bytes.
    """
    _check_kind(kind, INPUT_PERTURBATIONS)
    s = DEFAULT_STRENGTH[kind] if strength is None else float(strength)
    if not math.isfinite(s):
        raise ValueError(f"strength must be finite, got {strength!r}")
    x = np.asarray(image, np.float32)
    if kind == "noise":
        if s < 0:
            raise ValueError(f"noise strength is a standard deviation, must be >= 0, got {s}")
        rng = np.random.default_rng(seed)
        return (x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(s)).astype(np.float32)
    if kind == "gamma":
        if s <= -1:
            raise ValueError(f"gamma strength s gives exponent 1 + s, must be > -1, got {s}")
        return (np.sign(x) * np.abs(x) ** np.float32(1.0 + s)).astype(np.float32)
    if kind == "brightness":
        return x + np.float32(s)
    mean = np.float32(x.mean(dtype=np.float64))
    return (mean + np.float32(1.0 + s) * (x - mean)).astype(np.float32)


def dropout_channels(n_channels: int, p: float, seed: int = 0):
    """Indices of exactly ceil(p * n_channels) channels, drawn without replacement (seeded)."""
    import torch

    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout rate p must lie in [0, 1), got {p}")
    k = math.ceil(p * n_channels)
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_channels, generator=generator)[:k].sort().values


def find_bottleneck(net):
    """The decoder block that reads the bottleneck T0[-1] as its input (CPnet ``upsample.up[-1]``)."""
    up = getattr(getattr(net, "upsample", None), "up", None)
    if up is None or len(up) == 0:
        raise ValueError(f"expected a Cellpose CPnet (with upsample.up), got {type(net).__name__}")
    return up[-1]


@contextmanager
def bottleneck_dropout(net, p: float = 0.2, seed: int = 0):
    """Context manager: channel dropout on the decoder input at CPnet's bottleneck (eq. 2).

    Yields a dict that gets ``channels`` (the dropped indices) once the first forward pass has seen
    C. On exit the hook is removed, so the network computes exactly what it did before.
    """
    import torch

    block = find_bottleneck(net)
    state: dict = {"channels": None, "scale": 1.0 / (1.0 - p) if p < 1 else math.inf}
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout rate p must lie in [0, 1), got {p}")

    def hook(module, args):
        x = args[0]
        mkldnn = x.is_mkldnn
        dense = x.to_dense() if mkldnn else x
        if state["channels"] is None:
            state["channels"] = dropout_channels(dense.shape[1], p, seed)
        keep = torch.full((dense.shape[1],), state["scale"], dtype=dense.dtype, device=dense.device)
        keep[state["channels"].to(dense.device)] = 0.0
        dropped = dense * keep.view(1, -1, *([1] * (dense.ndim - 2)))
        if mkldnn:
            dropped = dropped.to_mkldnn()
        return (dropped,) + tuple(args[1:])  # y (the skip connection) and style stay untouched

    handle = block.register_forward_pre_hook(hook)
    try:
        yield state
    finally:
        handle.remove()
