"""Reconstruction modes: shapes, determinism, DDIM bookkeeping, closeness at small t."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from cdad_dist.config import EvalConfig
from cdad_dist.errors import CdadError
from cdad_dist.eval.anomaly_map import AnomalyMapConfig, extractor_from_config
from cdad_dist.eval.reconstruct import (ReconstructionConfig, ddim_step, ddim_timesteps, reconstruct,
                                        reconstruct_latent)
from cdad_dist.eval.scoring import score_batch
from cdad_dist.models.presets import ModelConfig, build_model


@pytest.fixture(scope="module")
def model():
    m = build_model(ModelConfig(preset="tiny"))
    return m.eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


MODES = [ReconstructionConfig(mode="ddim", steps=3), ReconstructionConfig(mode="one_step"),
         ReconstructionConfig(mode="fused")]


@pytest.mark.parametrize("cfg", MODES, ids=lambda c: c.mode)
def test_shapes_range_and_determinism(model, images, cfg):
    a = reconstruct(model, images, cfg, generator=torch.Generator().manual_seed(1))
    b = reconstruct(model, images, cfg, generator=torch.Generator().manual_seed(1))
    c = reconstruct(model, images, cfg, generator=torch.Generator().manual_seed(2))
    assert a.shape == images.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(reconstruct(model, images, cfg), reconstruct(model, images, cfg))  # cfg.seed


def test_first_stage_roundtrip_is_identity_for_space_to_depth(model, images):
    torch.testing.assert_close(model.decode(model.encode(images)), images)


def test_timesteps_start_exactly_at_start_t():
    assert ddim_timesteps(999, 10) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    ts = ddim_timesteps(260, 7)
    assert ts[0] == 260 and len(ts) == 7 and all(a > b >= 0 for a, b in zip(ts, ts[1:]))
    assert ddim_timesteps(4, 5) == [4, 3, 2, 1, 0]


def test_ddim_step_matches_diffusers_for_uniform_trailing_schedule(model):
    ref = DDIMScheduler.from_config(model.ddim_scheduler.config)
    ref.set_timesteps(10)
    assert ref.timesteps.tolist() == ddim_timesteps(999, 10)
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ts = ddim_timesteps(999, 10)
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        torch.testing.assert_close(ddim_step(model.ddim_scheduler, eps, t, prev, z),
                                   ref.step(eps, t, z, eta=0.0).prev_sample)


def test_condition_computed_once_per_image(model, images):
    calls = {"amn": 0, "unet": 0}
    h1 = model.amn.register_forward_hook(lambda *a: calls.__setitem__("amn", calls["amn"] + 1))
    h2 = model.unet.register_forward_hook(lambda *a: calls.__setitem__("unet", calls["unet"] + 1))
    try:
        reconstruct(model, images, ReconstructionConfig(mode="ddim", steps=4))
        assert calls == {"amn": 1, "unet": 4}
        calls.update(amn=0, unet=0)
        reconstruct(model, images, ReconstructionConfig(mode="fused"))
        assert calls == {"amn": 1, "unet": 1}  # both scales in ONE batched U-Net call
    finally:
        h1.remove()
        h2.remove()


def test_score_batch_encodes_once_and_times_its_spans(model, images, monkeypatch):
    """E(x) serves both the reconstruction and the reference D(E(x)); the AMN runs once; two decodes."""
    calls = {"encode": 0, "decode": 0, "amn": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(model, "encode", counting("encode", model.encode))
    monkeypatch.setattr(model, "decode", counting("decode", model.decode))
    hook = model.amn.register_forward_hook(lambda *a: calls.__setitem__("amn", calls["amn"] + 1))
    cfg = EvalConfig(reconstruction=ReconstructionConfig(mode="ddim", steps=3),
                     anomaly_map=AnomalyMapConfig(sigma=1.0))
    try:
        scored = score_batch(model, extractor_from_config(cfg.anomaly_map), images, cfg)
    finally:
        hook.remove()
    assert calls == {"encode": 1, "decode": 2, "amn": 1}
    assert 0 < scored.denoise_s < scored.recon_s and scored.map_s > 0
    # The same reconstruction as the stand-alone function with the same noise.
    torch.testing.assert_close(scored.x_hat, reconstruct(model, images, cfg.reconstruction))


class OracleEps:
    """Stands in for ``predict_eps``: the exact noise of z_t relative to the known clean latent z."""

    def __init__(self, model, z):
        self.model, self.z, self.seen_t = model, z, []

    def __call__(self, z_t, t, c):
        a = self.model.ddim_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        zz = torch.cat([self.z] * (z_t.shape[0] // self.z.shape[0]))
        self.seen_t.append(t.tolist())
        return (z_t - a.sqrt() * zz) / (1 - a).sqrt()


@pytest.mark.parametrize("start_t,steps", [(999, 10), (500, 7), (40, 3)])
def test_ddim_with_exact_eps_lands_on_the_clean_latent(model, images, start_t, steps, monkeypatch):
    z = model.encode(images)
    oracle = OracleEps(model, z)
    monkeypatch.setattr(model, "predict_eps", oracle)
    cfg = ReconstructionConfig(mode="ddim", start_t=start_t, steps=steps)
    out = reconstruct_latent(model, z, None, cfg, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
    a0 = model.ddim_scheduler.final_alpha_cumprod  # set_alpha_to_one=False: the last step lands on ᾱ_0
    torch.testing.assert_close(out, a0.sqrt() * z + (1 - a0).sqrt() * noise, atol=2e-4, rtol=1e-4)
    assert [t[0] for t in oracle.seen_t] == ddim_timesteps(start_t, steps)


@pytest.mark.parametrize("cfg", MODES[1:], ids=lambda c: c.mode)
def test_one_step_and_fused_with_exact_eps_give_the_clean_latent(model, images, cfg, monkeypatch):
    z = model.encode(images)
    monkeypatch.setattr(model, "predict_eps", OracleEps(model, z))
    out = reconstruct_latent(model, z, None, cfg, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, z, atol=2e-4, rtol=1e-4)


def test_fused_guidance_formula(model, images, monkeypatch):
    """With a constant ε̂ the fused x̂0 has a closed form; checks w and the t_s/t_b bookkeeping."""
    z = model.encode(images)
    const = torch.randn(z.shape, generator=torch.Generator().manual_seed(9))
    monkeypatch.setattr(model, "predict_eps", lambda z_t, t, c: torch.cat([const] * (z_t.shape[0] // 2)))
    cfg = ReconstructionConfig(mode="fused", t_s=200, t_b=600, w=0.5)
    out = reconstruct_latent(model, z, None, cfg, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    n_s, n_b = torch.randn(z.shape, generator=g), torch.randn(z.shape, generator=g)
    ac = model.ddim_scheduler.alphas_cumprod
    a_s, a_b = ac[200], ac[600]
    z_s, z_b = a_s.sqrt() * z + (1 - a_s).sqrt() * n_s, a_b.sqrt() * z + (1 - a_b).sqrt() * n_b
    x0_b = (z_b - (1 - a_b).sqrt() * const) / a_b.sqrt()
    eps_g = const - 0.5 * (1 - a_s).sqrt() * (a_s.sqrt() * x0_b + (1 - a_s).sqrt() * const - z_s)
    torch.testing.assert_close(out, (z_s - (1 - a_s).sqrt() * eps_g) / a_s.sqrt(), atol=1e-4, rtol=1e-4)


def test_small_t_reconstructs_the_input_closely(model, images):
    err = lambda cfg: (reconstruct(model, images, cfg) - images).abs().mean().item()  # noqa: E731
    ddim_small = err(ReconstructionConfig(mode="ddim", start_t=5, steps=2))
    one_small = err(ReconstructionConfig(mode="one_step", one_step_t=3))
    ddim_full = err(ReconstructionConfig(mode="ddim", start_t=999, steps=2))
    assert ddim_small < 0.05 and one_small < 0.05, (ddim_small, one_small)
    assert ddim_full > 4 * ddim_small


def test_config_errors(model, images):
    with pytest.raises(CdadError, match="eval.reconstruction.mode"):  # a bad mode fails when the config is built
        ReconstructionConfig(mode="dpm")
    for cfg in (ReconstructionConfig(start_t=1000),
                ReconstructionConfig(start_t=3, steps=5), ReconstructionConfig(mode="fused", t_b=-1)):
        with pytest.raises(CdadError, match="reconstruction"):
            reconstruct(model, images, cfg)


def test_runs_under_inference_mode(model, images, monkeypatch):
    seen = []
    orig = model.predict_eps

    def spy(z_t, t, c):
        seen.append(torch.is_inference_mode_enabled())
        return orig(z_t, t, c)

    monkeypatch.setattr(model, "predict_eps", spy)
    reconstruct(model, images, ReconstructionConfig(mode="one_step"))
    assert seen == [True]


# -- per-image noise: an image's score does not depend on its batch ---------------------------------------------
@pytest.mark.parametrize("cfg", MODES, ids=lambda c: c.mode)
def test_an_images_score_is_the_same_alone_in_a_batch_and_in_any_order(model, cfg):
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    eval_cfg = EvalConfig(reconstruction=cfg, anomaly_map=AnomalyMapConfig(sigma=1.0))
    extractor = extractor_from_config(eval_cfg.anomaly_map)
    together = score_batch(model, extractor, images, eval_cfg).scores
    backwards = score_batch(model, extractor, images.flip(0), eval_cfg).scores.flip(0)
    alone = torch.cat([score_batch(model, extractor, images[i:i + 1], eval_cfg).scores for i in range(5)])
    torch.testing.assert_close(backwards, together, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-7)
    # the round-1 scheme, one generator per batch, fails this: the check can tell the two apart
    batch_seeded = score_batch(model, extractor, images.flip(0), eval_cfg, torch.Generator().manual_seed(0))
    assert not torch.allclose(batch_seeded.scores.flip(0), together, rtol=1e-3)


def test_per_image_noise_is_keyed_by_pixels_and_seed():
    from cdad_dist.eval.reconstruct import _noise, image_generators
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    z = torch.zeros(3, 4, 2, 2)
    a = _noise(z, image_generators(0, images))
    b = _noise(z[:2], image_generators(0, images[[2, 0]]))
    assert torch.equal(b, a[[2, 0]])  # image 2's noise is its own, wherever it sits
    assert not torch.equal(_noise(z, image_generators(1, images)), a)  # the seed matters
    nudged = images.clone()
    nudged[1, 0, 0, 0] += 1e-3
    c = _noise(z, image_generators(0, nudged))
    assert torch.equal(c[[0, 2]], a[[0, 2]]) and not torch.equal(c[1], a[1])
    with pytest.raises(ValueError, match="2 noise generators for a batch of 3"):
        _noise(z, image_generators(0, images[:2]))


# -- several reconstructions per image: the mean of their maps --------------------------------------------------
def test_samples_average_the_maps_of_successive_draws_per_image(model):
    """reconstruction.samples=K: the map is the mean of K maps, draw k being the k-th noise of the image's own
    generator. Adversarial inputs: a reversed batch (each image's K draws must stay its own) and K=1 (must be
    exactly the single-draw result, not a re-seeded one)."""
    from cdad_dist.eval.anomaly_map import anomaly_maps
    from cdad_dist.eval.reconstruct import image_generators, reconstruct_latent

    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    rec = ReconstructionConfig(mode="one_step", one_step_t=200)
    cfg = EvalConfig(reconstruction=rec, anomaly_map=AnomalyMapConfig(sigma=1.0))
    extractor = extractor_from_config(cfg.anomaly_map)
    one = score_batch(model, extractor, images, cfg)
    three_cfg = EvalConfig(reconstruction=ReconstructionConfig(mode="one_step", one_step_t=200, samples=3),
                           anomaly_map=cfg.anomaly_map)
    three = score_batch(model, extractor, images, three_cfg)
    # the first draw is the single draw: same x̂ (shown, PSNR, head input)
    torch.testing.assert_close(three.x_hat, one.x_hat)
    # reference: three successive draws from each image's generator, three maps, their mean
    gens = image_generators(rec.seed, images)
    with torch.inference_mode():
        z, c = model.encode(images), model.condition(images)
        x_ref = model.decode(z).float()
        maps = [anomaly_maps(extractor, x_ref, model.decode(reconstruct_latent(model, z, c, rec, gens)).float(),
                             cfg.anomaly_map)[0] for _ in range(3)]
    torch.testing.assert_close(three.maps, sum(maps) / 3, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(maps[1], maps[0], rtol=1e-3)  # the draws really differ
    # an image's K draws are its own, whatever its place in the batch
    backwards = score_batch(model, extractor, images.flip(0), three_cfg)
    torch.testing.assert_close(backwards.scores.flip(0), three.scores, rtol=1e-5, atol=1e-7)


def test_samples_must_be_a_positive_int():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(Exception, match="samples"):
            ReconstructionConfig(samples=bad)
