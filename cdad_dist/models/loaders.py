"""Offline loading of pretrained Stable Diffusion 1.5 parts (U-Net, VAE, empty-prompt context).

Two layouts are accepted for ``pretrained_path`` (and ``vae_path``):
- a local **diffusers folder** (``unet/``, ``vae/``, optionally ``text_encoder/`` + ``tokenizer/``), read with
  ``from_pretrained(..., local_files_only=True)``;
- a **single original-format file** (``.ckpt`` / ``.safetensors``, LDM key names such as
  ``model.diffusion_model.*`` and ``first_stage_model.*``, e.g. ``v1-5-pruned.ckpt`` or the authors' merged
  ``base.ckpt``; a bare kl-f8 VAE file with ``encoder.*``/``decoder.*`` keys works for ``vae_path``).

Why single files are not read with ``from_single_file``: in diffusers 0.42, without ``config=`` (a local diffusers
folder) or ``original_config=`` it infers the model type and fetches that model's ``config.json`` from the Hub, which
fails offline (and would defeat the point of a single file). So we build the model from the *known* config (the
preset's SD 1.5 shapes, or the user's overrides) and convert the state dict with diffusers' own conversion
functions (``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint``), then load it strictly.

No function here ever downloads: every path is checked first and a missing one is a ``PretrainedWeightsError``
naming it; every diffusers/transformers call passes ``local_files_only=True``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cdad_dist.errors import CdadError


SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"
EMPTY_PROMPT_KEY = "context"


class PretrainedWeightsError(CdadError):
    """A pretrained model path is missing, has the wrong layout, or its weights do not fit the model config."""


def _existing(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise PretrainedWeightsError(f"{what}: path {str(p)!r} does not exist (weights are never downloaded; "
                                     f"point it at a local diffusers folder or a .ckpt/.safetensors file)")
    return p


def is_single_file(path: str | Path) -> bool:
    p = Path(path)
    return p.is_file() and p.suffix.lower() in SINGLE_FILE_SUFFIXES


def _component_dir(root: Path, subfolder: str, what: str) -> tuple[Path, str | None]:
    """(folder, subfolder) for from_pretrained: ``root/<subfolder>/config.json`` or ``root/config.json``."""
    if (root / subfolder / "config.json").is_file():
        return root, subfolder
    if (root / "config.json").is_file():
        return root, None
    raise PretrainedWeightsError(f"{what}: {str(root)!r} is neither a diffusers folder with "
                                 f"{subfolder}/config.json nor a {subfolder} folder with config.json")


def read_single_file(path: str | Path) -> dict[str, torch.Tensor]:
    """State dict of an original-format file (unwrapping Lightning's ``state_dict`` key)."""
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    p = _existing(path, "single-file checkpoint")
    try:
        return load_single_file_checkpoint(str(p), local_files_only=True)
    except Exception as exc:  # diffusers raises OSError/ValueError/pickle errors here
        raise PretrainedWeightsError(f"cannot read checkpoint {str(p)!r}: {exc}") from exc


def _load_converted(model: nn.Module, state: dict[str, torch.Tensor], source: str, what: str) -> nn.Module:
    if not state:
        raise PretrainedWeightsError(f"{what}: no {what} weights found in {source!r} (wrong key prefix?)")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc)[:300])
        raise PretrainedWeightsError(f"{what}: weights in {source!r} do not fit the configured model "
                                     f"(check the preset's shape fields): {first}") from exc
    if missing or unexpected:
        raise PretrainedWeightsError(
            f"{what}: weights in {source!r} do not fit the configured model: "
            f"missing {sorted(missing)[:5]}{'…' if len(missing) > 5 else ''} ({len(missing)}), "
            f"unexpected {sorted(unexpected)[:5]}{'…' if len(unexpected) > 5 else ''} ({len(unexpected)})")
    return model


def _from_pretrained(cls, root: Path, subfolder: str | None, what: str):
    try:
        return cls.from_pretrained(root, subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError) as exc:  # e.g. only an fp16 variant, or a corrupt weights file
        where = root / subfolder if subfolder else root
        raise PretrainedWeightsError(f"{what}: cannot load the diffusers folder {str(where)!r}: {exc}") from exc


def _load_component(path, label: str, subfolder: str, model_cls, config: dict | None, convert, checkpoint):
    """One SD component from a diffusers folder (``subfolder`` or a bare component folder) or a single file,
    converted from the original layout with diffusers' own ``convert`` function (no Hub config needed)."""
    p = _existing(path, label)
    if not is_single_file(p):
        root, sub = _component_dir(p, subfolder, label)
        return _from_pretrained(model_cls, root, sub, label)
    if config is None:
        raise PretrainedWeightsError(f"{label}: loading the single file {str(p)!r} needs the {label} config")
    state = checkpoint if checkpoint is not None else read_single_file(p)
    model = model_cls(**config)
    return _load_converted(model, convert(state, dict(model.config)), str(p), label)


def load_unet(path: str | Path, unet_config: dict | None = None, checkpoint: dict | None = None):
    """SD U-Net from a diffusers folder, or from a single file using ``unet_config`` (diffusers kwargs)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return _load_component(path, "U-Net", "unet", UNet2DConditionModel, unet_config, convert_ldm_unet_checkpoint,
                           checkpoint)


def load_vae(path: str | Path, vae_config: dict | None = None, checkpoint: dict | None = None):
    """``AutoencoderKL`` from a diffusers folder (``vae/`` or a bare VAE folder) or a single file."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return _load_component(path, "VAE", "vae", AutoencoderKL, vae_config, convert_ldm_vae_checkpoint, checkpoint)


@torch.no_grad()
def encode_empty_prompt(folder: str | Path) -> torch.Tensor:
    """CLIP("") from a diffusers folder's ``text_encoder/`` + ``tokenizer/``: ``1×L×D`` (last hidden state)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    root = _existing(folder, "text encoder")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
        encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", local_files_only=True)
    except OSError as exc:
        raise PretrainedWeightsError(f"text encoder: cannot load tokenizer/text_encoder from {str(root)!r}: "
                                     f"{exc}") from exc
    ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return encoder.eval()(ids)[0].float().contiguous()


def save_empty_prompt(context: torch.Tensor, path: str | Path) -> None:
    """Store a precomputed empty-prompt context (``1×L×D``) so later runs need no text encoder."""
    from safetensors.torch import save_file

    save_file({EMPTY_PROMPT_KEY: context.detach().float().cpu().contiguous()}, str(path))


def load_empty_prompt(path: str | Path) -> torch.Tensor:
    from safetensors.torch import load_file

    p = _existing(path, "empty-prompt context")
    tensors = load_file(str(p))
    if EMPTY_PROMPT_KEY not in tensors:
        raise PretrainedWeightsError(f"empty-prompt context: {str(p)!r} has no tensor named {EMPTY_PROMPT_KEY!r}")
    ctx = tensors[EMPTY_PROMPT_KEY]
    return ctx[None] if ctx.ndim == 2 else ctx


def find_empty_prompt_context(pretrained_path: str | Path | None, context_path: str | Path | None = None
                              ) -> torch.Tensor | None:
    """The empty-prompt context, first found of: ``context_path``; CLIP in the diffusers folder;
    ``empty_prompt.safetensors`` in the folder / next to the single file. None when there is none."""
    if context_path is not None:
        return load_empty_prompt(context_path)
    if pretrained_path is None:
        return None
    p = _existing(pretrained_path, "pretrained model")
    folder = p.parent if p.is_file() else p
    if p.is_dir() and (p / "text_encoder").is_dir() and (p / "tokenizer").is_dir():
        return encode_empty_prompt(p)
    if (folder / EMPTY_PROMPT_FILE).is_file():
        return load_empty_prompt(folder / EMPTY_PROMPT_FILE)
    return None
