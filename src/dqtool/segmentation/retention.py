"""Retention without the source data: finetuning terms that keep what the starting model knew.

Paper 1 shows naive finetuning on a new domain makes Cellpose forget the old one and repairs it with replay,
which needs the source images and labels. A lab finetuning a pretrained model on its own images rarely has
them. Both terms here need only the starting model theta^0 (``--init``) and the target patches:

``l2sp`` (L2-SP, Li, Grandvalet and Davoine, ICML 2018): the weights are pulled towards the starting
model rather than towards zero,

    Omega(theta) = W / 2 * sum_i || theta_i - theta^0_i ||^2          (every trainable parameter i)

added to Cellpose's loss. All of Cellpose's layers are shared with the starting model (no new head), so
L2-SP's second term (a plain L2 on new layers) is empty. The optimiser's weight decay stays as configured
(Cellpose's 1e-4 towards zero, 100x weaker than the default W here); ``--weight-decay 0`` gives pure L2-SP.
With ``--adamw`` the term's gradient is rescaled per weight by Adam, so it is no longer the paper's SGD form and
its range of W does not carry over.

``lwf`` (Learning without Forgetting, Li and Hoiem, TPAMI 2018): the frozen starting model's outputs on the
same augmented target batch are soft targets. With y = (flow_y, flow_x, z) the new network's output and
y^0 the starting model's (in inference mode, as LwF records the original network's responses),

    L_lwf = W * ( 1/2 * mean (flow - flow^0)^2  +  mean KL( sigma(z^0) || sigma(z) ) )

where KL(q || p) = q log(q/p) + (1-q) log((1-q)/(1-p)) is the binary cross-entropy of the logits z against
the soft target q = sigma(z^0) minus its entropy: the same gradient as that BCE, and zero when the two
outputs are equal (the flow term has the 1/2 of Cellpose's own flow loss, ``_loss_fn_seg``). The starting
model runs in inference mode (its batch-norm running statistics, as LwF records the original network's
responses) while the model being trained uses batch statistics, so at the first step the term is the gap
between the two, not 0. LwF's temperature (T = 2 for its softmax classes) has no counterpart here: the cell
probability is one logistic output and the flows are regression targets, matched as they are.
One extra forward pass of the starting model per batch.
"""

from __future__ import annotations

import math

from dqtool.common.errors import InputError

#: ``--retain`` choices.
RETAIN = ("none", "l2sp", "lwf")
#: The weight W when none is given: L2-SP's alpha of its paper's range, and LwF's lambda_o = 1.
DEFAULT_WEIGHTS = {"l2sp": 0.01, "lwf": 1.0}


def check_retain(retain: str, weight: float | None) -> float:
    """The weight to use for ``retain`` (its default for None); a bad method or weight is an InputError."""
    if retain not in RETAIN:
        raise InputError(f"retain {retain!r}: expected one of {', '.join(RETAIN)}")
    if retain == "none":
        if weight is not None and weight != 0:
            raise InputError(f"retain_weight = {weight}: only with --retain l2sp or lwf")
        return 0.0
    if weight is None:
        return DEFAULT_WEIGHTS[retain]
    try:
        w = float(weight)
    except (TypeError, ValueError):
        raise InputError(f"retain_weight = {weight!r}: expected a number") from None
    if not math.isfinite(w) or w < 0:
        raise InputError(f"retain_weight = {weight}: expected a finite number >= 0")
    return w


def l2sp_penalty(net, reference: dict):
    """sum_i ||theta_i - theta^0_i||^2 / 2 over ``net``'s trainable parameters (``reference``: name -> tensor)."""
    total = None
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        d = (p - reference[name]).pow(2).sum()
        total = d if total is None else total + d
    return 0.5 * total


def lwf_loss(y, y_old):
    """1/2 mean (flow - flow^0)^2 + mean KL(sigma(z^0) || sigma(z)) for outputs (B, 3, H, W): flows in channels
    0-1, cell-probability logits z in channel 2; ``y_old`` is the starting model's (no gradient)."""
    import torch
    import torch.nn.functional as F

    flows = 0.5 * F.mse_loss(y[:, :2], y_old[:, :2])
    q = torch.sigmoid(y_old[:, 2])
    # BCE(z, q) - H(q): log-sigmoid forms, finite for any logits
    bce = F.binary_cross_entropy_with_logits(y[:, 2], q, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(y_old[:, 2], q, reduction="none")
    return flows + (bce - entropy).mean()


class Retention:
    """The retention term of one training run: ``term(net, x, y)`` is W * Omega (l2sp) or W * L_lwf (lwf)
    for the batch ``x`` whose network output is ``y``; built from the starting model ``init``."""

    def __init__(self, retain: str, weight: float, init):
        import torch

        from dqtool.segmentation.model_files import build_net

        self.retain, self.weight = retain, float(weight)
        start = build_net(init)
        if retain == "l2sp":
            self.reference = {n: p.detach().clone() for n, p in start.named_parameters()}
            self.old = None
        else:
            self.reference = None
            self.old = start.eval()
            for p in self.old.parameters():
                p.requires_grad_(False)
        self._torch = torch

    def __call__(self, net, x, y):
        if self.retain == "l2sp":
            return self.weight * l2sp_penalty(net, self.reference)
        with self._torch.no_grad():
            y_old = self.old(x)[0]
        return self.weight * lwf_loss(y, y_old)
