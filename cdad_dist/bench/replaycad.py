"""``cdad bench replaycad``: what generative replay (ReplayCAD) costs — compression s/class, generation ms/image,
bytes kept per class — measured on a random-weight text-to-image pipeline in real diffusers format.

These machines have no pretrained text-to-image model, so the *quality* of generated replay cannot be measured
here (a random U-Net generates noise); the costs can, and they are what a user plans with. Measured: one class of
the demo data (its training images at the generator's resolution) compressed with ``steps`` embedding-learning
steps, then ``images`` generated with DDIM ``ddim_steps`` and classifier-free guidance, on a small random pipeline
(``write_random_t2i``: CLIP text encoder, U-Net and VAE of reduced width). The bytes a class keeps are computed
for the real shapes as well (K tokens × the text width plus the mask MLP: SD 1.5 with 768-wide CLIP on a 4×64×64
mask latent; CompVis LDM-f8 with 1280-wide BERT on 4×32×32), since they depend on the shapes only.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdad_dist.continual.config import GenerativeReplayConfig
from cdad_dist.continual.generative_replay import MaskTokens, FrozenTextToImage, replay_class

REAL_SHAPES = {"sd15": {"context_dim": 768, "mask_latent": (4, 64, 64)},
               "ldm_f8": {"context_dim": 1280, "mask_latent": (4, 32, 32)}}


def write_random_t2i(root: str | Path, *, width: int = 32, sample_size: int = 8, max_length: int = 40,
                     seed: int = 0) -> Path:
    """A random-weight text-to-image pipeline saved as a diffusers folder (text_encoder, tokenizer with a
    one-letter BPE vocabulary, unet, vae with factor 2, scheduler), for tests and cost benchmarks."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"),
                  model_max_length=max_length).save_pretrained(root / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width,
                                     num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=max_length,
                                     bos_token_id=0, eos_token_id=1, pad_token_id=1)).save_pretrained(
            root / "text_encoder")
        UNet2DConditionModel(sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(width, width),
                             layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=width,
                             attention_head_dim=2, norm_num_groups=8).save_pretrained(root / "unet")
        AutoencoderKL(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                      sample_size=2 * sample_size).save_pretrained(root / "vae")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        root / "scheduler")
    return root


def kept_bytes(tokens: int, mask_tokens: int, context_dim: int, mask_latent: tuple[int, int, int]) -> int:
    """Bytes (fp32) one class keeps: K embeddings plus the mask MLP for these shapes."""
    mlp = MaskTokens(int(np.prod(mask_latent)), mask_tokens, context_dim) if mask_tokens else None
    return 4 * (tokens * context_dim + (sum(p.numel() for p in mlp.parameters()) if mlp else 0))


@dataclass
class ReplayCadBenchConfig:
    steps: int = 300
    images: int = 16
    ddim_steps: int = 50
    train_images: int = 16
    width: int = 64
    sample_size: int = 16

    @classmethod
    def quick(cls) -> ReplayCadBenchConfig:
        return cls(steps=30, images=4, ddim_steps=10, train_images=8, width=32, sample_size=8)


def run(quick: bool, out_dir=None, *, cfg: ReplayCadBenchConfig | None = None, log=print) -> dict[str, Any]:
    from cdad_dist.data.demo import make_demo_dataset

    cfg = cfg or (ReplayCadBenchConfig.quick() if quick else ReplayCadBenchConfig())
    work = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="replaycad-"))
    work.mkdir(parents=True, exist_ok=True)
    generator = write_random_t2i(work / "generator", width=cfg.width, sample_size=cfg.sample_size)
    demo = work / "demo_data"
    if not demo.exists():
        make_demo_dataset(demo, classes=["bottle"], n_train=cfg.train_images, n_test_good=1, n_test_bad=1)
    import cv2

    files = sorted((demo / "bottle" / "train" / "good").glob("*.png"))[: cfg.train_images]
    images = [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files]
    gen = GenerativeReplayConfig(generator_path=str(generator), steps=cfg.steps, ddim_steps=cfg.ddim_steps,
                                 chunk=max(1, cfg.images // 2))
    t2i = FrozenTextToImage(generator)
    t0 = time.perf_counter()
    out_work = work / f"gen-{int(t0)}"
    result = replay_class(t2i, gen, "demo/bottle", images, cfg.images, 128, out_work, log=lambda *_: None)
    real = {name: kept_bytes(gen.tokens, gen.mask_tokens, s["context_dim"], s["mask_latent"])
            for name, s in REAL_SHAPES.items()}
    summary = (f"replaycad (random {cfg.width}-wide pipeline, {t2i.resolution} px, {torch.get_num_threads()} CPU "
               f"thread(s)): compression {result['compress_s']:.1f} s/class ({cfg.steps} steps, loss "
               f"{result['loss_first']:.3f} -> {result['loss_last']:.3f}), generation "
               f"{result['generate_ms_per_image']:.0f} ms/image (DDIM-{cfg.ddim_steps}, CFG), kept "
               f"{result['bytes']} B/class here; at real shapes K={gen.tokens}: SD 1.5 {real['sd15'] / 1e3:.1f} kB, "
               f"LDM-f8 {real['ldm_f8'] / 1e3:.1f} kB per class. Generated-image quality needs a pretrained "
               "generator: not measurable here")
    log(summary)
    return {"config": asdict(cfg), "resolution": t2i.resolution, **{k: v for k, v in result.items() if k != "images"},
            "kept_bytes_real_shapes": real, "summary": summary}
