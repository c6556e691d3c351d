"""CDADModel, presets and first stages."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from cdad_dist.errors import CdadError
from cdad_dist.models.cdad_model import CDADModel
from cdad_dist.models.first_stage import SpaceToDepthFirstStage, VAEFirstStage
from cdad_dist.models.presets import (ModelConfig, build_model, count_parameters, resolve_config, unet_kwargs,
                                      vae_kwargs)


@pytest.fixture(scope="module")
def tiny() -> CDADModel:
    return build_model(ModelConfig(preset="tiny"))


def batch(n: int = 4, size: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    xp = x.clone()
    xp[:, :, 8:24, 20:40] = torch.rand(n, 3, 1, 1, generator=g)
    return x, xp


def test_tiny_preset_shapes_and_size(tiny):
    n = count_parameters(tiny)
    assert 2_000_000 < n < 8_000_000, n
    x, _ = batch(2)
    z = tiny.encode(x)
    assert z.shape == (2, 48, 16, 16)
    c = tiny.condition(x)
    assert c.shape == (2, 64, 16, 16)
    eps = tiny.predict_eps(z, torch.tensor([10, 500]), c)
    assert eps.shape == z.shape
    assert tiny.context.shape == (1, 8, 64)


def test_build_is_seeded():
    a = build_model(ModelConfig(amn_depth=1))
    b = build_model(ModelConfig(amn_depth=1))
    c = build_model(ModelConfig(amn_depth=1, init_seed=1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["unet.conv_in.weight"], sc["unet.conv_in.weight"])
    assert torch.equal(sa["context"], sb["context"])


def test_space_to_depth_is_lossless_and_frozen():
    fs = SpaceToDepthFirstStage(4)
    x, _ = batch(2)
    z = fs.encode(x)
    assert z.shape == (2, 48, 16, 16) and z.min() >= -1 and z.max() <= 1
    torch.testing.assert_close(fs.decode(z), x)
    with pytest.raises(CdadError, match="divisible"):
        fs.encode(torch.rand(1, 3, 30, 30))


def test_vae_first_stage_uses_scaled_posterior_mode():
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, scaling_factor=0.5)
    fs = VAEFirstStage(vae)
    assert fs.factor == 2 and fs.latent_channels == 4
    assert not any(p.requires_grad for p in fs.parameters())
    x = torch.rand(2, 3, 16, 16)
    z = fs.encode(x)
    ref = vae.encode(x * 2 - 1).latent_dist.mode() * 0.5
    torch.testing.assert_close(z, ref)
    torch.testing.assert_close(fs.encode(x), z)  # mode, not a sample: deterministic
    out = fs.decode(z)
    torch.testing.assert_close(out, ((vae.decode(z / 0.5).sample + 1) / 2).clamp(0, 1))
    fs.set_dtype(torch.bfloat16)
    assert next(fs.vae.parameters()).dtype == torch.bfloat16
    assert fs.encode(x).dtype == torch.float32


def test_first_stage_stays_frozen_and_in_eval(tiny):
    tiny.train()
    assert not tiny.first_stage.training
    names = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert all(n.startswith(("unet.", "amn.")) for n in names)
    assert len(tiny.trainable_parameters()) == len(names)


def test_injection_changes_output_and_zero_condition_is_plain_unet(tiny):
    x, _ = batch(2)
    z = tiny.encode(x)
    t = torch.tensor([100, 700])
    ctx = tiny.context.expand(2, -1, -1)
    with torch.no_grad():
        plain = tiny.unet(z, t, encoder_hidden_states=ctx).sample
        zero = tiny.predict_eps(z, t, torch.zeros(2, 64, 16, 16))
        none = tiny.predict_eps(z, t, None)
        cond = tiny.predict_eps(z, t, tiny.condition(x))
        after = tiny.unet(z, t, encoder_hidden_states=ctx).sample  # the condition does not leak into later calls
    torch.testing.assert_close(zero, plain)
    torch.testing.assert_close(none, plain)
    torch.testing.assert_close(after, plain)
    assert (cond - plain).abs().mean() > 1e-3


def test_injection_adds_to_conv_in_output(tiny):
    x, _ = batch(1)
    z, c = tiny.encode(x), tiny.condition(x)
    seen = {}

    def grab(module, args, kwargs):
        seen["in"] = args[0] if args else kwargs["hidden_states"]

    hk = tiny.unet.down_blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        tiny.predict_eps(z, torch.tensor([5]), c)
    hk.remove()
    torch.testing.assert_close(seen["in"], tiny.unet.conv_in(z) + c)


def test_bad_condition_shape_is_an_error(tiny):
    z = tiny.encode(batch(1)[0])
    with pytest.raises(CdadError, match="conv_in"):
        tiny.predict_eps(z, 3, torch.zeros(1, 32, 16, 16))


def test_deepcopy_gets_its_own_injector(tiny):
    twin = copy.deepcopy(tiny)
    x, _ = batch(1)
    z, c = tiny.encode(x), tiny.condition(x)
    with torch.no_grad():
        torch.testing.assert_close(twin.predict_eps(z, 7, c), tiny.predict_eps(z, 7, c))
        twin.unet.conv_in.weight.add_(1.0)
        assert not torch.allclose(twin.predict_eps(z, 7, c), tiny.predict_eps(z, 7, c))


def test_amn_runs_once_per_forward():
    model = build_model(ModelConfig(amn_depth=1))
    calls = {"local": 0, "layer": 0, "conv_in": 0}
    model.amn.local.register_forward_hook(lambda *a: calls.__setitem__("local", calls["local"] + 1))
    model.amn.layers[0].register_forward_hook(lambda *a: calls.__setitem__("layer", calls["layer"] + 1))
    model.unet.conv_in.register_forward_hook(lambda *a: calls.__setitem__("conv_in", calls["conv_in"] + 1))
    x, xp = batch(2)
    out = model(x, xp, generator=torch.Generator().manual_seed(0))
    assert calls == {"local": 1, "layer": 1, "conv_in": 1}
    assert set(out) == {"loss", "eps_loss", "amn_loss"}
    torch.testing.assert_close(out["loss"].detach(), out["eps_loss"] + out["amn_loss"])


def test_forward_is_deterministic_for_a_generator(tiny):
    x, xp = batch(2)
    a = tiny(x, xp, generator=torch.Generator().manual_seed(3))["loss"]
    b = tiny(x, xp, generator=torch.Generator().manual_seed(3))["loss"]
    c = tiny(x, xp, generator=torch.Generator().manual_seed(4))["loss"]
    assert a.item() == b.item() and a.item() != c.item()


def test_amn_loss_matches_definition_and_lambda():
    model = build_model(ModelConfig(amn_depth=1, lambda_amn=0.25, amn_loss="mse"))
    x, xp = batch(2)
    out = model(x, xp, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = (model.amn(xp)[0] - model.amn.encode_local(x)).square().mean()
    torch.testing.assert_close(out["amn_loss"], ref)
    # the default, scale-free form: per-token standardised features (zero mean, unit RMS over channels)
    model.amn_loss = "normalized"
    out = model(x, xp, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        def standard(f):
            f = f / f.square().mean().sqrt()
            f = f - f.mean(1, keepdim=True)
            return f / (f.square().mean(1, keepdim=True) + 1e-5).sqrt()
        ref = (standard(model.amn(xp)[0]) - standard(model.amn.encode_local(x))).square().mean()
    torch.testing.assert_close(out["amn_loss"], ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["loss"].detach(), out["eps_loss"] + 0.25 * out["amn_loss"])


def test_amn_target_detach_changes_local_encoder_grads():
    grads = []
    for detach in (False, True):
        model = build_model(ModelConfig(amn_depth=1, amn_target_detach=detach, lambda_amn=1.0))
        x, xp = batch(2)
        out = model(x, xp, generator=torch.Generator().manual_seed(0))
        out["loss"].backward()  # same ε part in both runs; only the target branch's gradient differs
        grads.append(model.amn.local[0].weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny"))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    x, xp = batch(4)
    losses, eps = [], []
    for _ in range(20):
        out = model(x, xp, generator=torch.Generator().manual_seed(0))  # same t and noise every step
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
        eps.append(out["eps_loss"].item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert eps[-1] < 0.85 * eps[0], eps


def test_gradient_checkpointing_same_loss_and_grads():
    x, xp = batch(2)
    res = []
    for ckpt in (False, True):
        model = build_model(ModelConfig(amn_depth=1, gradient_checkpointing=ckpt))
        assert model.unet.is_gradient_checkpointing == ckpt and model.amn.gradient_checkpointing == ckpt
        out = model(x, xp, generator=torch.Generator().manual_seed(0))
        out["loss"].backward()
        res.append((out["loss"].item(), model.unet.conv_in.weight.grad.clone(), model.amn.local[0].weight.grad))
    assert res[0][0] == pytest.approx(res[1][0], rel=1e-5)
    torch.testing.assert_close(res[0][1], res[1][1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res[0][2], res[1][2], rtol=1e-4, atol=1e-6)


def test_protected_modules(tiny):
    prot = tiny.protected_modules()
    n_expected = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                     for part in (tiny.unet, tiny.amn) for m in part.modules())
    assert len(prot) == n_expected
    assert all(k.startswith(("unet.", "amn.")) for k in prot)
    for name in ("unet.conv_in", "amn.local.0", "amn.layers.0.self_attn.q_proj", "amn.layers.0.self_attn.k_proj",
                 "amn.layers.0.self_attn.v_proj", "amn.layers.0.self_attn.out_proj", "amn.layers.1.linear2",
                 "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"):
        assert name in prot, name
    assert prot["unet.conv_in"] is tiny.unet.conv_in
    assert not any(k.startswith("first_stage") for k in prot)


def test_attention_backend_switch(tiny):
    with pytest.raises(CdadError, match="xformers|attention_backend"):
        build_model(ModelConfig(amn_depth=1, attention_backend="xformers"))
    with pytest.raises(CdadError, match="attention_backend"):
        tiny.set_attention_backend("flash")
    tiny.set_attention_backend("sdpa")


def test_config_resolution_and_errors():
    cfg = resolve_config(ModelConfig(preset="sd15", block_out_channels=[320, 640, 1280, 1280]))
    assert cfg.block_out_channels == (320, 640, 1280, 1280) and cfg.first_stage == "autoencoder_kl"
    assert (cfg.amn_depth, cfg.amn_heads, cfg.amn_neighbour, cfg.image_size, cfg.first_stage_factor) == \
        (8, 8, 7, 256, 8)
    with pytest.raises(CdadError, match="preset"):
        resolve_config(ModelConfig(preset="huge"))
    with pytest.raises(CdadError, match="first_stage"):
        resolve_config(ModelConfig(first_stage="vqgan"))
    with pytest.raises(CdadError, match="divisible"):
        resolve_config(ModelConfig(image_size=66))
    with pytest.raises(CdadError, match="neighbour"):
        build_model(ModelConfig(image_size=8, amn_neighbour=7, amn_depth=1))


def test_sd15_preset_has_the_sd15_shapes():
    """Built on the meta device (no memory): SD 1.5 U-Net and KL-f8 VAE parameter counts."""
    cfg = resolve_config(ModelConfig(preset="sd15"))
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_kwargs(cfg, 4))
        vae = AutoencoderKL(**vae_kwargs(cfg))
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert vae.config.scaling_factor == 0.18215 and unet.config.cross_attention_dim == 768


def test_small_sd15_style_model_with_random_vae():
    cfg = ModelConfig(preset="sd15", image_size=32, block_out_channels=(32, 64), layers_per_block=1,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, context_tokens=5,
                      amn_depth=1, amn_heads=2, amn_neighbour=1, vae_block_out_channels=(32, 32, 32, 32),
                      vae_layers_per_block=1)
    model = build_model(cfg)
    assert model.first_stage.factor == 8 and model.amn.cfg.factor == 8
    x, xp = batch(2, size=32)
    assert model.condition(x).shape == (2, 32, 4, 4)
    out = model(x, xp, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])


def test_schedulers_follow_sd15(tiny):
    ddpm, ddim = tiny.noise_scheduler, tiny.ddim_scheduler
    for s in (ddpm, ddim):
        assert s.config.num_train_timesteps == 1000 and s.config.beta_schedule == "scaled_linear"
        assert s.config.prediction_type == "epsilon" and not s.config.clip_sample and s.config.steps_offset == 1
        assert s.betas[0].item() == pytest.approx(0.00085) and s.betas[-1].item() == pytest.approx(0.012)
    assert not ddim.config.set_alpha_to_one
    assert ddim.final_alpha_cumprod.item() == pytest.approx(ddim.alphas_cumprod[0].item())
