"""A Vision Transformer masked autoencoder (MAE, He et al., CVPR 2022), written for dqtool.

The encoder's parameter names and shapes are those of the official MAE checkpoints
(``mae_pretrain_vit_base.pth``: a torch state dict under ``"model"`` with timm-style names), so those
weights load unchanged::

    cls_token (1, 1, E)                  pos_embed (1, 1 + L, E)   (fixed 2-D sin-cos, not trained)
    patch_embed.proj.{weight,bias}       Conv2d(C, E, kernel=P, stride=P)
    blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2
    norm                                 final LayerNorm (eps 1e-6)
    decoder_embed, mask_token, decoder_pos_embed, decoder_blocks.{i}.*, decoder_norm, decoder_pred
                                         (pretraining decoder; ignored when only features are wanted)

Pretraining (MAE Sec. 3): a random 75% of the L = (S/P)^2 patch tokens is dropped, the encoder sees
the rest, a light decoder predicts the pixels of the dropped patches, and the loss is the mean squared
error over dropped patches only,

    loss = (1 / |M|) sum_{l in M} mean_j (pred_{l,j} - target_{l,j})^2,

with ``target`` each patch's pixels normalised by that patch's own mean and variance (``norm_pix_loss``,
as the official pretraining runs use).

Features (:meth:`MaskedAutoencoderViT.features`) use **no masking**: all L tokens go through the
encoder and the final norm, and the feature is the mean over the L patch tokens (the class token is
left out), so the same image always gives the same vector. The released code of the DQ-for-Cellpose
paper masks 75% at random on every pass, which makes its features change from run to run.

Every random choice (initialisation, masking) takes an explicit ``torch.Generator``; the global RNG is
never touched.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dqtool.common.errors import InputError

__all__ = [
    "MAEConfig",
    "CONFIGS",
    "DEFAULT_CONFIG",
    "MaskedAutoencoderViT",
    "sincos_pos_embed_2d",
    "is_decoder_key",
    "encoder_state_dict",
    "encoder_hash",
    "config_from_state_dict",
]


@dataclass(frozen=True)
class MAEConfig:
    """Shape of a ViT MAE: image size S, patch size P, width E, depth, heads, and its decoder."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    mlp_ratio: float = 4.0
    norm_pix_loss: bool = True

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    def to_dict(self) -> dict:
        return asdict(self)


CONFIGS: dict[str, MAEConfig] = {
    # The official MAE models (models_mae.py: mae_vit_{base,large,huge}_patch*_dec512d8b).
    "vit_base_patch16": MAEConfig("vit_base_patch16", 768, 12, 12, 512, 8, 16),
    "vit_large_patch16": MAEConfig("vit_large_patch16", 1024, 24, 16, 512, 8, 16),
    "vit_huge_patch14": MAEConfig("vit_huge_patch14", 1280, 32, 16, 512, 8, 16, patch_size=14),
    # dqtool's default: the ViT-Tiny encoder (192 wide, 12 blocks, 3 heads of 64) with a 2-block decoder,
    # small enough to pretrain on a cache's own patches in minutes on two CPU cores.
    "mae_tiny_patch16": MAEConfig("mae_tiny_patch16", 192, 12, 3, 128, 2, 4),
}
DEFAULT_CONFIG = "mae_tiny_patch16"


def sincos_pos_embed_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """Fixed 1-D sin-cos embedding (Vaswani et al. 2017, Sec. 3.5), MAE's layout: sines then cosines.

    omega_i = 1 / 10000^(i / (E/2)),  i = 0..E/2-1;   emb(pos) = [sin(pos * omega), cos(pos * omega)].
    """
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even for sin-cos embeddings, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    angles = np.outer(np.asarray(positions, dtype=np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding of a ``grid_size`` x ``grid_size`` token grid (MAE).

    Token ``l = row * grid_size + col`` gets ``[emb_{E/2}(col), emb_{E/2}(row)]`` (first half encodes
    the column, second half the row, as in the official code); with ``cls_token`` a zero row is put
    first. Returns float64 (1 + L, E) or (L, E).
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for 2-D sin-cos, got {embed_dim}")
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    emb = np.concatenate([sincos_pos_embed_1d(embed_dim // 2, cols),
                          sincos_pos_embed_1d(embed_dim // 2, rows)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
    return emb


class PatchEmbed(nn.Module):
    """Non-overlapping P x P patches to E-d tokens with one strided convolution (``proj``)."""

    def __init__(self, config: MAEConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.in_chans, config.embed_dim, config.patch_size, config.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, E, g, g) -> (B, L, E)


class Attention(nn.Module):
    """Multi-head self-attention, softmax(Q K^T / sqrt(d)) V, with one fused ``qkv`` projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MaskedAutoencoderViT(nn.Module):
    """ViT encoder + light decoder for masked-patch reconstruction; see the module docstring."""

    def __init__(self, config: MAEConfig | str = DEFAULT_CONFIG, seed: int = 0):
        super().__init__()
        if isinstance(config, str):
            config = CONFIGS[config]
        self.config = config
        c = config
        # Encoder (official names).
        self.patch_embed = PatchEmbed(c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(Block(c.embed_dim, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
        # Pretraining decoder.
        self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(c.decoder_embed_dim, c.decoder_num_heads, c.mlp_ratio)
                                            for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(c.decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(c.decoder_embed_dim, c.patch_size ** 2 * c.in_chans)
        self.initialize_weights(seed)

    def initialize_weights(self, seed: int) -> None:
        """MAE's initialisation, drawn from a generator seeded with ``seed``: fixed sin-cos position
        embeddings; xavier-uniform for every Linear and for the patch projection seen as a Linear;
        N(0, 0.02) for ``cls_token`` and ``mask_token``; zero biases; LayerNorm weight 1, bias 0."""
        gen = torch.Generator().manual_seed(int(seed))
        c = self.config
        with torch.no_grad():
            self.pos_embed.copy_(torch.from_numpy(sincos_pos_embed_2d(c.embed_dim, c.grid_size)).float()[None])
            self.decoder_pos_embed.copy_(
                torch.from_numpy(sincos_pos_embed_2d(c.decoder_embed_dim, c.grid_size)).float()[None])
            w = self.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1), generator=gen)
            nn.init.zeros_(self.patch_embed.proj.bias)
            nn.init.normal_(self.cls_token, std=0.02, generator=gen)
            nn.init.normal_(self.mask_token, std=0.02, generator=gen)
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight, generator=gen)
                    nn.init.zeros_(module.bias)
                elif isinstance(module, nn.LayerNorm):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)

    # -- pixels <-> patch tokens -------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, L, P*P*C), patches in row-major order, pixels (p, q, c) within each."""
        p, g, c = self.config.patch_size, self.config.grid_size, self.config.in_chans
        x = imgs.reshape(imgs.shape[0], c, g, p, g, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], g * g, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`patchify`."""
        p, g, c = self.config.patch_size, self.config.grid_size, self.config.in_chans
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    # -- pretraining -------------------------------------------------------------------------------
    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float, generator: torch.Generator):
        """Keep a uniformly random ``(1 - mask_ratio)`` of each image's tokens (argsort of uniform
        noise). Returns kept tokens, the mask (1 = dropped) in original order, and the restore order."""
        b, n, d = x.shape
        keep = int(n * (1 - mask_ratio))
        noise = torch.rand(b, n, generator=generator, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        return kept, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float = 0.0,
                        generator: torch.Generator | None = None):
        """Encoder tokens after the final norm, class token first: (B, 1 + kept, E).

        With ``mask_ratio == 0`` nothing is dropped or shuffled (features); otherwise ``generator``
        is required (pretraining). Also returns the mask and restore order (None without masking)."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        mask = ids_restore = None
        if mask_ratio > 0:
            if generator is None:
                raise ValueError("random masking needs an explicit torch.Generator")
            x, mask, ids_restore = self.random_masking(x, mask_ratio, generator)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Mask tokens fill the dropped places, tokens return to image order; predict P*P*C pixels."""
        x = self.decoder_embed(x)
        n_fill = ids_restore.shape[1] + 1 - x.shape[1]
        tokens = torch.cat([x[:, 1:, :], self.mask_token.expand(x.shape[0], n_fill, -1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], tokens], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over dropped patches; targets per-patch normalised (norm_pix_loss)."""
        target = self.patchify(imgs)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, generator: torch.Generator, mask_ratio: float = 0.75):
        """Pretraining pass: returns (loss, pred (B, L, P*P*C), mask (B, L))."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    # -- features ----------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Deterministic image features: f(x) = (1/L) sum_{l=1..L} norm(encoder(x))_l, the mean over all
        L patch tokens (class token excluded), with no masking. (B, C, S, S) -> (B, E)."""
        latent, _, _ = self.forward_encoder(imgs, mask_ratio=0.0)
        return latent[:, 1:, :].mean(dim=1)


def is_decoder_key(name: str) -> bool:
    """Pretraining-only parameters: ``decoder_*`` and ``mask_token``."""
    return name.startswith("decoder_") or name == "mask_token"


def encoder_state_dict(model: MaskedAutoencoderViT) -> dict[str, torch.Tensor]:
    """The encoder's parameters and buffers under their official names (decoder left out)."""
    return {k: v for k, v in model.state_dict().items() if not is_decoder_key(k)}


def encoder_hash(model: MaskedAutoencoderViT, extra: str = "") -> str:
    """SHA-256 of the encoder's identity: config, then every encoder tensor's name, shape, dtype and
    bytes in name order, then ``extra`` (e.g. the preprocessing recipe). Same weights, same hash."""
    h = hashlib.sha256()
    h.update(repr(sorted(model.config.to_dict().items())).encode())
    for name, tensor in sorted(encoder_state_dict(model).items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    h.update(extra.encode())
    return h.hexdigest()


def config_from_state_dict(state: dict[str, torch.Tensor]) -> MAEConfig | None:
    """The known config whose encoder shapes (width, depth, patch size, token count) match ``state``;
    None if none does. Head count is not visible in shapes, so only known configs are accepted."""
    try:
        width = int(state["cls_token"].shape[-1])
        patch = int(state["patch_embed.proj.weight"].shape[-1])
        tokens = int(state["pos_embed"].shape[1])
    except (KeyError, IndexError, AttributeError):
        return None
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for config in CONFIGS.values():
        if (config.embed_dim, config.depth, config.patch_size, config.num_patches + 1) == \
                (width, depth, patch, tokens):
            return config
    return None


# ------------------------------------------------------------------------------------------------
# the encoder's input

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Changing anything in the preprocessing or pooling must change this string (it is part of the hash).
FEATURE_RECIPE = "x/255; gray->3ch; bilinear-antialias to img_size; imagenet mean/std; no mask; mean patch tokens"


def to_model_input(patches: np.ndarray, config: MAEConfig) -> torch.Tensor:
    """uint8 or [0, 1] float patches (n, S, S, C) -> standardised float32 (n, 3, img, img); see
    :mod:`dqtool.features.embed` for the mapping."""
    x = torch.from_numpy(np.ascontiguousarray(patches))
    x = (x.float() / 255.0) if x.dtype == torch.uint8 else x.float()
    x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, config.in_chans, -1, -1)
    elif x.shape[1] != config.in_chans:
        raise InputError(f"patches have {x.shape[1]} channels; the encoder takes 1 (replicated) or "
                         f"{config.in_chans}")
    if x.shape[-1] != config.img_size or x.shape[-2] != config.img_size:
        x = F.interpolate(x, size=(config.img_size, config.img_size), mode="bilinear", align_corners=False,
                          antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()
