"""Self-supervised pretraining of the default MAE on a cache's own patches, and loading MAE weights.

The default encoder (ViT-Tiny, D = 192) learns by masked-patch reconstruction on the cache's patches (no
labels, no network): :func:`pretrain_mae`. It is saved beside the cache as ``<cache stem>.mae-<hash>.pt``
(:func:`default_mae_path`, written through a temp file and a rename) and reused while cache, config,
epochs, seed and batch size are the same. :func:`load_mae_weights` reads the official MAE checkpoints
(ViT-B/16 ``mae_pretrain_vit_base.pth``, ViT-L/16, ViT-H/14) or a saved default model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from pathlib import Path

import torch

from dqtool.common.errors import InputError
from dqtool.common.files import atomic_write
from dqtool.common.progress import bar
from dqtool.data.cache import PatchCache
from dqtool.features.mae import (CONFIGS, DEFAULT_CONFIG, MAEConfig, MaskedAutoencoderViT, config_from_state_dict,
                                 encoder_state_dict, is_decoder_key, to_model_input)

# Same for the default pretraining recipe (part of the saved MAE's file name).
TRAIN_RECIPE = "adamw b(0.9,0.95) wd0.05 lr1e-3*bs/64 warmup5% cosine; mask0.75; flips+rot90; v1"
PRETRAIN_IMAGE_BUDGET = 2000  # images seen by the default pretraining: ~1 min on 2 idle CPU cores
MAX_AUTO_EPOCHS = 15


def auto_epochs(n_patches: int) -> int:
    """Default epoch count: about PRETRAIN_IMAGE_BUDGET images in all, ceil(2000 / N), kept in [1, 15]
    (10 epochs of 200 patches, 2 of 1,000, 1 from 2,000 on)."""
    return int(min(MAX_AUTO_EPOCHS, max(1, math.ceil(PRETRAIN_IMAGE_BUDGET / max(1, n_patches)))))


def _lr_at(step: int, total: int, peak: float) -> float:
    """Linear warmup over the first 5% of steps, then half-cosine decay to 0 (MAE, appendix A.1)."""
    warmup = max(1, int(0.05 * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random rot90 (k in 0..3) and horizontal flip per image; microscopy has no up or left."""
    k = torch.randint(0, 4, (x.shape[0],), generator=gen)
    flip = torch.randint(0, 2, (x.shape[0],), generator=gen)
    out = [torch.rot90(img, int(ki), dims=(1, 2)) for img, ki in zip(x, k)]
    out = [torch.flip(img, dims=(2,)) if f else img for img, f in zip(out, flip)]
    return torch.stack(out)


def pretrain_mae(cache: PatchCache, config: MAEConfig | str = DEFAULT_CONFIG, epochs: int = 1, seed: int = 0,
                 batch_size: int = 64, quiet: bool = True) -> tuple[MaskedAutoencoderViT, list[float]]:
    """Pretrain an MAE on all patches of ``cache`` by masked-patch reconstruction (no labels).

    Recipe (``TRAIN_RECIPE``): AdamW (betas 0.9/0.95, weight decay 0.05 on weights only), peak learning
    rate 1e-3 * batch_size / 64 with 5% warmup and cosine decay, 75% masking, random rot90 + flip.
    One ``torch.Generator`` seeded with ``seed`` draws the initialisation, the patch order, the
    augmentation and the masks, so the same cache and seed give the same weights. Returns the model
    and the mean loss of each epoch.
    """
    config = CONFIGS[config] if isinstance(config, str) else config
    model = MaskedAutoencoderViT(config, seed=seed)
    gen = torch.Generator().manual_seed(int(seed) + 1)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1 and "token" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.ndim <= 1 or "token" in n)]
    peak = 1e-3 * batch_size / 64
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=peak, betas=(0.9, 0.95))
    n = len(cache)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    progress = bar(total, desc="MAE pretraining", quiet=quiet, unit="step")
    losses = []
    model.train()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).numpy()
        running, seen = 0.0, 0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x = _augment(to_model_input(cache.images(idx), config), gen)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, peak)
            loss, _, _ = model(x, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += float(loss.detach()) * len(idx)
            seen += len(idx)
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{float(loss.detach()):.4f}")
        losses.append(running / seen)
    progress.close()
    model.eval()
    return model, losses


def default_mae_path(cache: PatchCache, config: MAEConfig, epochs: int, seed: int, batch_size: int) -> Path:
    """``<cache stem>.mae-<16 hex>.pt`` beside the cache; the hash covers the cache's content hash, the
    config, epochs, seed, batch size and the training recipe, so any change trains a new model."""
    key = json.dumps({"cache": cache.content_hash, "config": config.to_dict(), "epochs": int(epochs),
                      "seed": int(seed), "batch_size": int(batch_size), "recipe": TRAIN_RECIPE}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache.path.with_name(f"{cache.path.stem}.mae-{digest}.pt")


def save_mae(model: MaskedAutoencoderViT, path: Path, meta: dict) -> None:
    """Write ``{"model": state_dict, "config": name, "dqtool": meta}`` (the official layout plus two keys)
    to a temp file beside ``path`` and rename it into place, so a killed run leaves no partial file."""
    with atomic_write(path) as tmp:
        torch.save({"model": model.state_dict(), "config": model.config.name, "dqtool": meta}, tmp)


def _torch_load(path: Path) -> dict:
    # weights_only: never unpickle arbitrary objects; the official training checkpoints also carry an
    # argparse.Namespace under "args", which is allowed explicitly.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, not a torch file, or disallowed pickled objects
        raise InputError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a dict with a 'model' state dict, got {type(obj).__name__}")
    return obj


def load_mae_weights(path: str | os.PathLike) -> MaskedAutoencoderViT:
    """An MAE whose encoder holds the weights in ``path`` (state dict under ``"model"``, or a bare state
    dict). Decoder keys are ignored; any other missing, unexpected or mis-shaped name is an InputError
    naming the file and the first offending keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    obj = _torch_load(path)
    state = obj.get("model", obj)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: 'model' is not a state dict of tensors")
    encoder = {k: v for k, v in state.items() if not is_decoder_key(k)}
    config = CONFIGS.get(obj.get("config")) if isinstance(obj.get("config"), str) else None
    config = config or config_from_state_dict(encoder)
    if config is None:
        shape = tuple(encoder["cls_token"].shape) if "cls_token" in encoder else "missing"
        raise InputError(f"{path}: encoder does not match a known MAE ViT ({', '.join(CONFIGS)}): cls_token "
                         f"{shape}, {len({k.split('.')[1] for k in encoder if k.startswith('blocks.')})} blocks; "
                         "expected the official MAE checkpoint layout (e.g. mae_pretrain_vit_base.pth)")
    model = MaskedAutoencoderViT(config, seed=0)
    expected = encoder_state_dict(model)
    missing = sorted(set(expected) - set(encoder))
    unexpected = sorted(set(encoder) - set(expected))
    mis_shaped = [f"{k} {tuple(encoder[k].shape)} (expected {tuple(expected[k].shape)})"
                  for k in sorted(set(expected) & set(encoder)) if encoder[k].shape != expected[k].shape]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
        if names:
            problems.append(f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    if problems:
        raise InputError(f"{path}: parameters do not match MAE {config.name}; " + "; ".join(problems))
    model.load_state_dict({k: v.float() for k, v in encoder.items()}, strict=False)
    model.eval()
    return model
