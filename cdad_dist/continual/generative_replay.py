"""Generative replay (ReplayCAD, Hu et al. 2025): compress each finished class into a frozen text-to-image LDM,
then generate that class's replay images from it.

Compression (the paper's stage 1; notes in shared/design/peer_methods_notes.md §B): K placeholder tokens are added
to the frozen CLIP tokenizer and their rows of the token-embedding matrix are learned (textual inversion: the
gradient of every other row is zeroed and Adam's update of a zero-gradient row is exactly zero, so the encoder
stays what it was); the spatial branch maps the VAE latent of the image's foreground mask through Linear+ReLU
(rows of 128 values, as the paper's reshape) to ``mask_tokens`` extra context tokens appended to the text tokens.
Loss: the LDM's ε-MSE on the class's training images. What is kept per class (``<run>/replay/generative/<class>
.safetensors``, atomic): the K embeddings and the mask MLP, a few MB at SD scale (paper Table 2: ~3 MB).

Generation (stage 2): for each of ``per_class`` images a foreground mask of the class (flipped / rotated by 90°,
the paper's mask transforms that keep a mask a mask) conditions DDIM with ``ddim_steps`` steps and classifier-free
guidance (unconditional = the empty prompt with the same mask tokens); images are written in chunks of
``chunk`` (atomic ``.npz`` files, so a killed run resumes at the first missing chunk and regenerates nothing
done) and then as the class's replay shard.

Foreground masks: ``mask_dir/<class>/*.png`` when given; otherwise (no SAM offline) the fallback: Otsu's threshold
on each image's colour distance to its median border colour, cleaned by a morphological open/close; a mask that
covers under 5 % or over 95 % of the image (a texture, or a failed split) becomes the whole image.
"""
from __future__ import annotations

import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from cdad_dist.errors import ConfigError, DatasetError

MASK_ROW = 128  # the paper's reshape of z_mask into rows of 128 values before its Linear
PLACEHOLDER = "<replay-{}>"


class FrozenTextToImage:
    """The frozen parts of a local diffusers text-to-image LDM, on ``device``, float32."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        root = Path(path)
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
            self.text_encoder = CLIPTextModel.from_pretrained(str(root / "text_encoder")).to(device)
            self.unet = UNet2DConditionModel.from_pretrained(str(root / "unet")).to(device)
            self.vae = AutoencoderKL.from_pretrained(str(root / "vae")).to(device)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"continual.replay.generative.generator_path: cannot load {root}: {exc}") from None
        sched = root / "scheduler"
        sd_schedule = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        self.train_scheduler = (DDPMScheduler.from_pretrained(str(sched)) if sched.is_dir()
                                else DDPMScheduler(**sd_schedule))
        self.ddim = DDIMScheduler.from_config(self.train_scheduler.config)
        for module in (self.text_encoder, self.unet, self.vae):
            module.requires_grad_(False).eval()
        self.device = torch.device(device)
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = int(self.unet.config.sample_size) * self.vae_factor
        self.scaling = float(getattr(self.vae.config, "scaling_factor", 0.18215))
        self.context_dim = int(self.unet.config.cross_attention_dim)
        if self.text_encoder.config.hidden_size != self.context_dim:
            raise ConfigError(f"{root}: text encoder width {self.text_encoder.config.hidden_size} != U-Net "
                              f"cross_attention_dim {self.context_dim}")

    def add_placeholders(self, k: int) -> list[int]:
        """Ids of K placeholder tokens (added once; the same K rows serve every class, loaded per class)."""
        names = [PLACEHOLDER.format(i) for i in range(k)]
        new = [n for n in names if n not in self.tokenizer.get_vocab()]
        if new:
            self.tokenizer.add_tokens(new)
            self.text_encoder.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)  # we init them
        return self.tokenizer.convert_tokens_to_ids(names)

    def prompt_ids(self, text: str) -> torch.Tensor:
        return self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.device)

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B×3×R×R) → scaled latents (posterior mean, as the paper's training)."""
        return self.vae.encode(x.to(self.device) * 2 - 1).latent_dist.mean * self.scaling

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return (self.vae.decode(z / self.scaling).sample.float().clamp(-1, 1) + 1) / 2

    def class_prompt(self, cfg) -> torch.Tensor:
        """Token ids of "<template> <replay-0> … <replay-K-1>" (the prompt every compression is learned on)."""
        return self.prompt_ids(f"{cfg.template} " + " ".join(PLACEHOLDER.format(i) for i in range(cfg.tokens)))

    def load_compression(self, comp: ClassCompression, cfg, mask_latent_numel: int) -> MaskTokens | None:
        """Put a class's K embeddings into the placeholder rows; its mask MLP (None without mask tokens)."""
        ids = self.add_placeholders(cfg.tokens)
        with torch.no_grad():
            self.text_encoder.get_input_embeddings().weight[ids] = comp.embeddings.to(self.device)
        if not comp.mask_mlp:
            return None
        mask_mlp = MaskTokens(mask_latent_numel, cfg.mask_tokens, self.context_dim).to(self.device)
        mask_mlp.load_state_dict(comp.mask_mlp)
        return mask_mlp


class MaskTokens(nn.Module):
    """The spatial branch: z_mask (C×h×w) → rows of 128 → Linear+ReLU → ``n_tokens`` context tokens."""

    def __init__(self, latent_numel: int, n_tokens: int, context_dim: int) -> None:
        super().__init__()
        self.rows = -(-latent_numel // MASK_ROW)
        self.n_tokens, self.context_dim = n_tokens, context_dim
        self.width = -(-n_tokens * context_dim // self.rows)
        self.linear = nn.Linear(MASK_ROW, self.width)

    def forward(self, z_mask: torch.Tensor) -> torch.Tensor:
        b = z_mask.shape[0]
        flat = z_mask.reshape(b, -1)
        flat = F.pad(flat, (0, self.rows * MASK_ROW - flat.shape[1]))
        out = torch.relu(self.linear(flat.view(b, self.rows, MASK_ROW))).reshape(b, -1)
        return out[:, : self.n_tokens * self.context_dim].reshape(b, self.n_tokens, self.context_dim)


@dataclass
class ClassCompression:
    """What a class is compressed into: K token embeddings and the mask MLP (and how learning went)."""

    embeddings: torch.Tensor                      # K × D
    mask_mlp: dict[str, torch.Tensor] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"embeddings": self.embeddings.contiguous(),
                **{f"mask_mlp.{k}": v.contiguous() for k, v in self.mask_mlp.items()}}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


# -- foreground masks ------------------------------------------------------------------------------------------------
def fallback_foreground(image: np.ndarray) -> np.ndarray:
    """uint8 {0, 1} foreground of an RGB uint8 image without SAM (see the module docstring)."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)
    dist = np.linalg.norm(image.astype(np.float32) - np.median(border, axis=0), axis=-1)
    scaled = cv2.normalize(dist, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    _, mask = cv2.threshold(scaled, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    kernel = np.ones((3, 3), np.uint8)
    mask = cv2.morphologyEx(cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel), cv2.MORPH_CLOSE, kernel)
    edge = np.concatenate([dist[0], dist[-1], dist[:, 0], dist[:, -1]])
    # a texture: the border varies as much as the "object" does, so no foreground stands out from it
    textured = mask.any() and edge.mean() >= 0.5 * dist[mask == 1].mean()
    if textured or not 0.05 <= mask.mean() <= 0.95:
        mask = np.ones_like(mask)
    return mask.astype(np.uint8)


def class_masks(mask_dir: str | None, cls: str, images: list[np.ndarray], size: int) -> list[np.ndarray]:
    """Foreground masks (uint8 {0, 1}, size×size) of a class: from ``mask_dir/<class>/`` or the fallback."""
    if mask_dir is None:
        return [cv2.resize(fallback_foreground(im), (size, size), interpolation=cv2.INTER_NEAREST) for im in images]
    folder = Path(mask_dir) / cls.split("/", 1)[-1]
    files = sorted(p for p in folder.glob("*.png")) if folder.is_dir() else []
    if not files:
        raise DatasetError(f"{folder}: no foreground masks (*.png) for class {cls} (continual.replay.generative."
                           "mask_dir)")
    masks = []
    for f in files:
        m = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
        if m is None:
            raise DatasetError(f"{f}: not a readable mask image")
        masks.append((cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST) > 127).astype(np.uint8))
    return masks


def _mask_images(masks: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(masks)).float().unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def _generator(seed: int, cls: str, what: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(cls.encode()) * 31 + what) % 2**63)


# -- stage 1: compression --------------------------------------------------------------------------------------------
def compress_class(t2i: FrozenTextToImage, images: torch.Tensor, masks: list[np.ndarray], cfg,
                   cls: str) -> ClassCompression:
    """Learn the class's K embeddings and mask MLP on ``images`` (N×3×R×R in [0, 1]) with their ``masks``."""
    start = time.perf_counter()
    ids = t2i.add_placeholders(cfg.tokens)
    table = t2i.text_encoder.get_input_embeddings().weight
    g = _generator(cfg.seed, cls, 0)
    keep = torch.zeros(table.shape[0], 1, device=table.device)
    keep[ids] = 1.0
    with torch.no_grad():  # init: the vocabulary's mean embedding plus noise (the paper inits randomly)
        mean = table[keep[:, 0] == 0].mean(0)
        table[ids] = mean + 0.01 * torch.randn(len(ids), table.shape[1], generator=g).to(table)
    table.requires_grad_(True)
    hook = table.register_hook(lambda grad: grad * keep)  # only the placeholder rows learn
    with torch.no_grad():
        z_all = torch.cat([t2i.encode_images(images[i:i + 8]) for i in range(0, len(images), 8)])
        zm_all = torch.cat([t2i.encode_images(m) for m in _mask_images(masks).split(8)])
    mask_mlp = None
    if cfg.mask_tokens:
        with torch.random.fork_rng(devices=[]):  # its init from (seed, class), not from the process's RNG state
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
            mask_mlp = MaskTokens(zm_all[0].numel(), cfg.mask_tokens, t2i.context_dim).to(t2i.device)
    params = [table] + (list(mask_mlp.parameters()) if mask_mlp is not None else [])
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    prompt = t2i.class_prompt(cfg)
    losses = []
    n = len(images)
    try:
        for step in range(cfg.steps):
            idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=g)
            z = z_all[idx.to(z_all.device)]
            noise = torch.randn(z.shape, generator=g).to(z)
            t = torch.randint(0, t2i.train_scheduler.config.num_train_timesteps, (z.shape[0],), generator=g)
            z_t = t2i.train_scheduler.add_noise(z, noise, t.to(z.device))
            context = _context(t2i, prompt.expand(z.shape[0], -1), mask_mlp,
                               zm_all[idx.to(zm_all.device) % len(zm_all)])
            loss = F.mse_loss(t2i.unet(z_t, t.to(z.device), encoder_hidden_states=context).sample.float(),
                              noise.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    finally:
        hook.remove()
        table.requires_grad_(False)
    return ClassCompression(table[ids].detach().cpu().clone(),
                            {k: v.detach().cpu().clone() for k, v in mask_mlp.state_dict().items()} if mask_mlp else {},
                            losses, time.perf_counter() - start)


def _context(t2i: FrozenTextToImage, ids: torch.Tensor, mask_mlp: MaskTokens | None,
             z_mask: torch.Tensor) -> torch.Tensor:
    text = t2i.text_encoder(ids)[0]
    if mask_mlp is None:
        return text
    return torch.cat([text, mask_mlp(z_mask).to(text.dtype)], dim=1)


@torch.no_grad()
def denoising_loss(t2i: FrozenTextToImage, comp: ClassCompression, images: torch.Tensor, masks: list[np.ndarray],
                   cfg, draws: int = 4, seed: int = 0) -> float:
    """The ε-MSE of the frozen LDM on ``images`` conditioned by ``comp``, over ``draws`` fixed (t, noise) per
    image: the compression's fit, comparable between compressions (same draws)."""
    ids = t2i.add_placeholders(cfg.tokens)
    table = t2i.text_encoder.get_input_embeddings().weight
    saved = table[ids].clone()
    try:
        z = t2i.encode_images(images)
        zm = t2i.encode_images(_mask_images(masks))
        mask_mlp = t2i.load_compression(comp, cfg, zm[0].numel())
        prompt = t2i.class_prompt(cfg)
        context = _context(t2i, prompt.expand(z.shape[0], -1), mask_mlp, zm[torch.arange(len(z)) % len(zm)])
        g = torch.Generator().manual_seed(seed)
        total = 0.0
        for _ in range(draws):
            noise = torch.randn(z.shape, generator=g).to(z)
            t = torch.randint(0, t2i.train_scheduler.config.num_train_timesteps, (z.shape[0],), generator=g)
            z_t = t2i.train_scheduler.add_noise(z, noise, t.to(z.device))
            eps = t2i.unet(z_t, t.to(z.device), encoder_hidden_states=context).sample
            total += float(F.mse_loss(eps.float(), noise.float()))
        return total / draws
    finally:
        table[ids] = saved


def save_compression(comp: ClassCompression, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(comp.tensors(), str(tmp), metadata={"seconds": f"{comp.seconds:.3f}",
                                                  "loss_first": f"{comp.losses[0] if comp.losses else float('nan')}",
                                                  "loss_last": f"{comp.losses[-1] if comp.losses else float('nan')}"})
    os.replace(tmp, path)
    return path


def load_compression(path: Path) -> ClassCompression:
    tensors = load_file(str(path))
    mlp = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("mask_mlp.")}
    return ClassCompression(tensors["embeddings"], mlp)


# -- stage 2: generation -------------------------------------------------------------------------------------------
def _transform_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mask = np.rot90(mask, int(rng.integers(4)))
    if rng.random() < 0.5:
        mask = mask[:, ::-1]
    return np.ascontiguousarray(mask)


@torch.no_grad()
def generate_images(t2i: FrozenTextToImage, comp: ClassCompression, masks: list[np.ndarray], n: int, cfg,
                    cls: str, chunk_dir: Path, out_size: int, log=print) -> list[np.ndarray]:
    """``n`` uint8 images (out_size²) of the class; chunks already in ``chunk_dir`` are reused (resume)."""
    mask_mlp = t2i.load_compression(comp, cfg, t2i.encode_images(_mask_images(masks[:1]))[0].numel())
    cond = t2i.class_prompt(cfg)
    uncond = t2i.prompt_ids("")
    chunk_dir.mkdir(parents=True, exist_ok=True)
    out: list[np.ndarray] = []
    for c, start in enumerate(range(0, n, cfg.chunk)):
        path = chunk_dir / f"chunk{c:05d}.npz"
        count = min(cfg.chunk, n - start)
        if path.is_file():
            out += list(np.load(path)["images"])
            continue
        rng = np.random.default_rng([cfg.seed, zlib.crc32(cls.encode()), c])
        chosen = [_transform_mask(masks[int(rng.integers(len(masks)))], rng) for _ in range(count)]
        z_mask = t2i.encode_images(_mask_images(chosen))
        g = _generator(cfg.seed, cls, 1000 + c)
        shape = (count, t2i.unet.config.in_channels, t2i.unet.config.sample_size, t2i.unet.config.sample_size)
        z = torch.randn(shape, generator=g).to(t2i.device)
        ctx = torch.cat([_context(t2i, uncond.expand(count, -1), mask_mlp, z_mask),
                         _context(t2i, cond.expand(count, -1), mask_mlp, z_mask)])
        t2i.ddim.set_timesteps(cfg.ddim_steps)
        z = z * t2i.ddim.init_noise_sigma
        for t in t2i.ddim.timesteps:
            eps_u, eps_c = t2i.unet(torch.cat([z, z]), t, encoder_hidden_states=ctx).sample.chunk(2)
            z = t2i.ddim.step(eps_u + cfg.guidance * (eps_c - eps_u), t, z).prev_sample
        x = t2i.decode(z)
        if x.shape[-1] != out_size:
            x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", align_corners=False, antialias=True)
        images = (x.permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, images=images)
        os.replace(tmp, path)
        out += list(images)
        log(f"generative replay: {cls}: {min(start + count, n)}/{n} images")
    return out


def replay_class(t2i: FrozenTextToImage, cfg, cls: str, images_uint8: list[np.ndarray], n: int, out_size: int,
                 work_dir: Path, log=print) -> dict[str, Any]:
    """Compress (or reuse the saved compression of) a class and generate its ``n`` replay images.

    Returns the generated images and the costs: compression seconds, generation ms/image, bytes kept."""
    size = t2i.resolution
    x = torch.from_numpy(np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA)
                                   for im in images_uint8])).permute(0, 3, 1, 2).float().div(255)
    masks = class_masks(cfg.mask_dir, cls, images_uint8, size)
    safe = cls.replace("/", "__")
    comp_path = work_dir / f"{safe}.safetensors"
    if comp_path.is_file():
        comp = load_compression(comp_path)
        compress_s, losses = None, []
    else:
        comp = compress_class(t2i, x, masks, cfg, cls)
        save_compression(comp, comp_path)
        compress_s, losses = comp.seconds, comp.losses
        log(f"generative replay: {cls}: compressed in {comp.seconds:.1f} s, loss {losses[0]:.4f} -> "
            f"{np.mean(losses[-max(1, len(losses) // 10):]):.4f}, {comp.nbytes()} bytes kept")
    t0 = time.perf_counter()
    generated = generate_images(t2i, comp, masks, n, cfg, cls, work_dir / f"{safe}.chunks", out_size, log)
    gen_s = time.perf_counter() - t0
    return {"images": generated, "compress_s": compress_s, "generate_ms_per_image": 1e3 * gen_s / max(1, n),
            "bytes": comp_path.stat().st_size, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None}
