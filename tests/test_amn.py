"""AMN: shapes, strides, neighbour mask, positional embedding, attention backends."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cdad_dist.errors import CdadError
from cdad_dist.models.amn import AMN, AMNConfig, local_strides, neighbour_mask, sine_position_embedding


def small_amn(**kw) -> AMN:
    torch.manual_seed(0)
    cfg = dict(channels=32, factor=4, depth=2, heads=4, neighbour=3, local_channels=(8, 8, 8, 8, 16, 16, 16))
    cfg.update(kw)
    return AMN(AMNConfig(**cfg))


@pytest.mark.parametrize("factor,strides", [(8, (1, 1, 2, 1, 2, 1, 2, 1)), (4, (1, 1, 2, 1, 2, 1, 1, 1)),
                                            (2, (1, 1, 2, 1, 1, 1, 1, 1)), (1, (1,) * 8)])
def test_local_strides_follow_factor(factor, strides):
    assert local_strides(factor) == strides


def test_bad_factor_is_an_error():
    with pytest.raises(CdadError, match="factor"):
        local_strides(3)


@pytest.mark.parametrize("factor,size", [(4, 32), (8, 64), (1, 8)])
def test_shapes(factor, size):
    amn = small_amn(factor=factor)
    x = torch.rand(2, 3, size, size + factor * 2)  # non-square on purpose
    c, c_local = amn(x)
    h, w = size // factor, (size + factor * 2) // factor
    assert c.shape == c_local.shape == (2, 32, h, w)
    assert torch.isfinite(c).all()


def test_local_encoder_layout():
    amn = AMN(AMNConfig(channels=320, factor=8))
    convs = [m for m in amn.local if isinstance(m, torch.nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [
        (3, 16), (16, 16), (16, 32), (32, 32), (32, 96), (96, 96), (96, 256), (256, 320)]
    assert all(m.bias is None and m.kernel_size == (3, 3) for m in convs)
    assert sum(isinstance(m, torch.nn.SiLU) for m in amn.local) == 7
    assert isinstance(amn.local[-1], torch.nn.Conv2d)  # no activation after the last conv
    layer = amn.layers[0]
    assert layer.linear1.out_features == 4 * 320 and len(amn.layers) == 8


def test_local_encoder_normalises_with_imagenet_stats():
    amn = small_amn()
    x = torch.rand(1, 3, 16, 16)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(amn.encode_local(x), amn.local((x - mean) / std))


def _loop_mask(h: int, w: int, k: int) -> torch.Tensor:
    """Independent reference: a plain double loop over tokens."""
    allowed = torch.ones(h * w, h * w, dtype=torch.bool)
    r = k // 2
    for i in range(h * w):
        yi, xi = divmod(i, w)
        for j in range(h * w):
            yj, xj = divmod(j, w)
            if abs(yi - yj) <= r and abs(xi - xj) <= r:
                allowed[i, j] = False
    return allowed


@pytest.mark.parametrize("h,w,k", [(6, 6, 3), (5, 8, 3), (9, 7, 5), (4, 4, 1)])
def test_neighbour_mask_matches_reference(h, w, k):
    m = neighbour_mask(h, w, k)
    assert torch.equal(m, _loop_mask(h, w, k))
    assert not m.diagonal().any()  # a token never attends to itself


def test_neighbour_mask_too_large_is_an_error():
    with pytest.raises(CdadError, match="neighbour"):
        neighbour_mask(3, 3, 7)


def test_mask_cached_per_size_and_rebuilt_for_new_grid():
    amn = small_amn()
    a = amn.mask(4, 4, torch.device("cpu"))
    assert amn.mask(4, 4, torch.device("cpu")) is a
    b = amn.mask(5, 6, torch.device("cpu"))
    assert b.shape == (30, 30)


def test_mask_built_in_inference_mode_is_usable_for_training():
    amn = small_amn()
    with torch.inference_mode():
        amn(torch.rand(1, 3, 32, 32))
    c, _ = amn(torch.rand(1, 3, 32, 32))
    c.sum().backward()  # fails if the cached mask were an inference tensor


def test_attention_matches_manual_masked_softmax():
    torch.manual_seed(0)
    amn = small_amn(depth=1)
    attn = amn.layers[0].self_attn
    h = w = 6
    src, pos = torch.randn(2, h * w, 32), torch.randn(1, h * w, 32)
    allowed = amn.mask(h, w, src.device)
    out = attn(src, pos, allowed)
    q, k, v = attn.q_proj(src + pos), attn.k_proj(src + pos), attn.v_proj(src)
    split = lambda t: t.view(2, h * w, 4, 8).transpose(1, 2)  # noqa: E731
    logits = split(q) @ split(k).transpose(-1, -2) / math.sqrt(8)
    ref_mask = _loop_mask(h, w, 3)
    probs = logits.masked_fill(~ref_mask, float("-inf")).softmax(-1)
    assert (probs[..., ~ref_mask] == 0).all()
    ref = attn.out_proj((probs @ split(v)).transpose(1, 2).reshape(2, h * w, 32))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_gradient_reaches_exactly_the_tokens_outside_the_window():
    """Output token i of the non-local encoder depends on token j≠i iff j is outside i's k×k window."""
    amn = small_amn(depth=1, neighbour=3)
    h = w = 5
    c_local = torch.randn(1, 32, h, w, requires_grad=True)
    out = amn.encode_nonlocal(c_local)
    i_y, i_x = 2, 1
    # A fixed random projection of the output token: its plain channel sum would be identically zero through the
    # final LayerNorm (weight 1, bias 0 at init), so every gradient would be zero up to rounding noise.
    probe = torch.randn(out.shape[1], generator=torch.Generator().manual_seed(1))
    (out[0, :, i_y, i_x] * probe).sum().backward()
    g = c_local.grad[0].abs().sum(0)  # h×w
    own = float(g[i_y, i_x])
    assert own > 1e-3  # the probe is not degenerate: the token's own input moves it
    for y in range(h):
        for x in range(w):
            if (y, x) == (i_y, i_x):
                continue  # own token: reaches the output via the residual and its query, not as a key/value
            inside = abs(y - i_y) <= 1 and abs(x - i_x) <= 1
            # Outside tokens must matter well above rounding noise (1e-4 of the own token's gradient).
            assert (g[y, x] == 0) if inside else (g[y, x] > 1e-4 * own), (y, x, float(g[y, x]), own)


def test_positional_embedding_matches_detr_layout():
    pe = sine_position_embedding(3, 4, 8)
    assert pe.shape == (12, 8)
    scale = 2 * math.pi
    y = torch.arange(1, 4) / (3 + 1e-6) * scale
    x = torch.arange(1, 5) / (4 + 1e-6) * scale
    dim_t = torch.tensor([1.0, 1.0, 100.0, 100.0])  # 10000 ** (2*(i//2)/4)
    ey = torch.stack([(y / dim_t[0]).sin(), (y / dim_t[1]).cos(), (y / dim_t[2]).sin(), (y / dim_t[3]).cos()], 1)
    ex = torch.stack([(x / dim_t[0]).sin(), (x / dim_t[1]).cos(), (x / dim_t[2]).sin(), (x / dim_t[3]).cos()], 1)
    ref = torch.cat([ey[:, None].expand(3, 4, 4), ex[None].expand(3, 4, 4)], -1).reshape(12, 8)
    torch.testing.assert_close(pe, ref)


def test_position_goes_to_queries_and_keys_not_values():
    amn = small_amn(depth=1)
    attn = amn.layers[0].self_attn
    seen = {}
    hooks = [getattr(attn, n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0]))
             for n in ("q_proj", "k_proj", "v_proj")]
    src, pos = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    attn(src, pos, amn.mask(4, 4, src.device))
    for hk in hooks:
        hk.remove()
    torch.testing.assert_close(seen["q_proj"], src + pos)
    torch.testing.assert_close(seen["k_proj"], src + pos)
    torch.testing.assert_close(seen["v_proj"], src)


def test_post_norm_layer():
    amn = small_amn(depth=1)
    layer = amn.layers[0]
    src, pos = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    allowed = amn.mask(4, 4, src.device)
    h = layer.norm1(src + layer.self_attn(src, pos, allowed))
    ref = layer.norm2(h + layer.linear2(F.relu(layer.linear1(h))))
    torch.testing.assert_close(layer(src, pos, allowed), ref)


def test_gradient_checkpointing_gives_same_grads():
    amn = small_amn()
    amn.train()
    x = torch.rand(2, 3, 32, 32)
    amn(x)[0].square().sum().backward()
    ref = [p.grad.clone() for p in amn.parameters()]
    amn.zero_grad()
    amn.gradient_checkpointing = True
    amn(x)[0].square().sum().backward()
    for a, p in zip(ref, amn.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_xformers_backend_errors_clearly_without_xformers_or_cuda():
    amn = small_amn()
    amn.set_attention_backend("xformers")
    with pytest.raises(CdadError, match="xformers"):
        amn(torch.rand(1, 3, 32, 32))
    with pytest.raises(CdadError, match="attention_backend"):
        amn.set_attention_backend("flash")
