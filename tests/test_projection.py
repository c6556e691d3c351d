"""Capture, layer discovery and projection: the old tasks' input space is kept, under AdamW and under DDP."""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cdad_dist.continual.capture import (CaptureConfig, FeatureCapture, layer_input_block, local_count,
                                         select_capture_batches)
from cdad_dist.continual.layers import LayerPatterns, discover_protected, input_dim
from cdad_dist.continual.projector import Projector, project_rows
from cdad_dist.continual.strategy import (CDADStrategy, ContinualConfig, JointStrategy, NaiveStrategy,
                                          build_strategy)
from cdad_dist.errors import CheckpointError, ConfigError, CdadError
from dist_utils import run_distributed

GAMMA = 0.999


class Net(nn.Module):
    """Small conv + linear net: two convs (one strided, reflect-padded), a norm, two linears."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, padding_mode="reflect")
        self.norm = nn.GroupNorm(2, 8)
        self.fc1 = nn.Linear(8 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv1(x))
        h = self.norm(F.silu(self.conv2(h)))
        return self.fc2(F.silu(self.fc1(h.flatten(1))))


def smooth_images(n: int, seed: int) -> torch.Tensor:
    """Task-0 images: smooth (upsampled 2×2 grids), so their 3×3 patches span a low-dimensional space."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 2, 2, generator=g)
    return F.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=True)


def noisy_images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def batches_of(images: torch.Tensor, size: int = 8) -> list[dict]:
    return [{"image": images[i:i + size], "key": [f"k{i + j}" for j in range(len(images[i:i + size]))]}
            for i in range(0, len(images), size)]


class Recorder:
    """Stands in for a sketch: keeps every block (the test needs the raw task-0 features X_old)."""

    def __init__(self) -> None:
        self.blocks: list[torch.Tensor] = []

    def update(self, block: torch.Tensor) -> None:
        self.blocks.append(block.detach().double().clone())

    def matrix(self) -> torch.Tensor:
        return torch.cat(self.blocks, dim=1)


def record_inputs(net: nn.Module, layers: dict, batches: list[dict]) -> dict[str, torch.Tensor]:
    recorders = {name: Recorder() for name in layers}
    with FeatureCapture(layers, recorders), torch.no_grad():
        for batch in batches:
            net(batch["image"])
    return {name: r.matrix() for name, r in recorders.items()}


def train(net: nn.Module, model_for_loss: nn.Module, strategy, optimizer, images: torch.Tensor, steps: int,
          seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    targets = torch.randn(len(images), 5, generator=g)
    for step in range(steps):
        idx = torch.randint(0, len(images), (8,), generator=g)
        loss = F.mse_loss(model_for_loss(images[idx]), targets[idx])
        optimizer.zero_grad()
        loss.backward()
        strategy.before_optimizer_step(net)
        optimizer.step()
        strategy.after_optimizer_step(net)


def make_optimizer(kind: str, net: nn.Module):
    params = [p for p in net.parameters() if p.requires_grad]
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05)
    return torch.optim.SGD(params, lr=5e-2, momentum=0.9)


def leak_and_bound(strategy: CDADStrategy, layers: dict, start: dict, x_old: dict) -> dict[str, dict]:
    """Per layer: ‖ΔW·U‖/‖ΔW‖ and the old-output change ‖ΔW·X_old‖ against its bound."""
    out = {}
    for name, module in layers.items():
        U = strategy.store.basis(name, torch.float64)  # U even where the store keeps its complement
        dW = (module.weight.detach().double() - start[name]).reshape(module.weight.shape[0], -1)
        X = x_old[name]
        out[name] = {"k": U.shape[1], "d": U.shape[0], "dW": float(dW.norm()),
                     "leak": float((dW @ U).norm()) / float(dW.norm()),
                     "moved": float((dW @ X).norm()),
                     "bound": (GAMMA_SLACK + 1e-3) * float(X.norm()) * float(torch.linalg.matrix_norm(dW, ord=2))}
    return out


GAMMA_SLACK = (1 - GAMMA) ** 0.5


def continual_run(project: str, optimizer_kind: str, ddp: bool = False) -> dict:
    """Task 0 (free) → end_task (capture + bases) → task 1 with projection. Returns per-layer checks."""
    torch.manual_seed(0)
    rank = torch.distributed.get_rank() if ddp else 0
    world = torch.distributed.get_world_size() if ddp else 1
    net = Net()
    cfg = ContinualConfig(project=project, gamma=GAMMA, capture=CaptureConfig(images=1.0, seed=3))
    strategy = CDADStrategy(cfg)
    old = smooth_images(32, seed=10 + rank)  # each rank has its own shard of task 0
    new = noisy_images(32, seed=20 + rank)

    def wrapped():
        return nn.parallel.DistributedDataParallel(net) if ddp else net

    strategy.begin_task(0, net)
    model = wrapped()
    train(net, model, strategy, make_optimizer(optimizer_kind, net), old, steps=10, seed=1)
    del model
    gc.collect()
    strategy.end_task(0, net, batches_of(old), lambda batch: net(batch["image"]))
    layers = strategy.protected_layers(net)
    x_old = record_inputs(net, layers, batches_of(old))
    if ddp:  # X_old is the union of both ranks' task-0 features
        for name, X in x_old.items():
            parts = [torch.empty_like(X) for _ in range(world)]
            torch.distributed.all_gather(parts, X)
            x_old[name] = torch.cat(parts, dim=1)
    start = {name: m.weight.detach().double().clone() for name, m in layers.items()}
    strategy.begin_task(1, net)
    frozen = sorted(n for n, p in net.named_parameters() if not p.requires_grad)
    model = wrapped()
    train(net, model, strategy, make_optimizer(optimizer_kind, net), new, steps=25, seed=2)
    checks = leak_and_bound(strategy, layers, start, x_old)
    weights = torch.cat([m.weight.detach().flatten() for m in layers.values()])
    return {"checks": checks, "frozen": frozen, "digest": strategy.history[-1]["digest"],
            "weights": weights, "history": strategy.history}


def assert_protected(checks: dict[str, dict]) -> None:
    for name, c in checks.items():
        assert 0 < c["k"] < c["d"], f"{name}: test data must give a proper subspace, k={c['k']} d={c['d']}"
        assert c["dW"] > 1e-3, f"{name}: the layer did not train"
        assert c["leak"] < 1e-5, f"{name}: ‖ΔW·U‖/‖ΔW‖ = {c['leak']:.2e}"
        assert c["moved"] <= c["bound"], f"{name}: old outputs moved {c['moved']:.3e} > bound {c['bound']:.3e}"


FROZEN = ["conv1.bias", "conv2.bias", "fc1.bias", "fc2.bias", "norm.bias", "norm.weight"]


def test_update_projection_holds_under_adamw_with_weight_decay():
    result = continual_run("update", "adamw")
    assert_protected(result["checks"])
    assert result["frozen"] == FROZEN


def test_grad_projection_holds_under_sgd():
    assert_protected(continual_run("grad", "sgd")["checks"])


def test_grad_projection_is_broken_by_adamw():
    """Why ``update`` is the default: Adam's element-wise scaling and decoupled decay leave span(U)⊥."""
    checks = continual_run("grad", "adamw")["checks"]
    assert max(c["leak"] for c in checks.values()) > 1e-3


def _ddp_run(project: str, optimizer_kind: str) -> dict:
    result = continual_run(project, optimizer_kind, ddp=True)
    result["weights"] = result["weights"].numpy()
    return result


@pytest.mark.distributed
@pytest.mark.parametrize("project,optimizer_kind", [("update", "adamw"), ("grad", "sgd")])
def test_projection_under_ddp_two_processes(project, optimizer_kind):
    r0, r1 = run_distributed(_ddp_run, world_size=2, args=(project, optimizer_kind), timeout=90)
    assert r0["digest"] == r1["digest"]  # bit-identical bases on both ranks
    assert (r0["weights"] == r1["weights"]).all()  # and identical weights after projected training
    assert_protected(r0["checks"])
    assert r0["frozen"] == FROZEN


# -- capture -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 4, 3, padding=1),
    nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2, padding_mode="reflect"),
    nn.Conv2d(3, 4, (3, 2), padding="same", padding_mode="replicate"),
    nn.Conv2d(3, 4, (1, 3), stride=(1, 2), padding="valid"),
    nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular", bias=False),
])
def test_conv_block_times_weight_is_the_conv_output(conv):
    x = torch.randn(2, 3, 7, 9)
    block = layer_input_block(conv, x)
    assert block.shape[0] == input_dim(conv)
    y = conv(x) - (conv.bias.view(1, -1, 1, 1) if conv.bias is not None else 0)
    expected = y.permute(1, 0, 2, 3).reshape(conv.out_channels, -1)
    assert torch.allclose(conv.weight.reshape(conv.out_channels, -1) @ block, expected, atol=1e-5)


def test_linear_block_is_tokens_as_columns():
    lin = nn.Linear(6, 3, bias=False)
    x = torch.randn(2, 5, 6)
    block = layer_input_block(lin, x)
    assert block.shape == (6, 10)
    assert torch.allclose(lin.weight @ block, lin(x).reshape(-1, 3).mT, atol=1e-6)


def test_column_subsampling_is_seeded_and_bounded():
    net = Net()
    layers = discover_protected(net, LayerPatterns())
    x = noisy_images(4, 0)

    def capture(seed: int) -> dict[str, torch.Tensor]:
        recorders = {name: Recorder() for name in layers}
        with FeatureCapture(layers, recorders, max_columns=20, seed=seed), torch.no_grad():
            net(x)
        return {n: r.matrix() for n, r in recorders.items()}

    a, b, c = capture(1), capture(1), capture(2)
    assert a["conv1"].shape == (27, 20) and a["fc1"].shape == (128, 4)  # conv: 4·64 columns cut to 20
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["conv1"], c["conv1"])
    full = layer_input_block(net.conv1, x).double()
    assert all(any(torch.equal(col, f) for f in full.mT) for col in a["conv1"].mT)  # real columns


def test_hooks_are_removed_after_capture():
    net = Net()
    layers = discover_protected(net, LayerPatterns())
    recorders = {name: Recorder() for name in layers}
    with FeatureCapture(layers, recorders):
        net(noisy_images(1, 0))
    net(noisy_images(1, 0))
    assert all(len(r.blocks) == 1 for r in recorders.values())


def test_capture_sampling_fraction_count_and_ranks():
    batches = batches_of(noisy_images(40, 0), size=8)
    keys = lambda bs: [k for b in bs for k in b["key"]]  # noqa: E731
    frac = list(select_capture_batches(batches, CaptureConfig(images=0.5, seed=1)))
    assert 8 < len(keys(frac)) < 32
    assert keys(frac) == keys(select_capture_batches(batches, CaptureConfig(images=0.5, seed=1)))
    assert all(b["image"].shape[0] == len(b["key"]) for b in frac)
    counted = [list(select_capture_batches(batches[r::2], CaptureConfig(images=7, seed=1), rank=r, world=2))
               for r in range(2)]
    assert [len(keys(c)) for c in counted] == [4, 3] == [local_count(7, r, 2) for r in range(2)]
    assert len(set(keys(counted[0])) | set(keys(counted[1]))) == 7
    assert len(list(select_capture_batches(batches, CaptureConfig(images=1.0)))) == len(batches)
    for bad in ({"images": 0}, {"images": 1.5}, {"images": True}, {"mode": "all"}, {"max_columns_per_block": 0}):
        with pytest.raises(ConfigError):
            CaptureConfig(**bad)


# -- layers, config, strategy plumbing ----------------------------------------------------------------------------

def test_layer_patterns_select_and_errors():
    net = Net()
    assert list(discover_protected(net, LayerPatterns())) == ["conv1", "conv2", "fc1", "fc2"]
    assert list(discover_protected(net, LayerPatterns(include=["fc*"], exclude=["fc2"]))) == ["fc1"]
    with pytest.raises(ConfigError, match="match no"):
        discover_protected(net, LayerPatterns(include=["unet.*"]))
    with pytest.raises(ConfigError):
        LayerPatterns(include="fc*")
    mha = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8), nn.Conv2d(4, 4, 3, groups=2))
    assert list(discover_protected(mha, LayerPatterns())) == ["1"]


def test_config_validation_and_factory():
    assert isinstance(build_strategy(ContinualConfig(strategy="naive")), NaiveStrategy)
    assert isinstance(build_strategy({"strategy": "joint"}), JointStrategy)
    cdad = build_strategy({"strategy": "cdad", "capture": {"images": 5}, "layer_patterns": {"include": ["fc*"]}})
    assert isinstance(cdad, CDADStrategy) and cdad.cfg.capture.images == 5
    for bad in ({"strategy": "ewc"}, {"sketch": "exact"}, {"project": "both"}, {"gamma": 2.0},
                {"paper_faithful": True, "sketch": "gram"}, {"basis_dtype": "int8"}, {"nonsense": 1},
                {"capture": {"bogus": 1}}):
        with pytest.raises(ConfigError):
            ContinualConfig.from_dict(bad)


def test_state_dict_resumes_the_bases():
    net = Net()
    strategy = CDADStrategy(ContinualConfig(capture=CaptureConfig(images=1.0)))
    strategy.begin_task(0, net)
    strategy.end_task(0, net, batches_of(smooth_images(16, 0)), lambda b: net(b["image"]))
    with pytest.raises(CdadError, match="again"):
        strategy.end_task(0, net, [], lambda b: None)
    state = strategy.state_dict()
    resumed = CDADStrategy(ContinualConfig())
    resumed.load_state_dict(state)
    assert resumed.tasks_done == 1 and resumed.history == strategy.history
    assert all(torch.equal(resumed.store.bases[n], U) for n, U in strategy.store.bases.items())
    with pytest.raises(CheckpointError, match="naive"):
        resumed.load_state_dict(NaiveStrategy().state_dict())
    with pytest.raises(CheckpointError):
        resumed.load_state_dict({**state, "format": "old"})
    # the resumed strategy projects exactly like the original would
    resumed.begin_task(1, net)
    w = net.fc1.weight.detach().clone()
    resumed.before_optimizer_step(net)
    with torch.no_grad():
        net.fc1.weight.add_(torch.randn_like(net.fc1.weight))
    resumed.after_optimizer_step(net)
    U = resumed.store.basis("fc1")
    assert float(((net.fc1.weight.detach() - w) @ U).norm()) < 1e-5


def test_backends_where_projection_would_silently_fail_are_refused():
    class FakeAccelerator:
        def __init__(self, kind: str) -> None:
            self.distributed_type = kind

    net = Net()
    with pytest.raises(ConfigError, match="DeepSpeed"):
        CDADStrategy(ContinualConfig(project="update")).begin_task(0, net, FakeAccelerator("DistributedType.DEEPSPEED"))
    with pytest.raises(ConfigError, match="FSDP"):
        CDADStrategy(ContinualConfig(project="grad")).begin_task(0, net, FakeAccelerator("FSDP"))
    CDADStrategy(ContinualConfig(project="grad")).begin_task(0, net, FakeAccelerator("DEEPSPEED"))
    CDADStrategy(ContinualConfig()).begin_task(0, net, FakeAccelerator("MULTI_GPU"))


def test_projector_never_needs_uut_and_checks_shapes():
    U, _ = torch.linalg.qr(torch.randn(12, 4))
    M = torch.randn(5, 12)
    assert torch.allclose(project_rows(M, U), M @ (torch.eye(12) - U @ U.mT), atol=1e-6)
    with pytest.raises(ConfigError, match="fc1"):
        Projector({"fc1": nn.Linear(10, 3)}, {"fc1": U}, "update")
    with pytest.raises(ConfigError):
        Projector({}, {}, "both")


def test_paper_faithful_strategy_uses_paper_isvd_and_eq6():
    net = Net()
    strategy = CDADStrategy(ContinualConfig(paper_faithful=True, capture=CaptureConfig(images=1.0)))
    for task, images in enumerate((smooth_images(16, 0), noisy_images(16, 1))):
        strategy.begin_task(task, net)
        strategy.end_task(task, net, batches_of(images), lambda b: net(b["image"]))
    layers = strategy.history[-1]["layers"]
    assert {info["sketch"] for info in layers.values()} == {"isvd_paper"}
    for name, U in strategy.store.bases.items():
        assert torch.linalg.matrix_norm(U.double().mT @ U.double() - torch.eye(U.shape[1]), ord=2) < 1e-5
        assert layers[name]["k_old"] == strategy.history[0]["layers"][name]["k_new"]


@pytest.mark.parametrize("mode", ["trajectory", "random_t"])
def test_capture_forward_on_the_tiny_model(mode):
    from cdad_dist.continual.capture import make_capture_forward
    from cdad_dist.models.presets import ModelConfig, build_model

    model = build_model(ModelConfig(preset="tiny"))
    cfg = ContinualConfig(layer_patterns=LayerPatterns(include=["unet.conv_in", "amn.layers.0.*"]),
                          capture=CaptureConfig(mode=mode, images=1.0, ddim_steps=3, random_timesteps=2))
    strategy = CDADStrategy(cfg)
    layers = strategy.protected_layers(model)
    assert "unet.conv_in" in layers and any(n.startswith("amn.layers.0.") for n in layers)
    images = torch.rand(2, 3, model.model_config.image_size, model.model_config.image_size,
                        generator=torch.Generator().manual_seed(0))
    strategy.begin_task(0, model)
    strategy.end_task(0, model, [{"image": images, "key": ["a", "b"]}], make_capture_forward(model, cfg.capture))
    info = strategy.history[-1]["layers"]
    latent = model.encode(images)
    unet_calls = 3 if mode == "trajectory" else 2  # U-Net once per DDIM step / per random timestep
    assert info["unet.conv_in"]["n_columns"] == unet_calls * latent.shape[0] * latent.shape[2] * latent.shape[3]
    assert all(info[n]["n_columns"] > 0 for n in layers)  # the AMN ran (once per image batch)
    assert strategy.history[-1]["layers_without_inputs"] == []
    assert model.training  # the capture pass restored the training mode
