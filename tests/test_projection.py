"""Capture, layer discovery and projection: the old tasks' input space is kept, under AdamW and under DDP."""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cdad_dist.continual.capture import CaptureConfig, FeatureCapture, layer_input_block
from cdad_dist.continual.layers import LayerPatterns, discover_protected, input_dim
from cdad_dist.continual.projector import Projector, project_rows
from cdad_dist.continual.store import BasisStore, compact_form, orthogonal_complement
from cdad_dist.continual.protocol import Backend, StrategyContext
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


def test_capture_config_rejects_bad_settings():
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
    assert resumed.store.complement == strategy.store.complement == {"conv1"}  # k = 19 of d = 27
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
    def on(backend: Backend, project: str = "update") -> CDADStrategy:
        strategy = CDADStrategy(ContinualConfig(project=project))
        strategy.bind(StrategyContext(backend=backend))
        return strategy

    net = Net()
    with pytest.raises(ConfigError, match="ZeRO-3"):
        on(Backend("DEEPSPEED", zero_stage=3)).begin_task(0, net)
    with pytest.raises(ConfigError, match="FSDP"):
        on(Backend("FSDP"), "grad").begin_task(0, net)
    for project in ("update", "grad"):  # ZeRO-1/2 keep whole weights: both modes work (tests/test_deepspeed.py)
        on(Backend("DEEPSPEED", zero_stage=2), project).begin_task(0, net)
    on(Backend("MULTI_GPU", world=8)).begin_task(0, net)


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
    # With the perturbed version of each image in the batch, every layer also sees what training shows it.
    plain = {n: info[n]["n_columns"] for n in layers}
    strategy = CDADStrategy(cfg)
    strategy.begin_task(0, model)
    batch = {"image": images, "perturbed": images.flip(-1), "key": ["a", "b"]}
    strategy.end_task(0, model, [batch], make_capture_forward(model, cfg.capture))
    doubled = strategy.history[-1]["layers"]
    assert {n: doubled[n]["n_columns"] for n in layers} == {n: 2 * c for n, c in plain.items()}
    # Synthetic anomalies (continual.capture.synthetic, no segmentation head) get a third pass of their own.
    strategy = CDADStrategy(cfg)
    strategy.begin_task(0, model)
    strategy.end_task(0, model, [{**batch, "synthetic": 1 - images}], make_capture_forward(model, cfg.capture))
    tripled = strategy.history[-1]["layers"]
    assert {n: tripled[n]["n_columns"] for n in layers} == {n: 3 * c for n, c in plain.items()}



@pytest.mark.parametrize("mode", ["trajectory", "random_t"])
def test_captured_inputs_do_not_depend_on_batching_or_order(mode):
    """Each image's capture noise and timesteps are its own: one batch of 4 and two reversed batches of 2 (as
    two ranks would see them) sketch the same Gram matrices."""
    from cdad_dist.continual.capture import make_capture_forward
    from cdad_dist.continual.sketches import GramSketch
    from cdad_dist.models.presets import ModelConfig, build_model

    model = build_model(ModelConfig(preset="tiny"))
    cfg = CaptureConfig(mode=mode, images=1.0, ddim_steps=2, random_timesteps=2)
    layers = {n: m for n, m in model.named_modules() if n in ("unet.conv_in", "unet.conv_out")}
    size = model.model_config.image_size
    images = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0))

    def grams(batches):
        sketches = {n: GramSketch(input_dim(m)) for n, m in layers.items()}
        forward = make_capture_forward(model, cfg)
        with FeatureCapture(layers, sketches):
            for b in batches:
                forward({"image": b})
        return {n: s.gram() for n, s in sketches.items()}

    one = grams([images])
    split = grams([images[[3, 2]], images[[1, 0]]])
    for name in layers:  # equal up to float32 block-product rounding (batch-seeded noise differs by O(1))
        rel = torch.linalg.matrix_norm(split[name] - one[name]) / torch.linalg.matrix_norm(one[name])
        assert rel < 1e-6, (name, float(rel))


# -- smaller stored form, saturated and empty layers ----------------------------------------------------------------

def _orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


def _principal_sine(A: torch.Tensor, B: torch.Tensor) -> float:
    A, B = A.double(), B.double()
    return float(torch.linalg.matrix_norm(B - A @ (A.mT @ B), ord=2))


def test_store_keeps_the_smaller_form_and_round_trips(tmp_path):
    bases = {"thin": _orthonormal(20, 4, 0), "wide": _orthonormal(20, 15, 1), "full": _orthonormal(20, 20, 2),
             "empty": torch.zeros(20, 0, dtype=torch.float64)}
    store = BasisStore.from_bases(bases, gamma=0.99, task=0, dtype=torch.float32)
    assert store.complement == {"wide", "full"}
    assert {n: tuple(store.bases[n].shape) for n in bases} == {"thin": (20, 4), "wide": (20, 5), "full": (20, 0),
                                                               "empty": (20, 0)}
    assert {n: store.rank(n) for n in bases} == {"thin": 4, "wide": 15, "full": 20, "empty": 0}
    assert store.total_bytes() == 20 * (4 + 5) * 4  # instead of 20 · (4 + 15 + 20) · 4
    V = store.bases["wide"].double()
    assert float((V.mT @ bases["wide"]).abs().max()) < 1e-6  # V ⟂ U
    loaded = BasisStore.load(store.save(tmp_path))
    assert loaded.complement == store.complement and loaded.task == 0
    for name, U in bases.items():
        recovered = loaded.basis(name, torch.float64)
        assert recovered.shape == U.shape
        if U.shape[1]:
            assert _principal_sine(U, recovered) < 1e-6 and _principal_sine(recovered, U) < 1e-6
    with pytest.raises(CheckpointError, match="complement"):
        BasisStore(bases={"a": torch.zeros(3, 1)}, complement={"b"})


def test_store_file_naming_a_missing_complement_layer_is_refused(tmp_path):
    from safetensors.torch import save_file
    import json

    path = tmp_path / "bad_complement.safetensors"
    save_file({"x": torch.zeros(4, 1)}, str(path),
              metadata={"format": "cdad-bases/1", "task": "0", "gamma": "0.9",
                        "layers": json.dumps({"x": {"d": 4, "k": 3}}), "complement": json.dumps(["y"])})
    with pytest.raises(CheckpointError, match="bad_complement"):
        BasisStore.load(path)
    ok = tmp_path / "ok.safetensors"
    save_file({"x": torch.zeros(4, 1)}, str(ok),
              metadata={"format": "cdad-bases/1", "task": "0", "gamma": "0.9",
                        "layers": json.dumps({"x": {"d": 4, "k": 3}}), "complement": json.dumps(["x"])})
    assert BasisStore.load(ok).rank("x") == 3


@pytest.mark.parametrize("k", [3, 9])  # thin U (projected with U) and wide U (projected with its complement V)
def test_both_stored_forms_project_like_the_full_projector(k):
    layer = nn.Linear(12, 5, bias=False)
    U = _orthonormal(12, k, 3)
    stored, is_complement = compact_form(U)
    assert is_complement == (k > 6)
    projector = Projector({"fc": layer}, {"fc": stored.float()}, "update",
                          complement={"fc"} if is_complement else ())
    start = layer.weight.detach().clone()
    storage = layer.weight.data_ptr()
    projector.anchor()
    for step in range(3):
        with torch.no_grad():
            layer.weight.add_(torch.randn(5, 12, generator=torch.Generator().manual_seed(step)))
        expected = start.double() + project_rows((layer.weight.detach() - start).double(), U)
        projector.project_update()
        assert layer.weight.data_ptr() == storage  # updated in place
        assert torch.allclose(layer.weight.detach().double(), expected, atol=1e-5)
    leak = projector.leak_ratios({"fc": start})["fc"]
    assert leak < 1e-5
    grad_projector = Projector({"fc": layer}, {"fc": stored.float()}, "grad",
                               complement={"fc"} if is_complement else ())
    grad_projector.install_grad_hooks()
    layer.weight.grad = None
    layer(torch.randn(7, 12)).square().sum().backward()
    assert float((layer.weight.grad.double() @ U).norm()) < 1e-5 * float(layer.weight.grad.norm())
    grad_projector.remove()


def test_saturated_layers_are_frozen_and_empty_bases_cost_nothing():
    net = Net()
    d1, d2 = input_dim(net.conv1), input_dim(net.conv2)
    bases = {"conv1": torch.zeros(d1, 0), "conv2": _orthonormal(d2, 5, 4).float(), "fc2": torch.zeros(24, 0)}
    state = {**CDADStrategy(ContinualConfig()).state_dict(), "tasks_done": 1, "task": 0, "bases": bases,
             "complement": ["conv1"]}  # conv1: k = d (complement empty); fc2: k = 0
    strategy = CDADStrategy(ContinualConfig())
    strategy.load_state_dict(state)
    assert strategy.store.rank("conv1") == d1 and strategy.store.rank("fc2") == 0
    strategy.begin_task(1, net)
    assert strategy.saturated == ["conv1"] and strategy._projector.names == ["conv2"]
    assert not net.conv1.weight.requires_grad and net.conv2.weight.requires_grad
    groups = strategy.optimizer_param_groups(net, 0.01)
    assert all(p is not net.conv1.weight for g in groups for p in g["params"])
    before = net.conv1.weight.detach().clone()
    train(net, net, strategy, torch.optim.AdamW([p for g in groups for p in g["params"]], lr=1e-2,
                                                weight_decay=0.05), noisy_images(16, 5), steps=3, seed=6)
    assert torch.equal(net.conv1.weight.detach(), before)
    strategy.end_task(1, net, batches_of(noisy_images(8, 7)), lambda b: net(b["image"]))
    assert net.conv1.weight.requires_grad  # frozen only while the task's projector is installed


def test_nothing_left_to_train_is_a_clear_error():
    net = Net()
    layers = discover_protected(net, LayerPatterns())
    bases = {name: torch.zeros(input_dim(m), 0) for name, m in layers.items()}
    state = {**CDADStrategy(ContinualConfig()).state_dict(), "tasks_done": 1, "task": 0, "bases": bases,
             "complement": sorted(bases)}
    strategy = CDADStrategy(ContinualConfig())
    strategy.load_state_dict(state)
    strategy.begin_task(1, net)
    with pytest.raises(ConfigError, match="nothing left to train"):
        strategy.optimizer_param_groups(net, 0.01)


def test_orthogonal_complement_of_float32_basis_is_exact():
    U = _orthonormal(30, 20, 8).float()
    V = orthogonal_complement(U)
    assert V.dtype == torch.float64 and V.shape == (30, 10)
    assert float((V.mT @ U.double()).abs().max()) < 1e-6
    assert float((V.mT @ V - torch.eye(10, dtype=torch.float64)).abs().max()) < 1e-12


def test_gram_merge_in_complement_form_equals_the_full_merge():
    from cdad_dist.continual.memory import gpm_merge_gram, gpm_merge_gram_compact

    d = 40
    g = torch.Generator().manual_seed(9)

    def gram(rank: int) -> torch.Tensor:
        Q = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))[0]
        X = (Q * torch.linspace(2.0, 0.5, rank, dtype=torch.float64)) @ torch.randn(rank, 300, generator=g,
                                                                                      dtype=torch.float64)
        X += 1e-4 * torch.randn(d, 300, generator=g, dtype=torch.float64)
        return X @ X.mT

    G0, G1 = gram(24), gram(12)
    U0, info0 = gpm_merge_gram(None, G0, GAMMA, out_dtype=torch.float64)
    U1, info1 = gpm_merge_gram(U0, G1, GAMMA, out_dtype=torch.float64)
    s0, c0, j0 = gpm_merge_gram_compact(None, False, G0, GAMMA)
    s1, c1, j1 = gpm_merge_gram_compact(s0.float(), c0, G1, GAMMA)  # the store keeps float32
    assert c0 and c1 and s0.shape == (d, d - info0.k_new) and s1.shape == (d, d - info1.k_new)
    assert (j0.k_new, j1.k_old, j1.k_new) == (info0.k_new, info1.k_old, info1.k_new) and info1.k_new > info0.k_new
    assert j1.captured == pytest.approx(info1.captured, abs=1e-6)
    assert float((s1.mT @ U1).abs().max()) < 1e-5  # the new complement is ⟂ the merged basis
    assert float((s1.mT @ s1 - torch.eye(s1.shape[1], dtype=torch.float64)).abs().max()) < 1e-12
    thin, thin_is_complement, _ = gpm_merge_gram_compact(None, False, gram(5), GAMMA)
    assert not thin_is_complement and thin.shape[1] <= 20


def test_channels_last_weight_takes_the_copy_path_and_stays_projected():
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    U = _orthonormal(27, 20, 10)
    stored, is_complement = compact_form(U)
    assert is_complement  # k = 20 of d = 27
    projector = Projector({"conv": conv}, {"conv": stored.float()}, "update", complement={"conv"})
    start = conv.weight.detach().clone()
    projector.anchor()
    with torch.no_grad():
        conv.weight.add_(torch.randn_like(conv.weight))
    projector.project_update()
    dW = (conv.weight.detach() - start).reshape(4, -1).double()
    assert float((dW @ U).norm()) < 1e-5 * float(dW.norm())
