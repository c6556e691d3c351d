"""Reconstruction x → x̂ with an AMN-conditioned latent diffusion model (no classifier-free guidance).

Modes (all: encode with the posterior mode, AMN condition of x computed ONCE per image, decode at the end):
- ``ddim`` (CDAD): noise the latent to ``start_t`` (paper: 999), then ``steps`` DDIM steps with η=0 whose first
  step really is at ``start_t`` (the authors' code treated the 999-noised latent as t=901; not copied).
- ``one_step`` (DiffusionAD): x̂0 from a single ε prediction at ``one_step_t``.
- ``fused`` (DiffusionAD's norm-guided two-scale fusion): x̂0 from the large scale ``t_b`` (normal but blurry)
  guides the ε of the small scale ``t_s``: ε̃ = ε_s − w·√(1−ᾱ_s)·(√ᾱ_s·x̂0_b + √(1−ᾱ_s)·ε_s − z_s); both U-Net calls
  run in ONE batch with independent noise.

Default t values for the DiffusionAD modes are its 200 / 400 (linear β 1e-4…0.02) mapped to SD 1.5's scaled-linear
schedule by matching ᾱ: 200 → 261, 400 → 568.

Noise is drawn per image: ``generator`` is one CPU generator per image (:func:`image_generators`, seeded by the
reconstruction seed and the image's own pixels), and image i's noise is ``randn(z.shape[1:], generator[i])``. So
an image gets the same noise, and the same score up to float rounding, alone or in any batch, in any order, on
any rank and device, in the evaluator as in ``cdad predict``. (Round 1 drew one ``randn(z.shape)`` per batch
from a (task, rank, batch)-seeded generator: an image's score changed with its batch-mates and the rank count.)
A single generator is still accepted and then draws the whole batch at once.
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cdad_dist.config_checks import check_choices
from cdad_dist.errors import ConfigError



@dataclass
class ReconstructionConfig:
    mode: str = "ddim"          # a name of _MODES: ddim, one_step, fused
    start_t: int = 999          # ddim: noise level of the first step
    steps: int = 10             # ddim: number of U-Net calls
    one_step_t: int = 261       # one_step: ≈ DiffusionAD's 200 (matched ᾱ)
    t_s: int = 261              # fused: small scale
    t_b: int = 568              # fused: large scale (≈ DiffusionAD's 400)
    w: float = 1.0              # fused: guidance weight (DiffusionAD's condition_w)
    seed: int = 0               # noise seed, combined with each image's pixels (image_generators)
    # Reconstructions per image, each from the next noise draw of the image's own generator; the anomaly map is
    # the mean of their maps (scoring.score_batch). A one-step x̂ carries the noise of its draw as texture the
    # feature distance flags; averaging K maps shrinks that part ~1/√K, while a defect, repaired in every draw,
    # stays. Costs K× the denoising, decoding and extractor's x̂ half; the AMN condition is still paid once.
    samples: int = 1

    def __post_init__(self) -> None:
        check_choices(self, "eval.reconstruction")  # the timestep ranges need T: checked where the model is known
        if self.mode not in _MODES:
            raise ConfigError(f"eval.reconstruction.mode must be one of {list(_MODES)}, got {self.mode!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ConfigError(f"eval.reconstruction.samples must be an int >= 1, got {self.samples!r}")


def _check(cfg: ReconstructionConfig, T: int) -> None:
    if cfg.mode not in MODES:
        raise ConfigError(f"reconstruction.mode: {cfg.mode!r} is not one of {MODES}")
    for name in ("start_t", "one_step_t", "t_s", "t_b"):
        v = getattr(cfg, name)
        if not 0 <= v < T:
            raise ConfigError(f"reconstruction.{name}: {v} is outside [0, {T - 1}]")
    if not 1 <= cfg.steps <= cfg.start_t + 1:
        raise ConfigError(f"reconstruction.steps: {cfg.steps} must be in [1, start_t+1={cfg.start_t + 1}]")


def ddim_timesteps(start_t: int, steps: int) -> list[int]:
    """``steps`` evenly spaced timesteps from ``start_t`` down ("trailing" spacing, so the first is exactly
    ``start_t``), e.g. (999, 10) → 999, 899, …, 99; the step after the last goes to t=-1 (ᾱ = ᾱ_0, as diffusers'
    DDIM with ``set_alpha_to_one=False``)."""
    ts = np.round(np.linspace(start_t + 1, 0, steps + 1)[:-1]).astype(np.int64) - 1
    return [int(t) for t in ts]


def _alpha_bar(scheduler, t: int) -> torch.Tensor:
    return scheduler.alphas_cumprod[t] if t >= 0 else scheduler.final_alpha_cumprod


def ddim_step(scheduler, eps: torch.Tensor, t: int, t_prev: int, z_t: torch.Tensor) -> torch.Tensor:
    """One deterministic (η=0) DDIM step t → t_prev with ``scheduler``'s ᾱ table.

    Written out because diffusers' ``DDIMScheduler.step`` derives the previous timestep as
    ``t − T // num_inference_steps``, which cannot follow a list starting at an arbitrary ``start_t``; for the
    uniform trailing list it gives the same result (tested).
    """
    a_t = _alpha_bar(scheduler, t).to(z_t.device, torch.float32)
    a_prev = _alpha_bar(scheduler, t_prev).to(z_t.device, torch.float32)
    eps = eps.float()
    x0 = (z_t.float() - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).to(z_t.dtype)


def x0_from_eps(scheduler, z_t: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    a = _alpha_bar(scheduler, t).to(z_t.device, torch.float32)
    return ((z_t.float() - (1 - a).sqrt() * eps.float()) / a.sqrt()).to(z_t.dtype)


Noise = torch.Generator | Sequence[torch.Generator]
"""One generator per image of the batch (:func:`image_generators`), or one for the whole batch."""


def image_generators(seed: int, images: torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per image, seeded by ``seed`` and a CRC-32 of the image's float32 pixels.

    Keyed by content, not by position or name, so an image's noise does not depend on its batch, its rank or
    on which tool scores it (the evaluator and ``cdad predict`` see the same pixels for the same file).
    """
    if images.device.type == "meta":  # shape-only traces (`cdad plan`): there are no pixels to key on
        return [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(images.shape[0])]
    pixels = images.detach().to("cpu", torch.float32).contiguous()
    return [torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(img.numpy().tobytes())) % 2**63)
            for img in pixels]


def _noise(z: torch.Tensor, generator: Noise) -> torch.Tensor:
    if isinstance(generator, torch.Generator):
        return torch.randn(z.shape, generator=generator, device=generator.device, dtype=torch.float32).to(z)
    return per_image_randn(z, generator)


def per_image_randn(z: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Standard normal noise shaped like ``z``, image i's drawn from ``generators[i]`` (CPU, float32), as ``z``."""
    if len(generators) != z.shape[0]:
        raise ValueError(f"{len(generators)} noise generators for a batch of {z.shape[0]} latents")
    return torch.stack([torch.randn(z.shape[1:], generator=g, dtype=torch.float32) for g in generators]).to(z)


def _q_sample(scheduler, z: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
    a = _alpha_bar(scheduler, t).to(z.device, torch.float32)
    return (a.sqrt() * z.float() + (1 - a).sqrt() * noise.float()).to(z.dtype)


def _timesteps(t: int, b: int, device) -> torch.Tensor:
    return torch.full((b,), t, device=device, dtype=torch.long)


def _ddim(model, z, c, cfg, generator):
    sched = model.ddim_scheduler
    ts = ddim_timesteps(cfg.start_t, cfg.steps)
    z_t = _q_sample(sched, z, _noise(z, generator), ts[0])
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        eps = model.predict_eps(z_t, _timesteps(t, z.shape[0], z.device), c)
        z_t = ddim_step(sched, eps, t, t_prev, z_t)
    return z_t


def _one_step(model, z, c, cfg, generator):
    sched, t = model.ddim_scheduler, cfg.one_step_t
    z_t = _q_sample(sched, z, _noise(z, generator), t)
    return x0_from_eps(sched, z_t, model.predict_eps(z_t, _timesteps(t, z.shape[0], z.device), c), t)


def _fused(model, z, c, cfg, generator):
    sched, b = model.ddim_scheduler, z.shape[0]
    z_s = _q_sample(sched, z, _noise(z, generator), cfg.t_s)
    z_b = _q_sample(sched, z, _noise(z, generator), cfg.t_b)
    t = torch.cat([_timesteps(cfg.t_s, b, z.device), _timesteps(cfg.t_b, b, z.device)])
    eps = model.predict_eps(torch.cat([z_s, z_b]), t, None if c is None else torch.cat([c, c]))
    eps_s, eps_b = eps[:b].float(), eps[b:].float()
    a_s = _alpha_bar(sched, cfg.t_s).to(z.device, torch.float32)
    x0_b = x0_from_eps(sched, z_b, eps_b, cfg.t_b).float()
    z_s_from_b = a_s.sqrt() * x0_b + (1 - a_s).sqrt() * eps_s
    eps_guided = eps_s - cfg.w * (1 - a_s).sqrt() * (z_s_from_b - z_s.float())
    return x0_from_eps(sched, z_s, eps_guided, cfg.t_s)


_MODES = {"ddim": _ddim, "one_step": _one_step, "fused": _fused}  # the reconstruction-mode registry
MODES = tuple(_MODES)


def reconstruct_latent(model, z: torch.Tensor, c: torch.Tensor, cfg: ReconstructionConfig | None = None,
                       generator: Noise | None = None) -> torch.Tensor:
    """The reconstructed latent from the clean latent ``z`` and the AMN condition ``c`` (already computed)."""
    cfg = cfg or ReconstructionConfig()
    _check(cfg, model.ddim_scheduler.config.num_train_timesteps)
    generator = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
    with torch.inference_mode():
        return _MODES[cfg.mode](model, z, c, cfg, generator)


def reconstruct(model, x: torch.Tensor, cfg: ReconstructionConfig | None = None,
                generator: Noise | None = None) -> torch.Tensor:
    """x̂ ∈ [0,1] for images ``x`` (B×3×H×W in [0,1])."""
    with torch.inference_mode():
        z = model.encode(x)
        c = model.condition(x)
        if generator is None:
            generator = image_generators((cfg or ReconstructionConfig()).seed, x)
        return model.decode(reconstruct_latent(model, z, c, cfg, generator))
