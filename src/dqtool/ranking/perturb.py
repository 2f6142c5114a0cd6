"""Perturbations for consistency-based ranking (CTE, paper 004, section 2.2).

Input space (eq. 1), applied to the image *after* the model's own normalisation (Cellpose: 1st
percentile -> 0, 99th -> 1), each with a strength s:

* ``noise``:      x + e, e ~ N(0, s^2) per pixel (seeded)                    (default s = 0.06)
* ``gamma``:      sign(x) |x|^(1 + s)  (gain 1; identity at s = 0)            (default s = 0.3)
* ``brightness``: x + s                                                       (default s = 0.1)
* ``contrast``:   m + (1 + s)(x - m), m the image mean                        (default s = 0.3)

Feature space (eq. 2), the default: test-time channel ("spatial") dropout at Cellpose CPnet's
bottleneck. The bottleneck is the output of the deepest encoder level, B = T0[-1]; CPnet feeds it to
three consumers::

    style = make_style(B)                                   # the style vector, read by every up block
    x     = upsample.up[-1](x=B, y=B, style)                # decoder input x and the deepest skip y

Dropout replaces B by D(B), with exactly k = ceil(p * C) of its C channels zeroed and the others
scaled by 1 / (1 - p)::

    D(B)[:, c] = 0 for c in K,   D(B)[:, c] = B[:, c] / (1 - p) otherwise,   |K| = ceil(p * C)

``site`` says which consumers see D(B) (the paper's 3-D U-Net has only the first reading; CPnet has both):

* ``decoder`` (default, dqtool's first reading): ``up[-1](x=D(B), y=B, make_style(B))``; the
  unperturbed B still reaches the decoder through the skip and the style.
* ``bottleneck``: every consumer, ``up[-1](x=D(B), y=D(B), s')`` with ``s' = make_style(D(B))``
  given to every up block, as if the encoder itself had output D(B).

``draw`` says when K is drawn from the run's ``torch.Generator`` seeded with ``seed``:

* ``batch`` (the paper's code; the default since the real-bank measurement of issue 13, where it ranked
  9 real models in their true order, Spearman 1.00 against 0.98 for ``run``): anew for every forward
  pass (a batch of tiles shares one K), the draws following each other in the generator's stream; so
  the channels an image gets depend on which batch its tiles run in (batch size, tile packing). A
  ranking gives every image a stream of its own (seeded by its noise seed), so its bytes do not depend
  on how images are spread over workers.
* ``run``: once, at the first forward pass; the same K for every tile and image of the run (what
  ``select --method uncertain`` uses, so that every patch is judged under the same perturbation).

The first draw of both is :func:`dropout_channels` ``(C, p, seed)``. The hooks work in eval mode and
are removed on exit, leaving the network as it was; a :class:`ChannelDropout` kept across several
``with`` blocks continues its stream (what a ranking does, one block per batch).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np

__all__ = [
    "INPUT_PERTURBATIONS", "PERTURBATIONS", "DEFAULT_STRENGTH", "perturb_image", "dropout_channels",
    "bottleneck_dropout", "find_bottleneck", "default_strength", "ChannelDropout", "DROPOUT_SITES",
    "DROPOUT_DRAWS", "DEFAULT_DROPOUT_SITE", "DEFAULT_DROPOUT_DRAW", "check_dropout_options",
]

INPUT_PERTURBATIONS = ("noise", "gamma", "brightness", "contrast")
PERTURBATIONS = ("dropout",) + INPUT_PERTURBATIONS
DEFAULT_STRENGTH = {"dropout": 0.2, "noise": 0.06, "gamma": 0.3, "brightness": 0.1, "contrast": 0.3}
DROPOUT_SITES = ("decoder", "bottleneck")  # which consumers of the bottleneck see the dropped channels
DROPOUT_DRAWS = ("run", "batch")  # dropped channels drawn once per run, or anew per forward pass
DEFAULT_DROPOUT_SITE = "decoder"  # the real-bank measurement (issue 13): Spearman 0.98 against 0.95 at the bottleneck
DEFAULT_DROPOUT_DRAW = "batch"  # the real-bank measurement (issue 13): Spearman 1.00 against 0.98 drawn once per run


def check_dropout_options(site: str, draw: str) -> None:
    """ValueError unless ``site`` is one of :data:`DROPOUT_SITES` and ``draw`` one of :data:`DROPOUT_DRAWS`."""
    if site not in DROPOUT_SITES:
        raise ValueError(f"dropout site must be one of {', '.join(DROPOUT_SITES)}; got {site!r}")
    if draw not in DROPOUT_DRAWS:
        raise ValueError(f"dropout draw must be one of {', '.join(DROPOUT_DRAWS)}; got {draw!r}")


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


def _upsample(net):
    up = getattr(net, "upsample", None)
    if up is None or len(getattr(up, "up", ())) == 0:
        raise ValueError(f"expected a Cellpose CPnet (with upsample.up), got {type(net).__name__}")
    return up


class ChannelDropout:
    """The dropped channels of one run: rate ``p``, ``seed`` and ``draw`` ('run' or 'batch', module docs).

    :meth:`apply` drops channels of a bottleneck tensor (dense or MKL-DNN); :attr:`draws` lists every
    draw made so far, :attr:`channels` the latest.
    """

    def __init__(self, p: float = 0.2, seed: int = 0, draw: str = DEFAULT_DROPOUT_DRAW):
        import torch

        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout rate p must lie in [0, 1), got {p}")
        check_dropout_options(DEFAULT_DROPOUT_SITE, draw)
        self.p, self.seed, self.draw = float(p), int(seed), draw
        self.scale = 1.0 / (1.0 - self.p)
        self._generator = torch.Generator().manual_seed(self.seed)
        self.channels = None
        self.draws: list = []

    def next_channels(self, n_channels: int):
        """K for the next forward pass: drawn anew under 'batch', once under 'run'."""
        import torch

        if self.draw == "run" and self.channels is not None:
            if n_channels != self._n_channels:
                raise ValueError(f"bottleneck has {n_channels} channels, the run's draw was for {self._n_channels}")
            return self.channels
        k = math.ceil(self.p * n_channels)
        self.channels = torch.randperm(n_channels, generator=self._generator)[:k].sort().values
        self._n_channels = n_channels
        self.draws.append(self.channels)
        return self.channels

    def apply(self, x):
        """D(x): the next draw's channels zeroed, the others scaled by 1 / (1 - p); (D(x), dense D(x))."""
        import torch

        mkldnn = x.is_mkldnn
        dense = x.to_dense() if mkldnn else x
        channels = self.next_channels(dense.shape[1])
        keep = torch.full((dense.shape[1],), self.scale, dtype=dense.dtype, device=dense.device)
        keep[channels.to(dense.device)] = 0.0
        dropped = dense * keep.view(1, -1, *([1] * (dense.ndim - 2)))
        return (dropped.to_mkldnn() if mkldnn else dropped), dropped


@contextmanager
def bottleneck_dropout(net, p: float = 0.2, seed: int = 0, site: str = DEFAULT_DROPOUT_SITE,
                       draw: str = DEFAULT_DROPOUT_DRAW, dropout: ChannelDropout | None = None):
    """Context manager: channel dropout at CPnet's bottleneck (eq. 2) at ``site``, drawn per ``draw``.

    ``site='decoder'``: a forward pre-hook on ``upsample.up[-1]`` replaces its input x by D(B) (the
    skip y and the style stay). ``site='bottleneck'``: a forward pre-hook on ``upsample`` replaces
    B = T0[-1] by D(B) in the list of encoder outputs it reads (a new list: the caller's T0 is not
    changed, so an encoder pass can be decoded plain and perturbed) and the style by
    ``make_style(D(B))``, so every consumer sees D(B). ``dropout`` (a :class:`ChannelDropout`) carries a
    run's draws across several ``with`` blocks; without it one is made from ``p``, ``seed``, ``draw``.

    Yields a dict that gets ``channels`` (the latest dropped indices) and ``draws`` (all of them,
    one per forward pass under 'batch') once a forward pass has seen C. On exit the hook is removed,
    so the network computes exactly what it did before.
    """
    check_dropout_options(site, draw if dropout is None else dropout.draw)
    if dropout is None:
        dropout = ChannelDropout(p, seed, draw)
    state: dict = {"channels": None, "draws": dropout.draws, "site": site, "dropout": dropout}

    def decoder_hook(module, args):
        dropped, _ = dropout.apply(args[0])
        state["channels"] = dropout.channels
        return (dropped,) + tuple(args[1:])  # y (the skip connection) and style stay untouched

    def bottleneck_hook(module, args):
        if len(args) < 2:
            raise ValueError("expected CPnet's upsample(style, xd, mkldnn) called with positional arguments")
        style, xd = args[0], args[1]
        dropped, dense = dropout.apply(xd[-1])
        state["channels"] = dropout.channels
        new_style = net.make_style(dense)
        if not getattr(net, "style_on", True):  # CPnet.forward's switch, kept
            new_style = new_style * 0
        new_style = new_style.to(style.dtype)
        return (new_style, list(xd[:-1]) + [dropped]) + tuple(args[2:])

    if site == "decoder":
        handle = find_bottleneck(net).register_forward_pre_hook(decoder_hook)
    else:
        handle = _upsample(net).register_forward_pre_hook(bottleneck_hook)
    try:
        yield state
    finally:
        handle.remove()
