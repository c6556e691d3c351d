"""Frozen first stages: image ``x ∈ [0,1]`` ↔ scaled latent ``z`` in which the diffusion runs.

Both share one interface: ``encode(x) -> z``, ``decode(z) -> x ∈ [0,1]``, ``factor`` (spatial downsampling),
``latent_channels``. They never train and never build autograd graphs.

``VAEFirstStage`` wraps diffusers' ``AutoencoderKL`` (SD 1.5 preset). Encoding uses the posterior *mode*, not a
sample: the anomaly map compares D(E(x)) with the reconstruction, and a sampled latent would add noise to both.

``SpaceToDepthFirstStage`` is "diffusion in pixel space" for the ``tiny`` CPU preset: a lossless
``pixel_unshuffle`` of the image mapped to [-1, 1]. No pretrained VAE is available offline, and a VAE trained on
the CPU would add its own reconstruction error to every anomaly map (D(E(x)) ≠ x), hiding what the denoiser does;
space-to-depth keeps D(E(x)) = x exactly while still giving the U-Net a small latent grid (64 px ÷ 4 → 16×16×48).
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
        self.freeze()

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, self.factor, type(self).__name__)
        return nn.functional.pixel_unshuffle(x * 2 - 1, self.factor)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pixel_shuffle(z.float(), self.factor)
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
