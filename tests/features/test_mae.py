"""The MAE ViT: official names/shapes, sin-cos embeddings, masking, loss and features vs NumPy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dqtool.common.errors import InputError
from dqtool.features.pretrain import load_mae_weights
from dqtool.features.mae import (CONFIGS, MAEConfig, MaskedAutoencoderViT, config_from_state_dict, encoder_hash,
                        encoder_state_dict, sincos_pos_embed_2d)

MICRO = MAEConfig("micro", embed_dim=16, depth=2, num_heads=2, decoder_embed_dim=8, decoder_depth=1,
                  decoder_num_heads=2, img_size=32, patch_size=8)


def micro_model(seed=0):
    return MaskedAutoencoderViT(MICRO, seed=seed)


# -- position embeddings ---------------------------------------------------------------------------


def test_sincos_pos_embed_matches_elementwise_formula():
    e, g = 8, 3
    emb = sincos_pos_embed_2d(e, g, cls_token=True)
    assert emb.shape == (1 + g * g, e)
    assert np.all(emb[0] == 0)
    q = e // 4  # frequencies per (sin|cos) quarter
    for row in range(g):
        for col in range(g):
            v = emb[1 + row * g + col]
            for i in range(q):
                w = 1.0 / 10000 ** (i / q)
                assert v[i] == pytest.approx(math.sin(col * w))
                assert v[q + i] == pytest.approx(math.cos(col * w))
                assert v[2 * q + i] == pytest.approx(math.sin(row * w))
                assert v[3 * q + i] == pytest.approx(math.cos(row * w))


def test_pos_embed_is_fixed_and_loaded_into_model():
    m = micro_model()
    assert not m.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad
    np.testing.assert_allclose(m.pos_embed[0].numpy(), sincos_pos_embed_2d(16, 4), atol=1e-6)
    np.testing.assert_allclose(m.decoder_pos_embed[0].numpy(), sincos_pos_embed_2d(8, 4), atol=1e-6)


# -- patches and masking ---------------------------------------------------------------------------


def test_patchify_layout_and_roundtrip():
    m = micro_model()
    imgs = torch.randn(2, 3, 32, 32)
    tokens = m.patchify(imgs)
    assert tokens.shape == (2, 16, 8 * 8 * 3)
    # token l = row * 4 + col holds pixels (p, q, c) of that 8x8 window
    ref = imgs[1, :, 8:16, 24:32].permute(1, 2, 0).reshape(-1)
    torch.testing.assert_close(tokens[1, 1 * 4 + 3], ref)
    torch.testing.assert_close(m.unpatchify(tokens), imgs)


def test_random_masking_keeps_quarter_and_is_seeded():
    x = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)
    kept, mask, restore = MaskedAutoencoderViT.random_masking(x, 0.75, torch.Generator().manual_seed(5))
    assert kept.shape == (2, 4, 3)
    assert mask.sum(dim=1).tolist() == [12.0, 12.0]
    for b in range(2):
        visible = x[b][mask[b] == 0]
        assert sorted(visible[:, 0].tolist()) == sorted(kept[b, :, 0].tolist())
    kept2, mask2, _ = MaskedAutoencoderViT.random_masking(x, 0.75, torch.Generator().manual_seed(5))
    assert torch.equal(mask, mask2) and torch.equal(kept, kept2)
    _, mask3, _ = MaskedAutoencoderViT.random_masking(x, 0.75, torch.Generator().manual_seed(6))
    assert not torch.equal(mask, mask3)


def test_masking_needs_a_generator():
    with pytest.raises(ValueError, match="Generator"):
        micro_model().forward_encoder(torch.zeros(1, 3, 32, 32), mask_ratio=0.75)


# -- loss ------------------------------------------------------------------------------------------


def test_loss_counts_only_masked_patches_with_normalised_targets():
    m = micro_model()
    imgs = torch.rand(2, 3, 32, 32, dtype=torch.float32)
    loss, pred, mask = m(imgs, torch.Generator().manual_seed(0))
    # NumPy reference of the norm_pix loss
    t = m.patchify(imgs).double().numpy()
    t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, ddof=1, keepdims=True) + 1e-6)
    per_patch = ((pred.detach().double().numpy() - t) ** 2).mean(-1)
    mk = mask.numpy()
    assert float(loss.detach()) == pytest.approx((per_patch * mk).sum() / mk.sum(), rel=1e-5)
    # predictions at visible patches do not change the loss
    pred2 = pred.detach().clone()
    pred2[mask == 0] += 10.0
    assert float(m.forward_loss(imgs, pred2, mask)) == pytest.approx(float(loss.detach()), rel=1e-6)


def test_one_training_step_lowers_the_loss_on_a_fixed_batch():
    m = micro_model(seed=1)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    phase = torch.rand(4, 3, 1, 1, generator=torch.Generator().manual_seed(2)) * 6
    imgs = torch.sin(xx / 4 + phase) * torch.cos(yy / 5 - phase)  # smooth, learnable structure
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss, _, _ = m(imgs, torch.Generator().manual_seed(3))  # same masks every step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0], losses  # gradients reach every part that matters


# -- features vs a NumPy ViT -----------------------------------------------------------------------


def _numpy_features(m: MaskedAutoencoderViT, imgs: np.ndarray) -> np.ndarray:
    """Plain float64 NumPy forward of the encoder with no masking; mean over the patch tokens."""
    sd = {k: v.detach().double().numpy() for k, v in m.state_dict().items()}
    c = m.config
    p, g = c.patch_size, c.grid_size

    def layer_norm(x, name):
        mu = x.mean(-1, keepdims=True)
        var = x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-6) * sd[name + ".weight"] + sd[name + ".bias"]

    def linear(x, name):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    erf = np.vectorize(math.erf)
    out = []
    for img in imgs:
        w = sd["patch_embed.proj.weight"].reshape(c.embed_dim, -1)
        tokens = np.stack([img[:, r * p:(r + 1) * p, q * p:(q + 1) * p].reshape(-1)
                           for r in range(g) for q in range(g)])
        x = tokens @ w.T + sd["patch_embed.proj.bias"] + sd["pos_embed"][0, 1:]
        x = np.concatenate([sd["cls_token"][0] + sd["pos_embed"][0, :1], x])
        for i in range(c.depth):
            b = f"blocks.{i}"
            h = layer_norm(x, b + ".norm1")
            qkv = linear(h, b + ".attn.qkv").reshape(len(x), 3, c.num_heads, -1)
            heads = []
            for j in range(c.num_heads):
                q_, k_, v_ = qkv[:, 0, j], qkv[:, 1, j], qkv[:, 2, j]
                s = q_ @ k_.T / math.sqrt(q_.shape[1])
                a = np.exp(s - s.max(1, keepdims=True))
                heads.append((a / a.sum(1, keepdims=True)) @ v_)
            x = x + linear(np.concatenate(heads, 1), b + ".attn.proj")
            h = linear(layer_norm(x, b + ".norm2"), b + ".mlp.fc1")
            h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
            x = x + linear(h, b + ".mlp.fc2")
        out.append(layer_norm(x, "norm")[1:].mean(0))
    return np.stack(out)


def test_features_match_numpy_vit_and_are_deterministic():
    m = micro_model(seed=3)
    imgs = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    f1 = m.features(imgs)
    f2 = m.features(imgs)
    assert f1.shape == (3, 16)
    assert torch.equal(f1, f2)  # no masking: identical bytes every pass
    np.testing.assert_allclose(f1.double().numpy(), _numpy_features(m, imgs.double().numpy()), atol=2e-5)


def test_initialisation_is_seeded():
    a, b, c = micro_model(seed=7), micro_model(seed=7), micro_model(seed=8)
    assert encoder_hash(a) == encoder_hash(b) != encoder_hash(c)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


# -- official checkpoint layout --------------------------------------------------------------------


def _official_vit_b16_state_dict(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors under the names/shapes of the official mae_pretrain_vit_base.pth (written out
    by hand from the MAE ViT-B/16 architecture, not from dqtool's model), plus the decoder keys of the
    visualisation checkpoints."""
    e, h, blocks = 768, 3072, 12
    shapes = {"cls_token": (1, 1, e), "pos_embed": (1, 197, e), "patch_embed.proj.weight": (e, 3, 16, 16),
              "patch_embed.proj.bias": (e,), "norm.weight": (e,), "norm.bias": (e,)}
    for i in range(blocks):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (e,), b + "norm1.bias": (e,), b + "attn.qkv.weight": (3 * e, e),
                       b + "attn.qkv.bias": (3 * e,), b + "attn.proj.weight": (e, e), b + "attn.proj.bias": (e,),
                       b + "norm2.weight": (e,), b + "norm2.bias": (e,), b + "mlp.fc1.weight": (h, e),
                       b + "mlp.fc1.bias": (h,), b + "mlp.fc2.weight": (e, h), b + "mlp.fc2.bias": (e,)})
    shapes.update({"mask_token": (1, 1, 512), "decoder_embed.weight": (512, e), "decoder_embed.bias": (512,),
                   "decoder_pos_embed": (1, 197, 512), "decoder_blocks.0.attn.qkv.weight": (1536, 512),
                   "decoder_norm.weight": (512,), "decoder_pred.weight": (768, 512)})
    return {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}


def test_official_vit_b16_checkpoint_loads(tmp_path):
    state = _official_vit_b16_state_dict(torch.Generator().manual_seed(0))
    path = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": state}, path)
    model = load_mae_weights(path)
    assert model.config.name == "vit_base_patch16"
    enc = encoder_state_dict(model)
    official = {k: v for k, v in state.items() if not (k.startswith("decoder_") or k == "mask_token")}
    assert set(enc) == set(official)
    for k, v in official.items():
        assert torch.equal(enc[k], v), k
    assert sum(v.numel() for v in enc.values()) == 85_798_656  # ViT-B/16 encoder, pos_embed included
    f = model.features(torch.zeros(1, 3, 224, 224))
    assert f.shape == (1, 768) and torch.isfinite(f).all()
    # a mis-shaped official tensor is named in the error, with the file
    state["blocks.3.mlp.fc1.weight"] = torch.zeros(3072, 700)
    torch.save({"model": state}, path)
    with pytest.raises(InputError, match=r"mae_pretrain_vit_base\.pth.*blocks\.3\.mlp\.fc1\.weight"):
        load_mae_weights(path)


def test_config_detection_and_name_errors(tmp_path):
    m = MaskedAutoencoderViT("mae_tiny_patch16")
    sd = encoder_state_dict(m)
    assert config_from_state_dict(sd) is CONFIGS["mae_tiny_patch16"]
    path = tmp_path / "w.pth"
    extra = dict(sd, **{"head.weight": torch.zeros(10, 192)})
    torch.save({"model": extra}, path)
    with pytest.raises(InputError, match=r"w\.pth.*unexpected: head\.weight"):
        load_mae_weights(path)
    missing = {k: v for k, v in sd.items() if k != "blocks.0.attn.proj.bias"}
    torch.save({"model": missing}, path)
    with pytest.raises(InputError, match=r"w\.pth.*missing: blocks\.0\.attn\.proj\.bias"):
        load_mae_weights(path)
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 100)}}, path)
    with pytest.raises(InputError, match=r"w\.pth.*known MAE"):
        load_mae_weights(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"w\.pth.*not a readable torch checkpoint"):
        load_mae_weights(path)
    with pytest.raises(FileNotFoundError):
        load_mae_weights(tmp_path / "absent.pth")
    # a bare state dict (no 'model' key) and the saved round trip both load
    torch.save(sd, path)
    loaded = load_mae_weights(path)
    assert encoder_hash(loaded) == encoder_hash(m)
