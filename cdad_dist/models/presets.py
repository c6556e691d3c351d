"""Model presets and ``build_model``.

``tiny``: CPU preset (4.57 M trainable parameters: U-Net 3.97 M, AMN 0.60 M; ~0.25 s per training step at
batch 8 on 2 CPU cores) for tests and the demo: 64 px images, space-to-depth ÷4 first stage
(16×16×48 "latent" = pixels), U-Net (64, 128) with cross-attention only at 8×8 (second down block, mid block, first
up block), AMN depth 2 / 4 heads / k=5 on the 16×16 grid.

``sd15``: the paper's model: SD 1.5 U-Net (320, 640, 1280, 1280; 2 layers; cross-attention 768; 8 heads) and
KL-f8 VAE (4 latent channels, scaling 0.18215) at 256 px, AMN depth 8 / 8 heads / k=7 / C=320. Loaded from
``pretrained_path`` (diffusers folder or single SD file) or, with no path, built with random weights (benchmarks).

Every shape field of ``ModelConfig`` defaults to ``None`` = "the preset's value", so a config that only says
``preset: sd15`` gets the whole SD 1.5 shape; set a field to override it.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch

from cdad_dist.errors import ConfigError
from cdad_dist.models.amn import AMN, ATTENTION_BACKENDS, LOCAL_CHANNELS, AMNConfig, neighbour_mask
from cdad_dist.models.cdad_model import AMN_LOSSES, DENOISE_FROM, CDADModel
from cdad_dist.models.first_stage import SpaceToDepthFirstStage, VAEFirstStage
from cdad_dist.models.seg_head import SegHeadConfig, SegmentationHead
from cdad_dist.models import loaders

log = logging.getLogger(__name__)

FIRST_STAGES = ("space_to_depth", "autoencoder_kl")
LATENT_SCALINGS = ("data", "none")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

PRESETS: dict[str, dict] = {
    "tiny": dict(
        image_size=64, block_out_channels=(64, 128), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4, cross_attention_dim=64, context_tokens=8,
        amn_depth=2, amn_heads=4, amn_neighbour=5, amn_ffn_mult=4, amn_local_channels=LOCAL_CHANNELS,
        first_stage="space_to_depth", first_stage_factor=4,
        vae_block_out_channels=(128, 256, 512, 512), vae_layers_per_block=2, vae_latent_channels=4,
        vae_scaling_factor=0.18215,
    ),
    "sd15": dict(
        image_size=256, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8, cross_attention_dim=768, context_tokens=77,
        amn_depth=8, amn_heads=8, amn_neighbour=7, amn_ffn_mult=4, amn_local_channels=LOCAL_CHANNELS,
        first_stage="autoencoder_kl", first_stage_factor=8,
        vae_block_out_channels=(128, 256, 512, 512), vae_layers_per_block=2, vae_latent_channels=4,
        vae_scaling_factor=0.18215,
    ),
}


@dataclass
class ModelConfig:
    """Model options; ``None`` shape fields take the preset's value (see ``PRESETS``)."""

    preset: str = "tiny"                       # "tiny" | "sd15"
    image_size: int | None = None
    block_out_channels: tuple[int, ...] | None = None
    layers_per_block: int | None = None
    down_block_types: tuple[str, ...] | None = None
    up_block_types: tuple[str, ...] | None = None
    attention_head_dim: int | None = None      # diffusers' legacy name: the number of heads (SD 1.5: 8)
    cross_attention_dim: int | None = None
    context_tokens: int | None = None
    amn_depth: int | None = None
    amn_heads: int | None = None
    amn_neighbour: int | None = None
    amn_ffn_mult: int | None = None
    amn_dropout: float = 0.0
    amn_local_channels: tuple[int, ...] | None = None
    first_stage: str | None = None             # "space_to_depth" | "autoencoder_kl"
    first_stage_factor: int | None = None
    vae_block_out_channels: tuple[int, ...] | None = None   # used to build a random / single-file VAE
    vae_layers_per_block: int | None = None
    vae_latent_channels: int | None = None
    vae_scaling_factor: float | None = None
    pretrained_path: str | None = None         # diffusers folder or single .ckpt/.safetensors (U-Net, VAE, CLIP)
    vae_path: str | None = None                # separate VAE (folder or file); default: pretrained_path
    context_path: str | None = None            # empty_prompt.safetensors overriding the CLIP/auto lookup
    lambda_amn: float = 1.0
    amn_target_detach: bool = False
    amn_loss: str = "normalized"               # "normalized" (scale-free, per-token standardised) | "mse" (paper)
    # Training timesteps drawn uniformly from [lo, hi) (null: all T). Evaluation only ever starts at start_t /
    # one_step_t, so a small model does better when its capacity goes to the noise levels it is used at.
    train_t_range: tuple[int, int] | None = None
    # space_to_depth only: "data" estimates shift/scale for unit-variance latents on the first task's training
    # images (like SD's VAE scaling_factor, stored with the model); "none" keeps 2x−1.
    latent_scaling: str = "data"
    # "clean" (CDAD): the U-Net denoises the clean latent, anomalies are repaired through the AMN condition only;
    # "perturbed" (DiffusionAD's noise-to-norm): it denoises the NSA-perturbed latent towards the clean one.
    denoise_from: str = "clean"
    gradient_checkpointing: bool = False
    attention_backend: str = "sdpa"            # "sdpa" | "xformers"
    seg_head: SegHeadConfig = field(default_factory=SegHeadConfig)  # DiffusionAD's segmentation head (optional)
    first_stage_dtype: str = "float32"         # compute dtype of the frozen VAE
    init_seed: int = 0                         # seeds random init (AMN always; U-Net/VAE when not loaded)
    # Scales every channel width (U-Net, VAE, cross-attention, GroupNorm groups) and keeps depth and layer types:
    # `sd15` at 1/8 or 1/4 is the real architecture small enough to run on a CPU, to check `cdad plan` against.
    width_multiplier: float = 1.0


def resolve_config(cfg: ModelConfig) -> ModelConfig:
    """A copy with every ``None`` shape field filled from the preset, lists turned into tuples, and checks."""
    if cfg.preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {cfg.preset!r}; choose one of {sorted(PRESETS)}")
    values = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v is None and f.name in PRESETS[cfg.preset]:
            v = PRESETS[cfg.preset][f.name]
        values[f.name] = tuple(v) if isinstance(v, list) else v
    out = ModelConfig(**values)
    if out.width_multiplier != 1.0:
        out = _scaled_widths(out)
    _check(out)
    return out


NORM_GROUPS = 32  # diffusers' GroupNorm groups of the U-Net and VAE at full width


def norm_groups(cfg: ModelConfig) -> int:
    return max(1, round(NORM_GROUPS * cfg.width_multiplier))


def _scaled_widths(cfg: ModelConfig) -> ModelConfig:
    m = cfg.width_multiplier
    if not 0.0 < m <= 1.0:
        raise ConfigError(f"model.width_multiplier must be in (0, 1], got {m}")
    if cfg.pretrained_path or cfg.vae_path:
        raise ConfigError("model.width_multiplier builds a random-weight model; it cannot be combined with "
                          "model.pretrained_path / model.vae_path")
    groups = max(1, round(NORM_GROUPS * m))
    scale = lambda widths: tuple(int(round(w * m)) for w in widths)  # noqa: E731
    blocks, vae_blocks = scale(cfg.block_out_channels), scale(cfg.vae_block_out_channels)
    bad = [w for w in blocks + vae_blocks if w % groups or w % cfg.attention_head_dim]
    if bad:
        raise ConfigError(f"model.width_multiplier {m}: widths {bad} are not divisible by the {groups} GroupNorm "
                          f"groups and {cfg.attention_head_dim} heads; pick a multiplier like 1/8, 1/4 or 1/2")
    return dataclasses.replace(cfg, block_out_channels=blocks, vae_block_out_channels=vae_blocks,
                               cross_attention_dim=max(1, int(round(cfg.cross_attention_dim * m))))


def _check(cfg: ModelConfig) -> None:
    if cfg.first_stage not in FIRST_STAGES:
        raise ConfigError(f"model.first_stage: {cfg.first_stage!r} is not one of {FIRST_STAGES}")
    if cfg.attention_backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"model.attention_backend: {cfg.attention_backend!r} is not one of {ATTENTION_BACKENDS}")
    if cfg.first_stage_dtype not in DTYPES:
        raise ConfigError(f"model.first_stage_dtype: {cfg.first_stage_dtype!r} is not one of {sorted(DTYPES)}")
    n = len(cfg.block_out_channels)
    if len(cfg.down_block_types) != n or len(cfg.up_block_types) != n:
        raise ConfigError(f"model: down_block_types/up_block_types need {n} entries (one per block_out_channels)")
    if cfg.image_size % cfg.first_stage_factor:
        raise ConfigError(f"model.image_size {cfg.image_size} is not divisible by first_stage_factor "
                          f"{cfg.first_stage_factor}")
    if cfg.amn_loss not in AMN_LOSSES:
        raise ConfigError(f"model.amn_loss: {cfg.amn_loss!r} is not one of {AMN_LOSSES}")
    if cfg.denoise_from not in DENOISE_FROM:
        raise ConfigError(f"model.denoise_from: {cfg.denoise_from!r} is not one of {DENOISE_FROM}")
    if cfg.latent_scaling not in LATENT_SCALINGS:
        raise ConfigError(f"model.latent_scaling: {cfg.latent_scaling!r} is not one of {LATENT_SCALINGS}")
    if cfg.train_t_range is not None:
        lo, hi = cfg.train_t_range if len(cfg.train_t_range) == 2 else (None, None)
        if lo is None or not 0 <= lo < hi <= 1000:
            raise ConfigError(f"model.train_t_range: expected [lo, hi] with 0 <= lo < hi <= 1000, got "
                              f"{list(cfg.train_t_range)}")
    if cfg.lambda_amn < 0:
        raise ConfigError(f"model.lambda_amn must be ≥ 0, got {cfg.lambda_amn}")


def unet_kwargs(cfg: ModelConfig, in_channels: int) -> dict:
    """diffusers ``UNet2DConditionModel`` kwargs of a resolved config."""
    return dict(sample_size=cfg.image_size // cfg.first_stage_factor, in_channels=in_channels,
                out_channels=in_channels, down_block_types=tuple(cfg.down_block_types),
                up_block_types=tuple(cfg.up_block_types), block_out_channels=tuple(cfg.block_out_channels),
                layers_per_block=cfg.layers_per_block, attention_head_dim=cfg.attention_head_dim,
                cross_attention_dim=cfg.cross_attention_dim, norm_num_groups=norm_groups(cfg))


def vae_kwargs(cfg: ModelConfig) -> dict:
    """diffusers ``AutoencoderKL`` kwargs of a resolved config (SD 1.5's KL-f8 by default)."""
    n = len(cfg.vae_block_out_channels)
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.vae_block_out_channels),
                layers_per_block=cfg.vae_layers_per_block, latent_channels=cfg.vae_latent_channels,
                sample_size=cfg.image_size, scaling_factor=cfg.vae_scaling_factor, norm_num_groups=norm_groups(cfg))


def _build_first_stage(cfg: ModelConfig, checkpoint: dict | None):
    if cfg.first_stage == "space_to_depth":
        return SpaceToDepthFirstStage(cfg.first_stage_factor)
    from diffusers import AutoencoderKL

    path = cfg.vae_path or cfg.pretrained_path
    same_file = checkpoint is not None and path == cfg.pretrained_path
    vae = (loaders.load_vae(path, vae_kwargs(cfg), checkpoint if same_file else None) if path
           else AutoencoderKL(**vae_kwargs(cfg)))
    stage = VAEFirstStage(vae, DTYPES[cfg.first_stage_dtype])
    if stage.factor != cfg.first_stage_factor:
        raise ConfigError(f"model.first_stage_factor {cfg.first_stage_factor} does not match the VAE "
                          f"(factor {stage.factor}) from {path or 'the preset'}")
    return stage


def _build_context(cfg: ModelConfig, width: int) -> torch.Tensor:
    ctx = loaders.find_empty_prompt_context(cfg.pretrained_path, cfg.context_path)
    if ctx is not None:
        return ctx
    if cfg.pretrained_path is not None:
        log.warning("model: no text encoder and no %s found for %s; using a zero empty-prompt context "
                    "(the pretrained U-Net was trained with CLIP(\"\"))", loaders.EMPTY_PROMPT_FILE,
                    cfg.pretrained_path)
        return torch.zeros(1, cfg.context_tokens, width)
    # Random-weight models: a fixed seeded context (constant, like the empty prompt it stands for).
    g = torch.Generator().manual_seed(cfg.init_seed + 1)
    return torch.randn(1, cfg.context_tokens, width, generator=g)


def build_model(cfg: ModelConfig | None = None) -> CDADModel:
    """Build (and load, when paths are given) a ``CDADModel``; random init is seeded by ``cfg.init_seed``."""
    from diffusers import UNet2DConditionModel

    cfg = resolve_config(cfg or ModelConfig())
    checkpoint = None
    if cfg.pretrained_path and loaders.is_single_file(cfg.pretrained_path):
        checkpoint = loaders.read_single_file(cfg.pretrained_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        first_stage = _build_first_stage(cfg, checkpoint)
        kwargs = unet_kwargs(cfg, first_stage.latent_channels)
        unet = (loaders.load_unet(cfg.pretrained_path, kwargs, checkpoint) if cfg.pretrained_path
                else UNet2DConditionModel(**kwargs))
        amn = AMN(AMNConfig(channels=unet.config.block_out_channels[0], factor=first_stage.factor,
                            depth=cfg.amn_depth, heads=cfg.amn_heads, neighbour=cfg.amn_neighbour,
                            ffn_mult=cfg.amn_ffn_mult, dropout=cfg.amn_dropout,
                            local_channels=tuple(cfg.amn_local_channels)))
        head_channels = 3 if cfg.seg_head.input == "image" else first_stage.latent_channels
        seg_head = SegmentationHead(cfg.seg_head, head_channels) if cfg.seg_head.enabled else None
    grid = cfg.image_size // first_stage.factor
    neighbour_mask(grid, grid, cfg.amn_neighbour)  # fail now, not at the first step, if k hides everything
    context = _build_context(cfg, unet.config.cross_attention_dim)
    model = CDADModel(unet, amn, first_stage, context, cfg.lambda_amn, cfg.amn_target_detach, cfg.amn_loss,
                      cfg.train_t_range, cfg.denoise_from, seg_head)
    model.model_config = cfg
    model.train()
    if cfg.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    if cfg.attention_backend != "sdpa":
        model.set_attention_backend(cfg.attention_backend)
    return model


def count_parameters(model: torch.nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
