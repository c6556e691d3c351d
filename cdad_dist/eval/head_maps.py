"""Which anomaly map is scored (``eval.map``), and the calibration that fuses the head's map with the features'.

- ``features`` (default): the feature distance between D(E(x)) and x̂ (anomaly_map.py);
- ``head``: the segmentation head's probability map (models/seg_head.py);
- ``fused``: ``features / s_f + head / s_h``, each map divided by its scale on normal training images: the mean
  per-image maximum of that map, pooled (count-weighted) over the tasks seen so far, since a continual run never
  sees an old class's images again. The two scales live in the head's buffers, so checkpoints and ``cdad predict``
  carry them. Image scores of ``head`` / ``fused`` follow ``eval.head_scoring`` (DiffusionAD: mean of the top 50).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from cdad_dist.config_checks import check_choices
from cdad_dist.errors import ConfigError

MAP_KINDS = ("features", "head", "fused")
SCALE_FLOOR = 1e-6  # a head that outputs ~0 on every normal image must not turn fusion into a division by zero


@dataclass
class HeadScoringConfig:
    """``eval.head_scoring``: image scores of the ``head`` and ``fused`` maps, and the fusion's calibration."""

    score: Literal["max", "topk_mean"] = "topk_mean"
    topk: int = 50
    calibration_images: int = 32  # normal training images per task (all ranks together) for the map scales

    def __post_init__(self) -> None:
        check_choices(self, "eval.head_scoring")
        if self.topk < 1:
            raise ConfigError(f"eval.head_scoring.topk must be >= 1, got {self.topk}")
        if self.calibration_images < 1:
            raise ConfigError(f"eval.head_scoring.calibration_images must be >= 1, got {self.calibration_images}")


def fuse(features: torch.Tensor, head: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``features / s_f + head / s_h`` with ``scale = (s_f, s_h)``."""
    s = scale.float().clamp_min(SCALE_FLOOR)
    return features.float() / s[0] + head.float() / s[1]


def pool_scale(head_module, per_image_max: torch.Tensor, count: int) -> None:
    """Fold a task's mean per-image maxima (features, head) over ``count`` images into the head's buffers."""
    if count <= 0:
        return
    old = float(head_module.map_scale_count)
    new = old + count
    scale = head_module.map_scale.detach().double() * (old / new) + per_image_max.double() * (count / new)
    head_module.map_scale.copy_(scale.to(head_module.map_scale.dtype))
    head_module.map_scale_count.fill_(new)
