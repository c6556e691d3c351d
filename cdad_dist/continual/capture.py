"""Capture of protected-layer inputs with forward hooks, streamed straight into per-layer sketches.

Each hook turns the layer's input into a block d × m (a conv's input through ``F.unfold`` with the layer's own
kernel/stride/padding/dilation, so that ``weight.view(out, -1) @ block`` is the conv output), optionally keeps a
seeded random subset of its columns, and feeds it to that layer's sketch at once; raw activations of all layers
are never held together.

With layer ownership (``OwnerExchange``, several ranks) the sketch of a summed layer (Gram: d² floats however many
columns) exists on its owner only: at every hook call all ranks gather their blocks on the owner, which feeds them
to the sketch in rank order. Merged sketches (iSVD: small, d × (r + buffer), but its folds are the capture's
dearest compute) stay on every rank, so their folds run in parallel, and are merged on the owner afterwards.
The ranks run their capture forwards in lockstep (``lockstep_batches``: a rank out of images runs its last batch again, contributing
no columns), so every rank makes the same collectives in the same order. Per rank, the sketch memory is the owned
layers' share plus one layer's gathered blocks in flight.
"""
from __future__ import annotations

import dataclasses

import zlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdad_dist.continual.config import CaptureConfig  # noqa: F401  (re-exported)
from cdad_dist.continual.sketches import Sketch
from cdad_dist.errors import ConfigError

_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def layer_input_block(module: nn.Module, x: Tensor) -> Tensor:
    """The layer input as a d × m matrix whose columns are what the weight (out × d) multiplies."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).mT
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:  # unbatched conv input C × H × W
            x = x.unsqueeze(0)
        x = _pad_like_conv(module, x)
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=0, stride=module.stride)
        return cols.permute(1, 0, 2).reshape(cols.shape[1], -1)  # (C·kh·kw) × (B·L)
    raise ConfigError(f"continual: cannot capture inputs of {type(module).__name__}")


def _pad_like_conv(module: nn.Conv2d, x: Tensor) -> Tensor:
    """Apply the conv's own padding (int, 'same' or 'valid'; any padding_mode) so unfold can use padding=0."""
    if module.padding == "valid":
        return x
    if module.padding == "same":
        pads = []
        for k, dil in zip(reversed(module.kernel_size), reversed(module.dilation)):
            total = dil * (k - 1)
            pads += [total // 2, total - total // 2]
    else:
        ph, pw = module.padding
        pads = [pw, pw, ph, ph]
    if not any(pads):
        return x
    return F.pad(x, pads, mode=_PAD_MODES[module.padding_mode])


def _layer_seed(seed: int, rank: int, name: str) -> int:
    """Stable per-(run seed, rank, layer) seed; Python's hash() is salted per process, crc32 is not."""
    return (seed * 1_000_003 + rank * 7919 + zlib.crc32(name.encode())) % (2 ** 63)


class FeatureCapture:
    """Context manager: forward hooks that sketch each protected layer's input as it is computed."""

    def __init__(self, layers: dict[str, nn.Module], sketches: dict[str, Sketch],
                 max_columns: int | None = None, seed: int = 0, rank: int = 0,
                 sketch_device: torch.device | str | None = None, exchange: OwnerExchange | None = None) -> None:
        missing = set(layers) - set(sketches)
        if missing:
            raise ConfigError(f"FeatureCapture: no sketch for layers {sorted(missing)[:5]}")
        self.layers, self.sketches = layers, sketches
        self.max_columns = max_columns
        self.sketch_device = torch.device(sketch_device) if sketch_device is not None else None
        self._generators = {name: torch.Generator().manual_seed(_layer_seed(seed, rank, name)) for name in layers}
        self._handles: list = []
        self.calls = {name: 0 for name in layers}
        self.exchange = exchange
        self.contributing = True  # False: a lockstep filler forward (this rank ran out of images)

    def __enter__(self) -> FeatureCapture:
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            x = args[0] if args else kwargs["input"]
            # The capture pass may run under torch.inference_mode (it reuses evaluation code); the sketches must
            # hold ordinary tensors, since they are all-reduced and updated in place afterwards.
            with torch.inference_mode(False):
                block = self.subsample(name, layer_input_block(module, x.detach().clone()))
                if not self.contributing:
                    block = block[:, :0]
                if self.exchange is not None and self.exchange.streams(name):
                    self.exchange.deliver(name, block, self.sketches[name], self.sketch_device)
                else:
                    if self.sketch_device is not None:
                        block = block.to(self.sketch_device)
                    self.sketches[name].update(block)  # the sketch casts to its own compute dtype
            self.calls[name] += 1
        return hook

    def subsample(self, name: str, block: Tensor) -> Tensor:
        """Keep a seeded random subset of at most ``max_columns`` columns (in their original order)."""
        m = block.shape[1]
        if self.max_columns is None or m <= self.max_columns:
            return block
        keep = torch.randperm(m, generator=self._generators[name])[: self.max_columns].sort().values
        return block.index_select(1, keep.to(block.device))


class OwnerExchange:
    """Streams every rank's blocks of a layer into the sketch on the layer's owner (see the module docstring).

    Two collectives per hook call: an all-gather of the column counts, then a gather of the (zero-padded) blocks on
    the owner. The owner feeds rank 0's columns first, then rank 1's, …; only it ever allocates the layer's sketch.
    """

    def __init__(self, owners: dict[str, int], rank: int, world: int, group=None,
                 streamed: set[str] | None = None) -> None:
        from cdad_dist.continual.reducer import comm_device

        self.owners, self.rank, self.world, self.group = owners, rank, world, group
        self.streamed = set(owners) if streamed is None else set(streamed)
        self.device = comm_device(group)  # once: the hooks below run at every layer call
        self.inflight_peak_bytes = 0  # the largest set of gathered blocks held at once (on an owner)
        self.sent_bytes = 0

    def streams(self, name: str) -> bool:
        """Whether the layer's columns go to its owner (else this rank sketches them and the reducer merges)."""
        return name in self.streamed

    def deliver(self, name: str, block: Tensor, sketch: Sketch, sketch_device: torch.device | None) -> None:
        import torch.distributed as dist

        device = self.device
        width = torch.tensor([block.shape[1]], dtype=torch.int64, device=device)
        widths = [torch.zeros_like(width) for _ in range(self.world)]
        dist.all_gather(widths, width, group=self.group)
        widths_list = [int(w) for w in widths]
        most = max(widths_list)
        if most == 0:
            return
        owner = self.owners[name]
        padded = torch.zeros(block.shape[0], most, dtype=torch.float32, device=device)
        padded[:, : block.shape[1]] = block.to(device=device, dtype=torch.float32)
        dst = owner if self.group is None else dist.get_global_rank(self.group, owner)
        if self.rank != owner:
            dist.gather(padded, None, dst=dst, group=self.group)
            self.sent_bytes += padded.numel() * padded.element_size()
            return
        received = [torch.empty_like(padded) for _ in range(self.world)]
        dist.gather(padded, received, dst=dst, group=self.group)
        self.inflight_peak_bytes = max(self.inflight_peak_bytes, self.world * padded.numel() * padded.element_size())
        for r, w in enumerate(widths_list):
            if w:
                part = received[r][:, :w]
                sketch.update(part.to(sketch_device) if sketch_device is not None else part)


def lockstep_batches(batches, capture: FeatureCapture):
    """Yield this rank's batches while any rank still has one; a rank out of batches repeats its last one (or
    another rank's first, if it had none) with ``capture.contributing = False``, so every rank runs the same
    forwards and hook collectives. Without an exchange the batches pass through unchanged."""
    if capture.exchange is None:
        yield from batches
        return
    import torch.distributed as dist

    world, device, group = capture.exchange.world, capture.exchange.device, capture.exchange.group
    iterator = iter(batches)
    template = None
    try:
        while True:
            batch = next(iterator, None)
            mine = torch.tensor([batch is not None, batch is not None or template is not None], dtype=torch.int64,
                                device=device)
            flags = [torch.zeros_like(mine) for _ in range(world)]
            dist.all_gather(flags, mine, group=group)
            have = [int(f[0]) for f in flags]
            if not any(have):
                return
            if not all(int(f[1]) for f in flags):  # some rank has never had a batch: lend it one (all ranks call)
                src = have.index(1)
                box = [batch if capture.exchange.rank == src else None]
                dist.broadcast_object_list(box, src=src if group is None else dist.get_global_rank(group, src),
                                           group=group)
                if template is None and batch is None:
                    template = box[0]
            if batch is not None:
                template = batch
                capture.contributing = True
                yield batch
            else:
                capture.contributing = False
                yield template
    finally:
        capture.contributing = True


# -- which images feed the capture pass ---------------------------------------------------------------------------

def make_capture_forward(model: nn.Module, cfg: CaptureConfig, reconstruction=None,
                         device: torch.device | str | None = None) -> Callable[[dict], None]:
    """A ``capture_forward(batch)`` for the CDAD model API (encode / condition / predict_eps / noise_scheduler).

    trajectory: the evaluation's reconstruction (``reconstruction``: a DDIM from the start timestep with
    ``ddim_steps`` steps, or the one_step / fused calls), through the same code as evaluation; random_t: ``random_timesteps`` independent
    noisings at uniform t. The AMN condition is computed once per image. A batch with "perturbed" images (and
    ``cfg.perturbed``) is passed a second time as training sees it. Noise and timesteps come from one generator
    per image, seeded by (seed, the clean image's pixels) and used for both passes: an image's captured inputs
    do not depend on its batch, its rank or the number of ranks.

    A batch with synthetic anomalies ("synthetic": the engine adds them for a segmentation head, whose training
    inputs they are, or for ``cfg.synthetic``) gets a pass of their own, and the U-Net and AMN inputs of that
    pass are captured: an old class's maps rest on the reconstructions of its *anomalous* inputs staying what
    they were. With a head (``model.seg_head``) the head runs on each pass's input and reconstruction, as at
    test time.
    """
    from cdad_dist.eval.reconstruct import (ReconstructionConfig, image_generators, per_image_randn,
                                            reconstruct_latent, x0_from_eps)

    recon = reconstruction or ReconstructionConfig()
    # The forward passes of test time: a DDIM run gets `ddim_steps` steps from its start; one_step / fused runs
    # are captured through their own U-Net calls (a DDIM from t=999 would protect inputs the model never sees).
    trajectory = dataclasses.replace(recon, steps=cfg.ddim_steps) if recon.mode == "ddim" else recon
    num_train = int(model.noise_scheduler.config.num_train_timesteps)

    def to_device(x: torch.Tensor) -> torch.Tensor:
        return x.to(device) if device is not None else x

    @torch.no_grad()
    def capture_forward(batch: dict) -> None:
        generators = image_generators(cfg.seed, batch["image"])
        x = to_device(batch["image"])
        z0 = model.encode(x)
        head = getattr(model, "seg_head", None) is not None
        z_hat = run_passes(z0, model.condition(x), generators)
        if head:
            model.head_logits(x, z0, z_hat)
        if cfg.perturbed and "perturbed" in batch:  # the inputs training shows the network (CaptureConfig)
            x_tilde = to_device(batch["perturbed"])
            z_tilde = model.encode(x_tilde) if getattr(model, "denoise_from", "clean") == "perturbed" else z0
            z_hat = run_passes(z_tilde, model.condition(x_tilde), generators)
            if head:
                model.head_logits(x_tilde, z_tilde, z_hat)
        if "synthetic" in batch:
            x_syn = to_device(batch["synthetic"])
            z_syn = model.encode(x_syn)
            z_hat = run_passes(z_syn, model.condition(x_syn), generators)
            if head:
                model.head_logits(x_syn, z_syn, z_hat)

    def run_passes(z0: torch.Tensor, c: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """The passes of one input; returns the last pass's reconstructed latent (for the head)."""
        if cfg.mode == "trajectory":
            # A DDIM run is `ddim_steps` U-Net calls; a one_step / fused run is one, so it is repeated with
            # `ddim_steps` noise draws at its own t (as many captured inputs per image as a DDIM run).
            for _ in range(1 if trajectory.mode == "ddim" else cfg.ddim_steps):
                z_hat = reconstruct_latent(model, z0, c, trajectory, generators)
            return z_hat
        lo, hi = getattr(model, "train_t_range", (0, num_train))  # the noise levels it trained on
        for _ in range(cfg.random_timesteps):
            noise = per_image_randn(z0, generators)
            t = torch.cat([torch.randint(lo, hi, (1,), generator=g) for g in generators]).to(z0.device)
            z_t = model.noise_scheduler.add_noise(z0, noise, t)
            eps = model.predict_eps(z_t, t, c)
        # x̂0 of the last draw, image by image (t differs per image)
        return torch.stack([x0_from_eps(model.noise_scheduler, z_t[i:i + 1], eps[i:i + 1], int(t[i]))[0]
                            for i in range(z0.shape[0])])

    return capture_forward
