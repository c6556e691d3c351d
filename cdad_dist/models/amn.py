"""Anomaly-masked network (AMN) of CDAD: the image condition of the denoiser.

``c_local = E_lo(x)`` is a small CNN that brings the ImageNet-normalised image to the U-Net's ``conv_in`` resolution
and width; ``c = E_no(c_local + pos)`` is a post-norm transformer encoder (DETR / UniAD style) whose self-attention
cannot look at a token's own k×k neighbourhood (neighbour-masked attention, UniAD), so a token must be explained by
*other*, normal-looking regions. Trained with the anomaly-masked loss ``‖E_no(E_lo(x̃)+pos) − E_lo(x)‖²`` it learns
to replace perturbed (anomalous) features by normal ones.

Choices that differ from a literal reading of the paper, on purpose:
- The 2-D sine positional embedding is added to the queries and keys of *every* layer (DETR style, as the authors'
  ``TransformerEncoder`` does), not once to the input as the paper's formula ``E_no(c̄ + e_p)`` reads. Values never
  see it.
- q, k and v are three separate ``nn.Linear`` layers (not a packed ``in_proj``), so a forward hook on each records
  its true input (src+pos for q/k, src for v) and gradient projection can protect each with the right basis.
- The neighbour mask is a boolean tensor built once per grid size without Python loops over tokens (the official
  code rebuilt it with a 1024-iteration loop on every forward).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cdad_dist.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOCAL_CHANNELS = (16, 16, 32, 32, 96, 96, 256)
# Layers that may downsample (÷2 each), in order; the authors' ÷8 encoder uses all three.
_DOWNSAMPLE_LAYERS = (2, 4, 6)
ATTENTION_BACKENDS = ("sdpa", "xformers")


@dataclass
class AMNConfig:
    """Shape of the AMN. ``channels`` must equal the U-Net's ``block_out_channels[0]``."""

    channels: int = 320
    factor: int = 8               # image → latent downsampling; the local encoder's strides follow it
    depth: int = 8                # transformer encoder layers
    heads: int = 8
    neighbour: int = 7            # k of the k×k neighbourhood hidden from each token
    ffn_mult: int = 4
    dropout: float = 0.0
    local_channels: tuple[int, ...] = LOCAL_CHANNELS
    attention_backend: str = "sdpa"


def local_strides(factor: int, n_layers: int = 8) -> tuple[int, ...]:
    """Strides of the local encoder for a first-stage ``factor`` ∈ {1, 2, 4, 8}: ÷2 at layers 2, 4, 6 in turn."""
    if factor not in (1, 2, 4, 8):
        raise ConfigError(f"AMN: first_stage_factor must be 1, 2, 4 or 8, got {factor}")
    n_down = int(math.log2(factor))
    down = set(_DOWNSAMPLE_LAYERS[:n_down])
    return tuple(2 if i in down else 1 for i in range(n_layers))


def neighbour_mask(height: int, width: int, k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean ``L×L`` mask (L = h·w, row-major tokens); True where query i MAY attend key j.

    A key is hidden when it lies in the query's own k×k window (Chebyshev distance ≤ k//2, itself included).
    """
    if k < 1 or k % 2 == 0:
        raise ConfigError(f"AMN: neighbour size must be a positive odd integer, got {k}")
    # Built and checked on the CPU (the check reads values; a meta-device plan has none), then moved.
    ys = torch.arange(height, device="cpu").repeat_interleave(width)
    xs = torch.arange(width, device="cpu").repeat(height)
    r = k // 2
    near = ((ys[:, None] - ys[None, :]).abs() <= r) & ((xs[:, None] - xs[None, :]).abs() <= r)
    allowed = ~near
    if not bool(allowed.any(dim=1).all()):
        raise ConfigError(
            f"AMN: a {k}×{k} neighbour mask hides every token of a {height}×{width} grid from some query; "
            f"use a smaller amn_neighbour or a larger image"
        )
    return allowed.to(device) if device is not None else allowed


def sine_position_embedding(height: int, width: int, channels: int, device=None, dtype=torch.float32,
                            temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalised 2-D sine embedding, ``(h·w)×C``: C/2 features for y then C/2 for x.

    Written here because torch has no 2-D sine embedding and diffusers' helpers use a different (un-normalised,
    concatenated sin|cos) layout from the DETR/UniAD one the authors use.
    """
    if channels % 4:
        raise ConfigError(f"AMN: channels must be a multiple of 4 for the sine embedding, got {channels}")
    half = channels // 2
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, height + 1, device=device, dtype=torch.float32) / (height + eps) * scale
    x = torch.arange(1, width + 1, device=device, dtype=torch.float32) / (width + eps) * scale
    dim_t = torch.arange(half, device=device, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / half)

    def interleave(v: torch.Tensor) -> torch.Tensor:
        p = v[:, None] / dim_t  # n×half
        return torch.stack((p[:, 0::2].sin(), p[:, 1::2].cos()), dim=2).flatten(1)

    py = interleave(y)[:, None, :].expand(height, width, half)
    px = interleave(x)[None, :, :].expand(height, width, half)
    return torch.cat((py, px), dim=2).reshape(height * width, channels).to(dtype)


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """xformers memory-efficient attention with the mask as an additive bias; q,k,v are B×H×L×D."""
    try:
        import xformers.ops as xops
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError("AMN: attention_backend='xformers' but xformers is not installed "
                          "(pip install xformers, or use attention_backend='sdpa')") from exc
    if q.device.type != "cuda":
        raise ConfigError(f"AMN: attention_backend='xformers' needs CUDA tensors, got device {q.device}; "
                          "use attention_backend='sdpa'")
    b, h, n, _ = q.shape
    # xformers wants the bias' last dim padded to a multiple of 8 in memory; slice back to n.
    pad = (n + 7) // 8 * 8
    bias = torch.zeros(n, pad, device=q.device, dtype=q.dtype)
    bias[:, :n].masked_fill_(~allowed, float("-inf"))
    bias = bias[:, :n].expand(b, h, n, n)
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)


class NeighbourMaskedSelfAttention(nn.Module):
    """Multi-head self-attention whose queries never see their own k×k neighbourhood."""

    def __init__(self, channels: int, heads: int, dropout: float = 0.0, backend: str = "sdpa"):
        super().__init__()
        if channels % heads:
            raise ConfigError(f"AMN: channels {channels} not divisible by amn_heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.backend = backend
        self.q_proj = nn.Linear(channels, channels)
        self.k_proj = nn.Linear(channels, channels)
        self.v_proj = nn.Linear(channels, channels)
        self.out_proj = nn.Linear(channels, channels)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        qk_in = src + pos
        q, k, v = self._split(self.q_proj(qk_in)), self._split(self.k_proj(qk_in)), self._split(self.v_proj(src))
        if self.backend == "xformers":
            out = _xformers_attention(q, k, v, allowed)
        else:
            drop = self.dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=drop)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer (DETR/UniAD): attn → add&norm → FFN(ReLU) → add&norm."""

    def __init__(self, channels: int, heads: int, ffn: int, dropout: float, backend: str):
        super().__init__()
        self.self_attn = NeighbourMaskedSelfAttention(channels, heads, dropout, backend)
        self.linear1 = nn.Linear(channels, ffn)
        self.linear2 = nn.Linear(ffn, channels)
        self.norm1 = nn.LayerNorm(channels)
        self.norm2 = nn.LayerNorm(channels)
        self.drop = nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        src = self.norm1(src + self.drop(self.self_attn(src, pos, allowed)))
        return self.norm2(src + self.drop(self.linear2(self.drop(F.relu(self.linear1(src))))))


def _local_encoder(channels: int, factor: int, hidden: tuple[int, ...]) -> nn.Sequential:
    """ControlNet-style hint encoder: bias-free 3×3 convs, SiLU between (none after the last)."""
    widths = (3, *hidden, channels)
    strides = local_strides(factor, len(widths) - 1)
    layers: list[nn.Module] = []
    for i, stride in enumerate(strides):
        layers.append(nn.Conv2d(widths[i], widths[i + 1], 3, stride=stride, padding=1, bias=False))
        if i < len(strides) - 1:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class AMN(nn.Module):
    """``forward(x in [0,1]) -> (c, c_local)``, both ``B×C×(H/f)×(W/f)``."""

    def __init__(self, cfg: AMNConfig | None = None):
        super().__init__()
        cfg = cfg or AMNConfig()
        if cfg.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"AMN: attention_backend must be one of {ATTENTION_BACKENDS}, got "
                              f"{cfg.attention_backend!r}")
        if len(cfg.local_channels) != 7:
            raise ConfigError(f"AMN: local_channels needs 7 hidden widths (8 convs), got {cfg.local_channels}")
        self.cfg = cfg
        self.local = _local_encoder(cfg.channels, cfg.factor, tuple(cfg.local_channels))
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.channels, cfg.heads, cfg.ffn_mult * cfg.channels, cfg.dropout, cfg.attention_backend)
            for _ in range(cfg.depth)
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # Neighbour masks per (h, w, device): a cache rather than a registered buffer, so grid sizes may vary and
        # the mask (pure shape information) never lands in state dicts / checkpoints.
        self._masks: dict[tuple[int, int, str], torch.Tensor] = {}
        self.gradient_checkpointing = False

    def set_attention_backend(self, backend: str) -> None:
        if backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"AMN: attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        self.cfg.attention_backend = backend
        for layer in self.layers:
            layer.self_attn.backend = backend

    def mask(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """The neighbour mask for an h×w grid, built once per (size, device) and cached."""
        key = (height, width, str(device))
        if key not in self._masks:
            # Built outside inference mode: a mask first made during evaluation must stay usable in training.
            with torch.inference_mode(False):
                self._masks[key] = neighbour_mask(height, width, self.cfg.neighbour, device)
        return self._masks[key]

    def encode_local(self, x: torch.Tensor) -> torch.Tensor:
        """E_lo on an image in [0,1] (ImageNet-normalised here)."""
        return self.local((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))

    def encode_nonlocal(self, c_local: torch.Tensor) -> torch.Tensor:
        """E_no(c_local + pos), returned as B×C×h×w."""
        b, c, h, w = c_local.shape
        src = c_local.flatten(2).transpose(1, 2)
        pos = sine_position_embedding(h, w, c, device=src.device, dtype=src.dtype)[None]
        allowed = self.mask(h, w, src.device)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                src = checkpoint(layer, src, pos, allowed, use_reentrant=False)
            else:
                src = layer(src, pos, allowed)
        return src.transpose(1, 2).reshape(b, c, h, w)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c_local = self.encode_local(x)
        return self.encode_nonlocal(c_local), c_local
