"""DiffusionAD's segmentation sub-network as an optional head of the CDAD model.

The head looks at an input and its anomaly-free reconstruction — ``[x, x̂]`` (6 channels, pixel space) or
``[z, ẑ]`` (latents: at SD scale a 4×32×32 input instead of 6×256×256) — and predicts the anomaly mask, trained on
synthetic anomalies with DiffusionAD's loss (5·binary focal(α=0.5, γ=4) + smooth-L1 of the sigmoid). x̂ is always
computed without gradient, so the head never changes the diffusion model's gradients (and so none of the
projection guarantees of the continual core); its own convs are protected layers like the U-Net's.

Architecture: a small U-Net (double 3×3 conv + GroupNorm + SiLU per level, max-pool down, bilinear up with skip
concatenation, 1×1 conv to one logit). GroupNorm rather than DiffusionAD's BatchNorm: batch statistics would
differ between 1 and N ranks and between training and evaluation, and running statistics are state a continual
strategy cannot protect.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cdad_dist.errors import ConfigError

HEAD_INPUTS = ("image", "latent")


@dataclass
class SegHeadConfig:
    """``model.seg_head``: the optional segmentation head (off by default)."""

    enabled: bool = False
    input: Literal["image", "latent"] = "image"
    channels: tuple[int, ...] = (16, 32, 64)      # widths per level (len = levels; each halves the resolution)
    # One-step reconstructions for training are taken at t ~ U[lo, hi): match eval.reconstruction's t.
    t_range: tuple[int, int] = (50, 150)
    focal_weight: float = 5.0                     # DiffusionAD: 5·focal + smooth-L1
    focal_alpha: float = 0.5
    focal_gamma: float = 4.0
    l1_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.input not in HEAD_INPUTS:
            raise ConfigError(f"model.seg_head.input must be one of {HEAD_INPUTS}, got {self.input!r}")
        self.channels = tuple(int(c) for c in self.channels)
        if not self.channels or any(c < 4 or c % 4 for c in self.channels):
            raise ConfigError(f"model.seg_head.channels={self.channels} must be non-empty multiples of 4")
        if len(self.t_range) != 2 or not 0 <= self.t_range[0] < self.t_range[1] <= 1000:
            raise ConfigError(f"model.seg_head.t_range={self.t_range} must satisfy 0 <= lo < hi <= 1000")
        self.t_range = (int(self.t_range[0]), int(self.t_range[1]))
        if not 0.0 <= self.focal_alpha <= 1.0 or self.focal_gamma < 0:
            raise ConfigError("model.seg_head.focal_alpha must be in [0, 1] and focal_gamma >= 0")
        if self.focal_weight < 0 or self.l1_weight < 0 or self.focal_weight + self.l1_weight == 0:
            raise ConfigError("model.seg_head.focal_weight and l1_weight must be >= 0 and not both 0")


def _groups(channels: int) -> int:
    return max(1, min(8, channels // 4))


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(_groups(cout), cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(_groups(cout), cout), nn.SiLU())


class SegmentationHead(nn.Module):
    """``head(a, b) -> logits`` (B×1×H×W at the resolution of ``a``) for a pair of inputs of ``in_channels`` each.

    Buffers ``map_scale`` (features, head) and ``map_scale_count``: the mean per-image max of each map on normal
    training images, pooled over tasks (``eval.map: fused`` divides each map by its scale). Being buffers, they
    travel with the weights (checkpoints, ``cdad predict``) and are never trained or projected.
    """

    def __init__(self, cfg: SegHeadConfig, in_channels: int):
        super().__init__()
        self.cfg = cfg
        widths = cfg.channels
        self.down = nn.ModuleList()
        cin = 2 * in_channels
        for w in widths:
            self.down.append(_DoubleConv(cin, w))
            cin = w
        self.up = nn.ModuleList(_DoubleConv(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(len(widths) - 1)))
        self.out = nn.Conv2d(widths[0], 1, 1)
        self.register_buffer("map_scale", torch.ones(2))
        self.register_buffer("map_scale_count", torch.zeros(()))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape:
            raise ConfigError(f"segmentation head: inputs of shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
        h = torch.cat([a, b], dim=1)
        skips = []
        for i, block in enumerate(self.down):
            if i:
                h = F.max_pool2d(h, 2, ceil_mode=True)
            h = block(h)
            skips.append(h)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skip], dim=1))
        return self.out(h)


def binary_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Mean binary focal loss (Lin et al. 2017) on logits: −α_t·(1−p_t)^γ·log p_t, from log-sigmoid (stable)."""
    logits, target = logits.float(), target.float()
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    log_pt = target * log_p + (1 - target) * log_not_p
    alpha_t = target * alpha + (1 - target) * (1 - alpha)
    return (-alpha_t * (1 - log_pt.exp()).pow(gamma) * log_pt).mean()


def head_loss(logits: torch.Tensor, mask: torch.Tensor, cfg: SegHeadConfig) -> torch.Tensor:
    """DiffusionAD's segmentation loss: focal_weight·focal + l1_weight·smoothL1(sigmoid, mask), mask resized to
    the logits (nearest for a latent-resolution head would lose thin defects, so the area average is the target)."""
    if mask.shape[-2:] != logits.shape[-2:]:
        mask = F.adaptive_avg_pool2d(mask.float(), logits.shape[-2:])
    focal = binary_focal_loss(logits, mask, cfg.focal_alpha, cfg.focal_gamma)
    l1 = F.smooth_l1_loss(torch.sigmoid(logits.float()), mask.float())
    return cfg.focal_weight * focal + cfg.l1_weight * l1
