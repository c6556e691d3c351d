"""Frozen first stages: image ``x ∈ [0,1]`` ↔ scaled latent ``z`` in which the diffusion runs.

Both share one interface: ``encode(x) -> z``, ``decode(z) -> x ∈ [0,1]``, ``factor`` (spatial downsampling),
``latent_channels``. They never train and never build autograd graphs.

``VAEFirstStage`` wraps diffusers' ``AutoencoderKL`` (SD 1.5 preset). Encoding uses the posterior *mode*, not a
sample: the anomaly map compares D(E(x)) with the reconstruction, and a sampled latent would add noise to both.

``SpaceToDepthFirstStage`` is "diffusion in pixel space" for the ``tiny`` CPU preset: a lossless
``pixel_unshuffle`` of the image mapped to [-1, 1]. No pretrained VAE is available offline, and a VAE trained on
the CPU would add its own reconstruction error to every anomaly map (D(E(x)) ≠ x), hiding what the denoiser does;
space-to-depth keeps D(E(x)) = x exactly while still giving the U-Net a small latent grid (64 px ÷ 4 → 16×16×48).

Latent scaling: SD's VAE latents are multiplied by ``scaling_factor`` (0.18215) so that they have unit variance,
which is what the noise schedule assumes. Pixels mapped to ``2x−1`` have no such scale: on real photos their std
is ~0.2 (mean ~−0.1), so at t=300 the noise (std 0.64) is ~4× the signal and the texture is destroyed. The
space-to-depth stage therefore carries a ``shift`` and a ``scale`` (SD3's VAE has the same pair:
``shift_factor`` / ``scaling_factor``), estimated once on the first task's training images
(``calibrate_latents``), stored as buffers (so checkpoints, ``--resume`` and ``cdad predict`` carry them) and
never changed afterwards (the first stage is frozen across tasks). Until calibrated it is the identity scaling.
"""
from __future__ import annotations

import torch
from torch import nn

from cdad_dist.errors import ConfigError


def _check_image(x: torch.Tensor, factor: int, who: str) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ConfigError(f"{who}: expected images B×3×H×W, got shape {tuple(x.shape)}")
    if x.shape[-1] % factor or x.shape[-2] % factor:
        raise ConfigError(f"{who}: image size {tuple(x.shape[-2:])} is not divisible by the factor {factor}")


class FirstStage(nn.Module):
    """Base: frozen (no grads, eval mode even when the parent trains)."""

    factor: int
    latent_channels: int

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FirstStage:  # always eval: no dropout / norm updates
        return super().train(False)


class SpaceToDepthFirstStage(FirstStage):
    """Lossless pixel (un)shuffle; latent channels = 3·factor²."""

    def __init__(self, factor: int = 4):
        super().__init__()
        if factor < 1:
            raise ConfigError(f"SpaceToDepthFirstStage: factor must be ≥ 1, got {factor}")
        self.factor = factor
        self.latent_channels = 3 * factor * factor
        # [shift, scale, calibrated]: z = (2x−1 − shift) · scale. Buffers, so they travel in every state dict.
        self.register_buffer("latent_stats", torch.tensor([0.0, 1.0, 0.0]))
        self.freeze()

    @property
    def calibrated(self) -> bool:
        return bool(self.latent_stats[2] > 0)

    @property
    def shift_scale(self) -> tuple[float, float]:
        return float(self.latent_stats[0]), float(self.latent_stats[1])

    def set_latent_stats(self, mean: float, std: float) -> None:
        """Unit variance, zero mean latents for pixels of the given mean/std (in 2x−1 units)."""
        if not (std > 0 and torch.isfinite(torch.tensor([mean, std])).all()):
            raise ConfigError(f"SpaceToDepthFirstStage: latent statistics must be finite with std > 0, got "
                              f"mean={mean}, std={std}")
        self.latent_stats.copy_(torch.tensor([mean, 1.0 / std, 1.0], dtype=torch.float32))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, self.factor, type(self).__name__)
        shift, scale = self.latent_stats[0].to(x.dtype), self.latent_stats[1].to(x.dtype)
        return nn.functional.pixel_unshuffle((x * 2 - 1 - shift) * scale, self.factor)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pixel_shuffle(z.float(), self.factor)
        x = x / self.latent_stats[1].float() + self.latent_stats[0].float()
        return ((x + 1) / 2).clamp(0, 1)


class VAEFirstStage(FirstStage):
    """diffusers ``AutoencoderKL``; latents scaled by ``vae.config.scaling_factor``; runs in ``dtype``."""

    def __init__(self, vae: nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.vae = vae
        cfg = vae.config
        self.scaling_factor = float(cfg.scaling_factor)
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = int(cfg.latent_channels)
        self.set_dtype(dtype)
        self.freeze()

    def set_dtype(self, dtype: torch.dtype) -> None:
        """Cast the frozen VAE to the compute dtype (e.g. bf16 under mixed precision)."""
        self.compute_dtype = dtype
        if next(self.vae.parameters()).dtype != dtype:  # diffusers warns on every .to(dtype), even a no-op
            self.vae.to(dtype)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, self.factor, type(self).__name__)
        posterior = self.vae.encode((x * 2 - 1).to(self.compute_dtype)).latent_dist
        return posterior.mode().float() * self.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode((z / self.scaling_factor).to(self.compute_dtype)).sample
        return ((x.float() + 1) / 2).clamp(0, 1)
