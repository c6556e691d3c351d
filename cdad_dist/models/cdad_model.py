"""``CDADModel``: frozen first stage + AMN-conditioned U-Net + empty-prompt context (see docs/contracts.md).

Injection: the AMN output ``c`` is added to the output of ``unet.conv_in`` by a forward hook, so it also enters the
first skip connection (as the authors' ``ControlledUnetModel`` does). A hook, rather than a wrapper module, keeps
every U-Net parameter name identical to diffusers' (pretrained loading, checkpoints and the continual core's name
patterns all rely on them). The hook adds the condition stored for the current ``predict_eps`` call only, so a bare
``unet(...)`` call stays the plain U-Net. The AMN runs once per sample per forward (training) or once per image
(inference), never once per denoising step.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from cdad_dist.errors import ConfigError
from cdad_dist.models.amn import AMN, ATTENTION_BACKENDS
from cdad_dist.models.seg_head import SegmentationHead, head_loss

# "trailing" spacing so that a DDIM built from this config (``DDIMScheduler.from_config``) starts at t=999 exactly;
# it does not affect training (add_noise ignores it).
SCHEDULER_KWARGS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False, steps_offset=1,
                        timestep_spacing="trailing")


def make_schedulers() -> tuple[DDPMScheduler, DDIMScheduler]:
    """SD 1.5 schedule: DDPM for training, DDIM (``set_alpha_to_one=False``) for inference."""
    ddpm = DDPMScheduler(**SCHEDULER_KWARGS)
    ddim = DDIMScheduler(**SCHEDULER_KWARGS, set_alpha_to_one=False)
    return ddpm, ddim


AMN_LOSSES = ("normalized", "mse")
DENOISE_FROM = ("clean", "perturbed")


def amn_feature_loss(c: torch.Tensor, target: torch.Tensor, kind: str = "normalized") -> torch.Tensor:
    """The AMN term ‖E_no(E_lo(x̃)+pos) − E_lo(x)‖².

    ``mse`` is the paper's plain MSE; its scale is the (unbounded) scale of the bias-free local encoder's
    features, so a class whose colours differ from the earlier ones can make it outweigh the ε loss by orders of
    magnitude (measured: 16957 vs 0.99 at the start of a colour task after grey ones). ``normalized`` (default)
    compares the two after standardising each token over its channels (a LayerNorm without affine): every token
    has unit RMS, so the term lies in [0, 4] whatever the images, and it still vanishes exactly when the
    directions agree.
    """
    if kind == "mse":
        return F.mse_loss(c.float(), target.float())
    return F.mse_loss(_standardise_tokens(c), _standardise_tokens(target))


def _standardise_tokens(f: torch.Tensor) -> torch.Tensor:
    """B×C×H×W → B×H×W×C with every token at zero mean / unit RMS over C. The tensor is first divided by its
    global RMS (a detached scalar), so the LayerNorm's ε acts at unit scale: exactly scale-free, even for features
    of 1e-3, and no 1/√ε gradient blow-up on near-constant tokens."""
    f = f.float().movedim(1, -1)
    rms = f.detach().pow(2).mean().sqrt().clamp_min(1e-30)
    return F.layer_norm(f / rms, (f.shape[-1],), eps=1e-5)


class _ConditionInjector:
    """Forward hook on ``conv_in``: adds the pending condition to its output.

    A callable object (not a bound method of the model), so ``copy.deepcopy(model)`` gives the copy its own
    injector instead of one that still writes into the original.
    """

    def __init__(self) -> None:
        self.pending: torch.Tensor | None = None

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor | None:
        c = self.pending
        if c is None:
            return None
        if c.shape[1:] != output.shape[1:] or c.shape[0] not in (1, output.shape[0]):
            raise ConfigError(f"CDADModel: AMN condition of shape {tuple(c.shape)} does not fit the U-Net conv_in "
                              f"output {tuple(output.shape)}")
        return output + c.to(output.dtype)


class CDADModel(nn.Module):
    """Trainable ``unet`` and ``amn``; frozen ``first_stage``; constant ``context`` buffer (1×L×D)."""

    def __init__(self, unet: nn.Module, amn: AMN, first_stage: nn.Module, context: torch.Tensor,
                 lambda_amn: float = 1.0, amn_target_detach: bool = False, amn_loss: str = "normalized",
                 train_t_range: tuple[int, int] | None = None, denoise_from: str = "clean",
                 seg_head: SegmentationHead | None = None):
        super().__init__()
        self.unet = unet
        self.amn = amn
        self.first_stage = first_stage
        self.seg_head = seg_head  # optional (model.seg_head); None keeps every name and checkpoint as before
        if context.ndim != 3 or context.shape[0] != 1:
            raise ConfigError(f"CDADModel: context must be 1×L×D, got {tuple(context.shape)}")
        if context.shape[-1] != unet.config.cross_attention_dim:
            raise ConfigError(f"CDADModel: context width {context.shape[-1]} != U-Net cross_attention_dim "
                              f"{unet.config.cross_attention_dim}")
        if unet.config.in_channels != first_stage.latent_channels:
            raise ConfigError(f"CDADModel: U-Net in_channels {unet.config.in_channels} != first-stage latent "
                              f"channels {first_stage.latent_channels}")
        if amn.cfg.channels != unet.config.block_out_channels[0]:
            raise ConfigError(f"CDADModel: AMN channels {amn.cfg.channels} != U-Net block_out_channels[0] "
                              f"{unet.config.block_out_channels[0]}")
        self.register_buffer("context", context.detach().float().clone())
        self.lambda_amn = float(lambda_amn)
        self.amn_target_detach = bool(amn_target_detach)
        if amn_loss not in AMN_LOSSES:
            raise ConfigError(f"CDADModel: amn_loss must be one of {AMN_LOSSES}, got {amn_loss!r}")
        self.amn_loss = amn_loss
        if denoise_from not in DENOISE_FROM:
            raise ConfigError(f"CDADModel: denoise_from must be one of {DENOISE_FROM}, got {denoise_from!r}")
        self.denoise_from = denoise_from
        self.noise_scheduler, self.ddim_scheduler = make_schedulers()
        T = self.noise_scheduler.config.num_train_timesteps
        lo, hi = train_t_range if train_t_range is not None else (0, T)
        if not 0 <= lo < hi <= T:
            raise ConfigError(f"CDADModel: train_t_range must satisfy 0 <= lo < hi <= {T}, got {train_t_range}")
        self.train_t_range = (int(lo), int(hi))
        self._injector = _ConditionInjector()
        self.unet.conv_in.register_forward_hook(self._injector)

    # ----------------------------------------------------------------- first stage
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.first_stage.encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage.decode(z)

    # ----------------------------------------------------------------- denoiser
    def condition(self, x: torch.Tensor) -> torch.Tensor:
        """AMN condition c = E_no(E_lo(x)+pos) at latent resolution; compute once per image."""
        return self.amn(x)[0]

    @contextmanager
    def _injected(self, c: torch.Tensor | None):
        self._injector.pending = c
        try:
            yield
        finally:
            self._injector.pending = None

    def predict_eps(self, z_t: torch.Tensor, t: torch.Tensor | int, c: torch.Tensor | None) -> torch.Tensor:
        """ε prediction of the U-Net with ``c`` added after ``conv_in`` (``c=None``: the plain U-Net)."""
        b = z_t.shape[0]
        t = torch.as_tensor(t, device=z_t.device)
        t = t.expand(b) if t.ndim == 0 else t
        context = self.context.expand(b, -1, -1).to(z_t.dtype)
        with self._injected(c):
            return self.unet(z_t, t, encoder_hidden_states=context).sample

    def forward(self, image: torch.Tensor, perturbed: torch.Tensor, generator: torch.Generator | None = None,
                synthetic: torch.Tensor | None = None,
                synthetic_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training loss: ε-MSE on the clean latent conditioned on AMN(x̃) + λ·‖E_no(E_lo(x̃)+pos) − E_lo(x)‖²,
        plus, with a segmentation head, its loss on the synthetic anomalies (``synthetic``, ``synthetic_mask``)."""
        z = self.encode(image)
        b = z.shape[0]
        dev = generator.device if generator is not None else z.device
        t = torch.randint(*self.train_t_range, (b,), generator=generator, device=dev).to(z.device)
        noise = torch.randn(z.shape, generator=generator, device=dev, dtype=z.dtype).to(z.device)
        if self.denoise_from == "perturbed":
            # Noise-to-norm (DiffusionAD): noise the perturbed latent, and ask for the ε that leads back to the
            # CLEAN latent, ε* = (z_t − √ᾱ·z)/√(1−ᾱ) (= ε outside the perturbed patch): the denoiser itself learns
            # to replace anomalies by normal content, not only the AMN condition.
            z_t = self.noise_scheduler.add_noise(self.encode(perturbed), noise, t)
            a = self.noise_scheduler.alphas_cumprod.to(z.device)[t].view(b, 1, 1, 1).float()
            eps_target = (z_t.float() - a.sqrt() * z.float()) / (1 - a).sqrt()
        else:
            z_t = self.noise_scheduler.add_noise(z, noise, t)
            eps_target = noise.float()
        local = self.amn.encode_local(torch.cat([perturbed, image]))
        local_pert, local_clean = local[:b], local[b:]
        c = self.amn.encode_nonlocal(local_pert)
        target = local_clean.detach() if self.amn_target_detach else local_clean
        amn_loss = amn_feature_loss(c, target, self.amn_loss)
        eps_loss = F.mse_loss(self.predict_eps(z_t, t, c).float(), eps_target)
        out = {"loss": eps_loss + self.lambda_amn * amn_loss, "eps_loss": eps_loss.detach(),
               "amn_loss": amn_loss.detach()}
        if self.seg_head is not None:
            if synthetic is None or synthetic_mask is None:
                raise ConfigError("CDADModel: the model has a segmentation head, so training batches need "
                                  "'synthetic' images and 'synthetic_mask' (data.synthetic)")
            # Drawn after the diffusion loss's t and noise, so enabling the head leaves those unchanged.
            seg = head_loss(self.head_logits(synthetic, *self.training_reconstruction(synthetic, generator)),
                            synthetic_mask.to(z.device), self.seg_head.cfg)
            out["loss"] = out["loss"] + seg
            out["seg_loss"] = seg.detach()
        return out

    # ----------------------------------------------------------------- segmentation head
    @torch.no_grad()
    def training_reconstruction(self, x: torch.Tensor,
                                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, ẑ) for the head's training: the one-step x̂0 (DiffusionAD) of x noised at t ~ U(seg_head.t_range),
        conditioned by AMN(x) as at test time. No gradient: the head never reaches the U-Net or the AMN."""
        z = self.encode(x)
        b = z.shape[0]
        dev = generator.device if generator is not None else z.device
        t = torch.randint(*self.seg_head.cfg.t_range, (b,), generator=generator, device=dev).to(z.device)
        noise = torch.randn(z.shape, generator=generator, device=dev, dtype=z.dtype).to(z.device)
        z_t = self.noise_scheduler.add_noise(z, noise, t)
        eps = self.predict_eps(z_t, t, self.condition(x)).float()
        a = self.noise_scheduler.alphas_cumprod.to(z.device)[t].view(b, 1, 1, 1).float()
        return z, ((z_t.float() - (1 - a).sqrt() * eps) / a.sqrt()).to(z.dtype)

    def head_logits(self, x: torch.Tensor, z: torch.Tensor, z_hat: torch.Tensor,
                    x_hat: torch.Tensor | None = None) -> torch.Tensor:
        """The head's logits for image x (in [0, 1]) with latent z and reconstructed latent ẑ: on ``[x, x̂]``
        (x̂ = D(ẑ), or the caller's already decoded ``x_hat``; both mapped to [−1, 1]) or on ``[z, ẑ]``. The
        reconstruction is detached whatever the caller passes."""
        z_hat = z_hat.detach()
        if self.seg_head.cfg.input == "latent":
            return self.seg_head(z.detach(), z_hat)
        with torch.no_grad():
            x_hat = (self.decode(z_hat) if x_hat is None else x_hat).float().clamp(0, 1)
        return self.seg_head(x.float() * 2 - 1, x_hat.detach() * 2 - 1)

    def head_map(self, x: torch.Tensor, z: torch.Tensor, z_hat: torch.Tensor,
                 x_hat: torch.Tensor | None = None) -> torch.Tensor:
        """Anomaly probability per pixel (B×1×H×W float32 at the image size) from the head."""
        p = torch.sigmoid(self.head_logits(x, z, z_hat, x_hat).float())
        if p.shape[-2:] != x.shape[-2:]:
            p = F.interpolate(p, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return p

    # ----------------------------------------------------------------- bookkeeping
    def protected_modules(self) -> dict[str, nn.Module]:
        """Every ``nn.Linear``/``nn.Conv2d`` of ``unet``, ``amn`` and the head by qualified name (``unet.…``,
        ``amn.…``, ``seg_head.…``)."""
        out: dict[str, nn.Module] = {}
        for prefix in self._trained_parts():
            for name, mod in getattr(self, prefix).named_modules():
                if isinstance(mod, (nn.Linear, nn.Conv2d)):
                    out[f"{prefix}.{name}"] = mod
        return out

    def _trained_parts(self) -> tuple[str, ...]:
        return ("unet", "amn") + (("seg_head",) if self.seg_head is not None else ())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for part in self._trained_parts() for p in getattr(self, part).parameters() if p.requires_grad]

    def clip_groups(self, params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
        """``params`` split into the diffusion model's and the head's, clipped separately so that the head's
        gradient norm never rescales the diffusion model's step."""
        if self.seg_head is None:
            return [params]
        head = {id(p) for p in self.seg_head.parameters()}
        groups = [[p for p in params if id(p) not in head], [p for p in params if id(p) in head]]
        return [g for g in groups if g]

    def train(self, mode: bool = True) -> CDADModel:
        super().train(mode)
        self.first_stage.train(False)
        return self

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Activation checkpointing for the U-Net blocks and the AMN transformer layers."""
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()
        self.amn.gradient_checkpointing = enabled

    def set_attention_backend(self, backend: str) -> None:
        """``sdpa`` (torch) or ``xformers`` for both the AMN and the U-Net."""
        if backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"CDADModel: attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        if backend == "xformers":
            try:
                import xformers  # noqa: F401
            except ImportError as exc:
                raise ConfigError("CDADModel: attention_backend='xformers' but xformers is not installed "
                                  "(pip install xformers, or use 'sdpa')") from exc
            self.unet.enable_xformers_memory_efficient_attention()
        else:
            from diffusers.models.attention_processor import AttnProcessor2_0

            self.unet.set_attn_processor(AttnProcessor2_0())
        self.amn.set_attention_backend(backend)

    def set_first_stage_dtype(self, dtype: torch.dtype) -> None:
        """Cast the frozen first stage to the compute dtype (trainable weights stay fp32)."""
        if hasattr(self.first_stage, "set_dtype"):
            self.first_stage.set_dtype(dtype)
