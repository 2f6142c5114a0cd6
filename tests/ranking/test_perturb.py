"""Perturbations: input transforms by their formulas, bottleneck dropout against a hand-written CPnet pass."""

import math

import numpy as np
import pytest
import torch
from cellpose.resnet_torch import CPnet

from dqtool.ranking.perturb import (DEFAULT_STRENGTH, ChannelDropout, bottleneck_dropout, dropout_channels,
                                   find_bottleneck, perturb_image)

NBASE = [2, 8, 16, 32, 40]  # a small CPnet: bottleneck C = 40 channels


def small_net(mkldnn=False, seed=0):
    torch.manual_seed(seed)
    net = CPnet(list(NBASE), 3, sz=3, mkldnn=mkldnn)
    net.eval()
    return net


def reference_forward(net, data, channels, p):
    """CPnet.forward written out, with the bottleneck decoder input (only) channel-dropped."""
    with torch.no_grad():
        t0 = net.downsample(data)
        style = net.make_style(t0[-1])
        x_in = t0[-1].clone()
        x_in[:, channels] = 0.0
        keep = [c for c in range(x_in.shape[1]) if c not in set(channels.tolist())]
        x_in[:, keep] = x_in[:, keep] / (1.0 - p)
        x = net.upsample.up[-1](x_in, t0[-1], style)
        for n in range(len(net.upsample.up) - 2, -1, -1):
            x = net.upsample.upsampling(x)
            x = net.upsample.up[n](x, t0[n], style)
        return net.output(x)


@pytest.mark.parametrize("n_channels,p", [(256, 0.2), (40, 0.2), (10, 0.05), (7, 0.5), (5, 0.0)])
def test_dropout_channels_exact_count_and_seeded(n_channels, p):
    idx = dropout_channels(n_channels, p, seed=3)
    assert len(idx) == math.ceil(p * n_channels)
    assert len(set(idx.tolist())) == len(idx) and all(0 <= i < n_channels for i in idx.tolist())
    assert torch.equal(idx, dropout_channels(n_channels, p, seed=3))


def test_dropout_channels_depend_on_seed():
    draws = {tuple(dropout_channels(256, 0.2, seed=s).tolist()) for s in range(5)}
    assert len(draws) == 5


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_rejects_bad_rate(p):
    with pytest.raises(ValueError, match="dropout rate"):
        dropout_channels(10, p)
    with pytest.raises(ValueError, match="dropout rate"):
        with bottleneck_dropout(small_net(), p=p):
            pass


def test_bottleneck_dropout_matches_reference_and_leaves_model_unchanged():
    net = small_net()
    data = torch.randn(2, 2, 64, 64, generator=torch.Generator().manual_seed(1))
    state_before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        clean = net(data)[0]
    with bottleneck_dropout(net, p=0.2, seed=7, draw="run") as state:  # one draw for both passes
        with torch.no_grad():
            dropped = net(data)[0]
            again = net(data[:1])[0]
        channels = state["channels"]
    assert len(channels) == math.ceil(0.2 * NBASE[-1])
    assert torch.equal(channels, dropout_channels(NBASE[-1], 0.2, seed=7))
    want = reference_forward(net, data, channels, 0.2)
    torch.testing.assert_close(dropped, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, want[:1], rtol=1e-4, atol=1e-4)  # same channels for every call
    assert not torch.allclose(dropped, clean, atol=1e-3)
    # the hook is gone and nothing in the network changed
    assert len(find_bottleneck(net)._forward_pre_hooks) == 0
    assert not net.training
    with torch.no_grad():
        assert torch.equal(net(data)[0], clean)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state_before[k])


def test_bottleneck_dropout_keeps_skip_and_style():
    net = small_net()
    data = torch.randn(1, 2, 32, 32, generator=torch.Generator().manual_seed(2))
    seen = {}

    def spy(module, args):
        seen["x"], seen["y"], seen["style"] = args[0], args[1], args[2]

    with torch.no_grad():
        t0 = net.downsample(data)
        style = net.make_style(t0[-1])
    with bottleneck_dropout(net, p=0.25, seed=0) as state:
        handle = find_bottleneck(net).register_forward_pre_hook(spy)  # runs after the dropout hook
        with torch.no_grad():
            net(data)
        handle.remove()
    torch.testing.assert_close(seen["y"], t0[-1])
    torch.testing.assert_close(seen["style"], style)
    dropped = state["channels"]
    assert torch.all(seen["x"][:, dropped] == 0)
    keep = torch.ones(NBASE[-1], dtype=torch.bool)
    keep[dropped] = False
    torch.testing.assert_close(seen["x"][:, keep], t0[-1][:, keep] / 0.75)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no MKL-DNN")
def test_bottleneck_dropout_on_mkldnn_net():
    net = small_net(mkldnn=True)
    plain = small_net(mkldnn=False)
    data = torch.randn(1, 2, 32, 32, generator=torch.Generator().manual_seed(4))
    with bottleneck_dropout(net, p=0.2, seed=1) as state, torch.no_grad():
        got = net(data)[0]
    want = reference_forward(plain, data, state["channels"], 0.2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_find_bottleneck_rejects_other_networks():
    with pytest.raises(ValueError, match="CPnet"):
        find_bottleneck(torch.nn.Linear(2, 2))


def drop(t, channels, p):
    """D(t) written out: the listed channels zeroed, the others divided by 1 - p."""
    out = t.clone()
    keep = [c for c in range(t.shape[1]) if c not in set(channels.tolist())]
    out[:, channels] = 0.0
    out[:, keep] = out[:, keep] / (1.0 - p)
    return out


def reference_forward_every_consumer(net, data, channels, p):
    """CPnet.forward written out from cellpose/resnet_torch.py with B = T0[-1] replaced by D(B) for all
    three consumers: the decoder input x, the skip y of the last up block, and the style vector."""
    with torch.no_grad():
        t0 = net.downsample(data)
        b = drop(t0[-1], channels, p)
        style = net.make_style(b)
        x = net.upsample.up[-1](b, b, style)
        for n in range(len(net.upsample.up) - 2, -1, -1):
            x = net.upsample.upsampling(x)
            x = net.upsample.up[n](x, t0[n], style)
        return net.output(x), style


@pytest.mark.parametrize("mkldnn", [False, True])
@pytest.mark.parametrize("site", ["decoder", "bottleneck"])
def test_dropout_zero_rate_is_the_unperturbed_output_at_both_sites(site, mkldnn):
    if mkldnn and not torch.backends.mkldnn.is_available():
        pytest.skip("no MKL-DNN")
    net = small_net(mkldnn=mkldnn)
    data = torch.randn(2, 2, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        clean = net(data)[0]
        for draw in ("run", "batch"):
            with bottleneck_dropout(net, p=0.0, seed=3, site=site, draw=draw) as state:
                assert torch.equal(net(data)[0], clean)
            assert len(state["channels"]) == 0


def test_bottleneck_site_drops_every_consumer():
    net = small_net()
    data = torch.randn(2, 2, 32, 32, generator=torch.Generator().manual_seed(2))
    seen = {}

    def spy_last(module, args):
        seen["x"], seen["y"], seen["style"] = args[0], args[1], args[2]

    def spy_first(module, args):
        seen["style_first"] = args[2]

    with torch.no_grad():
        t0 = net.downsample(data)
        clean_style = net.make_style(t0[-1])
    with bottleneck_dropout(net, p=0.25, seed=0, site="bottleneck") as state:
        handles = [net.upsample.up[-1].register_forward_pre_hook(spy_last),
                   net.upsample.up[0].register_forward_pre_hook(spy_first)]
        with torch.no_grad():
            got, got_style, _ = net(data)
        for h in handles:
            h.remove()
    channels = state["channels"]
    assert torch.equal(channels, dropout_channels(NBASE[-1], 0.25, seed=0))
    dropped = drop(t0[-1], channels, 0.25)
    torch.testing.assert_close(seen["x"], dropped)
    torch.testing.assert_close(seen["y"], dropped)  # the skip of the last up block
    want, want_style = reference_forward_every_consumer(net, data, channels, 0.25)
    torch.testing.assert_close(seen["style"], want_style)  # the style, from the dropped features
    torch.testing.assert_close(seen["style_first"], want_style)  # ... in every up block
    assert not torch.allclose(want_style, clean_style, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_style, clean_style)  # CPnet returns its own (encoder) style
    # the decoder site differs: only x is dropped
    with bottleneck_dropout(net, p=0.25, seed=0, site="decoder"), torch.no_grad():
        decoder_only = net(data)[0]
    torch.testing.assert_close(decoder_only, reference_forward(net, data, channels, 0.25), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(decoder_only, got, atol=1e-4)
    assert len(net.upsample._forward_pre_hooks) == 0 and len(find_bottleneck(net)._forward_pre_hooks) == 0


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no MKL-DNN")
def test_bottleneck_site_on_mkldnn_net():
    net = small_net(mkldnn=True)
    plain = small_net(mkldnn=False)
    data = torch.randn(1, 2, 32, 32, generator=torch.Generator().manual_seed(4))
    with bottleneck_dropout(net, p=0.2, seed=1, site="bottleneck") as state, torch.no_grad():
        got = net(data)[0]
    want, _ = reference_forward_every_consumer(plain, data, state["channels"], 0.2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_shared_encoder_pass_decodes_plain_and_every_site():
    """What the ranking's shared passes do: one encoder pass, decoded plain and under each site; the
    encoder outputs are not changed by a perturbed decode."""
    net = small_net()
    data = torch.randn(2, 2, 32, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        t0 = net.downsample(data)
        style = net.make_style(t0[-1])
        before = [t.clone() for t in t0]
        clean = net.output(net.upsample(style, t0, False))
        out = {}
        for site in ("decoder", "bottleneck"):
            with bottleneck_dropout(net, p=0.2, seed=5, site=site):
                out[site] = net.output(net.upsample(style, t0, False))
        assert all(torch.equal(a, b) for a, b in zip(t0, before))
        assert torch.equal(net.output(net.upsample(style, t0, False)), clean)
    channels = dropout_channels(NBASE[-1], 0.2, seed=5)
    torch.testing.assert_close(out["decoder"], reference_forward(net, data, channels, 0.2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["bottleneck"], reference_forward_every_consumer(net, data, channels, 0.2)[0],
                               rtol=1e-5, atol=1e-5)


def test_dropout_draw_per_run_or_per_batch():
    net = small_net()
    batches = [torch.randn(1, 2, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    for site in ("decoder", "bottleneck"):
        with bottleneck_dropout(net, p=0.2, seed=9, site=site, draw="run") as state, torch.no_grad():
            for b in batches:
                net(b)
        assert len(state["draws"]) == 1 and torch.equal(state["channels"], dropout_channels(NBASE[-1], 0.2, seed=9))
        with bottleneck_dropout(net, p=0.2, seed=9, site=site, draw="batch") as state, torch.no_grad():
            outs = [net(b)[0] for b in batches]
        draws = state["draws"]
        assert len(draws) == 4 and len({tuple(d.tolist()) for d in draws}) > 1  # redrawn every forward pass
        assert torch.equal(draws[0], dropout_channels(NBASE[-1], 0.2, seed=9))  # the stream starts at the run's seed
        assert all(len(d) == math.ceil(0.2 * NBASE[-1]) for d in draws)
        ref = reference_forward if site == "decoder" else (lambda *a: reference_forward_every_consumer(*a)[0])
        for b, d, o in zip(batches, draws, outs):
            torch.testing.assert_close(o, ref(net, b, d, 0.2), rtol=1e-5, atol=1e-5)
    # a ChannelDropout kept across with-blocks (one block per batch) continues its stream
    dropout = ChannelDropout(0.2, seed=9, draw="batch")
    for b in batches:
        with bottleneck_dropout(net, site="bottleneck", dropout=dropout), torch.no_grad():
            net(b)
    assert [d.tolist() for d in dropout.draws] == [d.tolist() for d in draws]
    fixed = ChannelDropout(0.2, seed=9, draw="run")
    for b in batches:
        with bottleneck_dropout(net, dropout=fixed), torch.no_grad():
            net(b)
    assert len(fixed.draws) == 1


def test_dropout_rejects_unknown_site_and_draw():
    with pytest.raises(ValueError, match="site"):
        with bottleneck_dropout(small_net(), site="encoder"):
            pass
    with pytest.raises(ValueError, match="draw"):
        with bottleneck_dropout(small_net(), draw="image"):
            pass
    with pytest.raises(ValueError, match="draw"):
        ChannelDropout(0.2, draw="image")


# ---------------------------------------------------------------- input perturbations

IMAGE = np.linspace(-0.2, 1.3, 48, dtype=np.float32).reshape(6, 8)


def test_input_perturbation_formulas():
    s = 0.25
    np.testing.assert_allclose(perturb_image(IMAGE, "brightness", s), IMAGE + s, rtol=1e-6)
    np.testing.assert_allclose(perturb_image(IMAGE, "gamma", s),
                               np.sign(IMAGE) * np.abs(IMAGE.astype(float)) ** 1.25, rtol=1e-5)
    m = IMAGE.astype(float).mean()
    np.testing.assert_allclose(perturb_image(IMAGE, "contrast", s), m + 1.25 * (IMAGE - m), rtol=1e-5, atol=1e-6)
    noisy = perturb_image(IMAGE, "noise", s, seed=5)
    np.testing.assert_array_equal(noisy, perturb_image(IMAGE, "noise", s, seed=5))
    assert not np.array_equal(noisy, perturb_image(IMAGE, "noise", s, seed=6))
    big = np.zeros((256, 256), np.float32)
    assert perturb_image(big, "noise", 0.06, seed=0).std() == pytest.approx(0.06, rel=0.02)


@pytest.mark.parametrize("kind", ["gamma", "brightness", "contrast", "noise"])
def test_input_perturbation_zero_strength_is_identity_and_input_untouched(kind):
    before = IMAGE.copy()
    np.testing.assert_allclose(perturb_image(IMAGE, kind, 0.0), IMAGE, rtol=1e-6, atol=1e-7)
    assert perturb_image(IMAGE, kind).dtype == np.float32
    np.testing.assert_array_equal(IMAGE, before)
    assert kind in DEFAULT_STRENGTH


def test_input_perturbation_rejects_bad_arguments():
    with pytest.raises(ValueError, match="one of"):
        perturb_image(IMAGE, "blur", 0.1)
    with pytest.raises(ValueError, match="dropout"):  # dropout is not an input perturbation
        perturb_image(IMAGE, "dropout", 0.1)
    with pytest.raises(ValueError, match=">= 0"):
        perturb_image(IMAGE, "noise", -0.1)
    with pytest.raises(ValueError, match="> -1"):
        perturb_image(IMAGE, "gamma", -1.0)
    with pytest.raises(ValueError, match="finite"):
        perturb_image(IMAGE, "brightness", float("nan"))
