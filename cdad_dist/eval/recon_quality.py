"""How faithful a reconstruction is: PSNR per image, and the error inside defect masks vs outside.

A reconstruction-based detector needs both: normal regions reproduced closely (high PSNR on normal images, so
the feature distance is small there) and defective regions replaced by normal appearance (a large error inside
the masks relative to outside).
"""
from __future__ import annotations

import torch


def psnr(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image of B×C×H×W images in [0, 1] (peak 1)."""
    mse = (x.float() - x_hat.float()).pow(2).flatten(1).mean(1)
    return -10.0 * torch.log10(mse.clamp_min(1e-12))


class ReconstructionQuality:
    """Running sums over batches: PSNR of normal images, |x̂ − x| inside and outside the defect masks."""

    def __init__(self) -> None:
        self.psnr_normal: list[float] = []
        self.err_in = self.n_in = self.err_out = self.n_out = 0.0

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> None:
        normal = labels.reshape(-1) == 0
        if normal.any():
            self.psnr_normal += psnr(x[normal], x_hat[normal]).tolist()
        err = (x.float() - x_hat.float()).abs().mean(1, keepdim=True)  # B×1×H×W
        bad = ~normal
        if bad.any():
            inside = masks[bad].float().reshape(err[bad].shape) > 0.5
            self.err_in += float(err[bad][inside].sum())
            self.n_in += float(inside.sum())
            self.err_out += float(err[bad][~inside].sum())
            self.n_out += float((~inside).sum())

    def compute(self) -> dict[str, float]:
        nan = float("nan")
        mean_psnr = sum(self.psnr_normal) / len(self.psnr_normal) if self.psnr_normal else nan
        err_in = self.err_in / self.n_in if self.n_in else nan
        err_out = self.err_out / self.n_out if self.n_out else nan
        return {"psnr_normal_db": mean_psnr, "err_in_mask": err_in, "err_out_mask": err_out,
                "err_in_out_ratio": err_in / err_out if self.n_in and self.n_out and err_out > 0 else nan}
