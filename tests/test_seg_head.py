"""The segmentation head (DiffusionAD's sub-network): shapes, loss, the no-gradient guarantee, the synthetic
anomalies, protection across tasks, fusion calibration and the config's round trip through checkpoints/predict."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cdad_dist.config import load_config
from cdad_dist.continual.store import BasisStore, task_file_name
from cdad_dist.data.perturb import NSAConfig
from cdad_dist.data.stream import StreamConfig, train_stream
from cdad_dist.data.synthetic import SyntheticAnomalies, SyntheticAnomalyConfig, perlin_noise
from cdad_dist.engine.checkpoint import list_checkpoints
from cdad_dist.engine.trainer import ContinualTrainer
from cdad_dist.errors import CdadError, ConfigError
from cdad_dist.eval.head_maps import fuse, pool_scale
from cdad_dist.eval.predict import load_run, predict
from cdad_dist.models.presets import ModelConfig, build_model
from cdad_dist.models.seg_head import SegHeadConfig, binary_focal_loss, head_loss
from engine_utils import make_small_demo, micro_overrides

MICRO = dict(image_size=32, block_out_channels=(32, 32), attention_head_dim=2, cross_attention_dim=16,
             context_tokens=4, amn_depth=1, amn_heads=2, amn_neighbour=3, amn_local_channels=(4, 4, 8, 8, 8, 8, 16))
HEAD = ["model.seg_head.enabled=true", "model.seg_head.channels=[8, 16]"]


def _model(head: str | None = "image", seed: int = 0):
    seg = SegHeadConfig(enabled=head is not None, input=head or "image", channels=(8, 16))
    return build_model(ModelConfig(**MICRO, seg_head=seg, init_seed=seed))


def _batch(b: int = 3, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, size, size, generator=g)
    mask = torch.zeros(b, 1, size, size)
    mask[:, :, 8:16, 10:20] = 1
    synthetic = torch.where(mask.bool(), torch.rand(b, 3, size, size, generator=g), x)
    return x, synthetic, mask


# ---------------------------------------------------------------------------------------------------- the head
@pytest.mark.parametrize("kind", ["image", "latent"])
def test_head_shapes_and_backward(kind):
    model = _model(kind)
    x, synthetic, mask = _batch()
    out = model(x, x, generator=torch.Generator().manual_seed(1), synthetic=synthetic, synthetic_mask=mask)
    assert torch.isfinite(out["seg_loss"]) and out["seg_loss"] > 0
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.seg_head.parameters()
               if p.requires_grad)
    z = model.encode(x)
    logits = model.head_logits(x, z, z)
    expected = (32, 32) if kind == "image" else tuple(z.shape[-2:])
    assert logits.shape == (3, 1, *expected)
    probs = model.head_map(x, z, z)
    assert probs.shape == (3, 1, 32, 32) and 0 <= probs.min() and probs.max() <= 1


def test_no_gradient_of_the_head_reaches_the_unet_or_the_amn():
    model = _model("image")
    x, synthetic, mask = _batch()
    z, z_hat = model.training_reconstruction(synthetic, torch.Generator().manual_seed(0))
    assert not z_hat.requires_grad
    seg = head_loss(model.head_logits(synthetic, z, z_hat), mask, model.seg_head.cfg)
    diffusion = [p for p in list(model.unet.parameters()) + list(model.amn.parameters()) if p.requires_grad]
    grads = torch.autograd.grad(seg, diffusion, allow_unused=True)
    assert all(g is None for g in grads)


def test_the_head_leaves_the_diffusion_loss_and_its_gradient_unchanged():
    """Same init seed with and without the head: identical U-Net/AMN weights, ε and AMN losses, and gradients."""
    with_head, without = _model("latent"), _model(None)
    x, synthetic, mask = _batch()
    out_h = with_head(x, synthetic, generator=torch.Generator().manual_seed(5), synthetic=synthetic,
                      synthetic_mask=mask)
    out_n = without(x, synthetic, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out_h["eps_loss"], out_n["eps_loss"]) and torch.equal(out_h["amn_loss"], out_n["amn_loss"])
    out_h["loss"].backward()
    out_n["loss"].backward()
    named_n = dict(without.named_parameters())
    for name, p in with_head.named_parameters():
        if name.startswith(("unet.", "amn.")) and p.grad is not None:
            torch.testing.assert_close(p.grad, named_n[name].grad, rtol=0, atol=0)


def test_clip_groups_separate_the_head():
    model = _model("image")
    params = model.trainable_parameters()
    groups = model.clip_groups(params)
    head = {id(p) for p in model.seg_head.parameters()}
    assert len(groups) == 2 and all(id(p) not in head for p in groups[0]) and all(id(p) in head for p in groups[1])
    assert _model(None).clip_groups(params) == [params]


def test_a_head_model_needs_synthetic_images():
    model = _model("image")
    x, _, _ = _batch()
    with pytest.raises(ConfigError, match="synthetic"):
        model(x, x, generator=torch.Generator().manual_seed(0))


def test_focal_loss_matches_its_formula_and_is_stable_for_large_logits():
    logits = torch.tensor([[-30.0, -1.0, 0.0, 2.0, 40.0]])
    target = torch.tensor([[0.0, 1.0, 0.0, 1.0, 1.0]])
    p = torch.sigmoid(logits.double())
    pt = target * p + (1 - target) * (1 - p)
    at = target * 0.25 + (1 - target) * 0.75
    expected = (-at * (1 - pt) ** 2 * torch.log(pt)).mean()
    torch.testing.assert_close(binary_focal_loss(logits, target, 0.25, 2.0).double(), expected, rtol=1e-5, atol=1e-7)
    wrong = binary_focal_loss(torch.tensor([[-80.0]]), torch.tensor([[1.0]]), 0.5, 4.0)
    assert torch.isfinite(wrong) and wrong > 30  # confidently wrong: -log p ≈ 80, not inf


# ------------------------------------------------------------------------------------------ synthetic anomalies
def _photo(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((h, w, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("branch", ["perlin", "perlin_texture", "nsa"])
@pytest.mark.parametrize("shape", [(48, 64), (8, 8)])
def test_synthetic_masks_mark_exactly_the_changed_pixels(tmp_path, branch, shape):
    import cv2

    texture_dir = None
    if branch == "perlin_texture":
        texture_dir = tmp_path / "dtd"
        texture_dir.mkdir()
        cv2.imwrite(str(texture_dir / "t.png"), _photo(30, 20, seed=9))
    cfg = SyntheticAnomalyConfig(normal_fraction=0.0, perlin_fraction=0.0 if branch == "nsa" else 1.0,
                                 texture_dir=str(texture_dir) if texture_dir else None)
    synth = SyntheticAnomalies(cfg, NSAConfig(blend="paste"))
    target, source = _photo(*shape, seed=1), _photo(*shape, seed=2)
    for seed in range(6):
        out, mask = synth(target, source, np.random.default_rng(seed))
        assert out.shape == target.shape and mask.shape == shape and set(np.unique(mask)) <= {0, 1}
        assert mask.any(), "an anomalous sample must have a non-empty mask"
        changed = (out != target).any(-1)
        assert not (changed & (mask == 0)).any(), "pixels outside the mask changed"
        assert changed[mask == 1].mean() > 0.9, "most masked pixels must differ"
        again = synth(target, source, np.random.default_rng(seed))
        assert np.array_equal(out, again[0]) and np.array_equal(mask, again[1])  # seeded


def test_normal_fraction_one_leaves_images_untouched():
    synth = SyntheticAnomalies(SyntheticAnomalyConfig(normal_fraction=1.0))
    img = _photo()
    out, mask = synth(img, img, np.random.default_rng(0))
    assert np.array_equal(out, img) and not mask.any()


def test_constant_image_keeps_its_outside_exact():
    synth = SyntheticAnomalies(SyntheticAnomalyConfig(normal_fraction=0.0, perlin_fraction=1.0))
    img = np.full((32, 32, 3), 128, np.uint8)
    for seed in range(5):
        out, mask = synth(img, img, np.random.default_rng(seed))
        assert np.array_equal(out[mask == 0], img[mask == 0])


def test_perlin_noise_is_bounded_and_follows_its_scale():
    rng = np.random.default_rng(0)
    fine, coarse = perlin_noise((64, 64), (16, 16), rng), perlin_noise((64, 64), (1, 1), rng)
    assert np.abs(fine).max() <= 1.0 + 1e-9 and np.abs(coarse).max() <= 1.0 + 1e-9
    roughness = lambda a: np.abs(np.diff(a, axis=1)).mean()  # noqa: E731
    assert roughness(fine) > 4 * roughness(coarse)


def test_bad_synthetic_config_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="texture_dir"):
        SyntheticAnomalyConfig(texture_dir=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="beta_range"):
        SyntheticAnomalyConfig(beta_range=(0.5, 1.0))
    empty = tmp_path / "empty"
    empty.mkdir()
    synth = SyntheticAnomalies(SyntheticAnomalyConfig(normal_fraction=0, perlin_fraction=1, texture_dir=str(empty)))
    with pytest.raises(CdadError, match="no images"):
        for seed in range(10):
            synth(_photo(), _photo(), np.random.default_rng(seed))


def test_the_synthesizer_leaves_the_nsa_stream_unchanged_and_resumes(head_run):
    from cdad_dist.data.perturb import NSAPerturber

    shards = head_run["cfg"].data.shards  # the engine run's shards (micro demo data, 32 px)
    cfg = StreamConfig(batch_size=4, image_size=32, shuffle_buffer=8, seed=3)

    def batches(synth, skip=0, n=3):
        it = iter(train_stream(shards, ["demo/carpet"], cfg=cfg, perturber=NSAPerturber(),
                               rank=0, world_size=1, skip_batches=skip, synthesizer=synth))
        return [next(it) for _ in range(n)]

    synth = SyntheticAnomalies(SyntheticAnomalyConfig(normal_fraction=0.25))
    plain, with_synth = batches(None), batches(synth)
    for a, b in zip(plain, with_synth):
        assert torch.equal(a["perturbed"], b["perturbed"]) and "synthetic" not in a
        assert b["synthetic"].shape == b["image"].shape and b["synthetic_mask"].shape == b["mask"].shape
    resumed = batches(synth, skip=2, n=1)[0]
    assert torch.equal(resumed["synthetic"], with_synth[2]["synthetic"])
    assert torch.equal(resumed["synthetic_mask"], with_synth[2]["synthetic_mask"])


# ---------------------------------------------------------------------------------------------------- fusion
def test_pooled_scales_are_count_weighted_means_over_tasks():
    head = _model("image").seg_head
    pool_scale(head, torch.tensor([10.0, 0.5]), 4)
    pool_scale(head, torch.tensor([20.0, 1.5]), 12)
    torch.testing.assert_close(head.map_scale, torch.tensor([17.5, 1.25]))
    assert float(head.map_scale_count) == 16
    f, h = torch.full((1, 1, 2, 2), 35.0), torch.full((1, 1, 2, 2), 2.5)
    torch.testing.assert_close(fuse(f, h, head.map_scale), torch.full((1, 1, 2, 2), 4.0))
    assert torch.isfinite(fuse(f, h, torch.zeros(2))).all()  # a head that outputs 0 on normal images


def test_a_head_map_without_a_head_is_rejected_when_the_config_loads():
    with pytest.raises(ConfigError, match="eval.map"):
        load_config(None, ["eval.map=head"])
    with pytest.raises(ConfigError, match="eval.map"):
        load_config(None, ["model.seg_head.enabled=true", "eval.map=fuzed"])


# ------------------------------------------------------------------------------------- through the real engine
@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seg_head")
    demo = make_small_demo(tmp / "demo_data")
    cfg = load_config(None, micro_overrides(tmp, demo, name="head", extra=HEAD + [
        "continual.strategy=cdad", "continual.project=update", "eval.map=fused", "eval.compare_maps=true",
        "eval.head_scoring.calibration_images=4"]))
    trainer = ContinualTrainer(cfg)
    matrix = trainer.run()
    return {"cfg": cfg, "trainer": trainer, "matrix": matrix, "tmp": tmp, "demo": demo}


def test_the_heads_layers_are_protected_across_tasks(head_run):
    cfg = head_run["cfg"]
    refs = [r for r in list_checkpoints(cfg.run_dir / "checkpoints") if r.task_end]
    w0, w1 = (load_file(str(r.path / "model.safetensors")) for r in refs)
    store = BasisStore.load(cfg.run_dir / "bases" / task_file_name(0))
    head_layers = [n for n in store.bases if n.startswith("seg_head.")]
    assert len(head_layers) == 7  # 2 levels × 2 convs + 1 up block × 2 convs + the 1×1 output conv
    moved = 0
    for name in head_layers:
        U = store.basis(name, torch.float64)
        if U.shape[1] == 0:
            continue
        before = w0[f"{name}.weight"]
        delta = (w1[f"{name}.weight"] - before).double().reshape(before.shape[0], -1)
        moved += float(delta.norm())
        # fp32 weights: rounding alone leaves ~1e-4 of a small delta in span(U); unprotected it would be ~√(k/d)
        assert float((delta @ U).norm()) <= 1e-3 * float(delta.norm()) + 1e-9, name
    assert moved > 0, "task 1 must still train the head (outside the protected span)"


def test_every_map_kind_is_recorded_and_the_scales_travel_with_the_weights(head_run):
    matrix, cfg = head_run["matrix"], head_run["cfg"]
    for kind in ("features", "head", "fused"):
        for metric in ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_aupro"):
            assert set(matrix["values"][f"{kind}.{metric}"]["1"]) == {"demo/carpet", "demo/bottle"}
    # eval.map=fused: the unprefixed metrics are the fused ones
    assert matrix["values"]["pixel_ap"] == matrix["values"]["fused.pixel_ap"]
    last = [r for r in list_checkpoints(cfg.run_dir / "checkpoints") if r.task_end][-1]
    weights = load_file(str(last.path / "model.safetensors"))
    assert float(weights["seg_head.map_scale_count"]) == 8  # 4 calibration images per task, two tasks
    assert (weights["seg_head.map_scale"] > 0).all()


def test_predict_scores_with_the_runs_map_and_reports_every_kind(head_run, tmp_path):
    cfg = head_run["cfg"]
    images = sorted((head_run["demo"] / "carpet" / "test").rglob("*.png"))[:3]
    run = load_run(cfg.run_dir, device="cpu")
    assert run.model.seg_head is not None and float(run.model.seg_head.map_scale_count) == 8
    fused = predict(run, images, tmp_path / "fused", log=lambda *_: None)
    assert fused["map_kind"] == "fused"
    for row in fused["results"]:
        assert {"score_features", "score_head", "score_fused"} <= set(row)
        assert row["score"] == pytest.approx(row["score_fused"])
    head = predict(run, images, tmp_path / "head", map_kind="head", log=lambda *_: None)
    assert [r["score"] for r in head["results"]] == pytest.approx([r["score_head"] for r in fused["results"]])
    assert (tmp_path / "head" / head["results"][0]["map"]).is_file()


def test_predict_refuses_a_head_map_for_a_run_without_a_head(tmp_path):
    demo = make_small_demo(tmp_path / "demo_data")
    cfg = load_config(None, micro_overrides(tmp_path, demo, name="plain", extra=[
        "continual.strategy=naive", "sequence=[[demo/carpet]]"]))
    ContinualTrainer(cfg).run()
    images = sorted((demo / "carpet" / "test").rglob("*.png"))[:1]
    with pytest.raises(CdadError, match="no segmentation head"):
        predict(cfg.run_dir, images, tmp_path / "out", map_kind="head", device="cpu", log=lambda *_: None)


def test_per_layer_gamma_matches_globs_in_order():
    from cdad_dist.continual.config import ContinualConfig

    cfg = ContinualConfig()
    assert cfg.gamma_for("seg_head.down.0.0") == 0.9 and cfg.gamma_for("unet.conv_in") == cfg.gamma
    cfg = ContinualConfig(gamma_by_layer={"unet.down_blocks.*": 0.9, "unet.*": 0.99})
    assert cfg.gamma_for("unet.down_blocks.0.resnets.0.conv1") == 0.9 and cfg.gamma_for("unet.conv_in") == 0.99
    assert cfg.gamma_for("seg_head.out") == cfg.gamma  # the default pattern is replaced, not merged
    with pytest.raises(ConfigError, match="gamma_by_layer"):
        ContinualConfig(gamma_by_layer={"unet.*": 1.5})


@pytest.mark.parametrize("kind", ["image", "latent"])
def test_the_head_loss_and_map_under_bf16_autocast_stay_finite_and_close(kind):
    """Mixed precision (the launch configs' bf16): the loss is computed in fp32 from bf16 logits."""
    model = _model(kind)
    x, synthetic, mask = _batch(b=2)
    z = model.encode(x)
    ref = model.head_map(x, z, z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.head_map(x, z, z)
        logits = model.head_logits(synthetic, *model.training_reconstruction(synthetic, torch.Generator().manual_seed(0)))
        loss = head_loss(logits, mask, model.seg_head.cfg)
    assert low.dtype == torch.float32 and torch.isfinite(low).all() and torch.isfinite(loss)
    assert (low - ref).abs().max() < 0.05


@pytest.mark.distributed
def test_two_ranks_train_the_head_protect_it_and_pool_the_scales(tmp_path):
    """The head on 2 DDP ranks through `accelerate launch`: every rank runs the head in every step (DDP would stop
    on an unused parameter), the capture runs the head in lockstep on owned layers, the fusion scales are pooled
    over both ranks' calibration images, and a resumed run carries them on."""
    import json
    from pathlib import Path

    from dist_utils import accelerate_launch_cmd, run_first_task_then_resume

    repo = Path(__file__).resolve().parent.parent
    demo = make_small_demo(tmp_path / "demo_data")
    overrides = micro_overrides(tmp_path, demo, name="head2", extra=HEAD + [
        "continual.strategy=cdad", "continual.project=update", "eval.map=fused", "eval.compare_maps=true",
        "eval.head_scoring.calibration_images=3"])  # odd: 2 + 1 over the ranks
    cmd = accelerate_launch_cmd(repo / "launch" / "cpu-2proc.yaml", repo / "train.py", overrides)
    _, second = run_first_task_then_resume(cmd, cwd=tmp_path)
    assert "resuming from task000" in second.stdout
    run_dir = tmp_path / "runs" / "head2"
    refs = [r for r in list_checkpoints(run_dir / "checkpoints") if r.task_end]
    assert [r.task for r in refs] == [0, 1] and (refs[-1].path / "random_states_1.pkl").exists()
    w0, w1 = (load_file(str(r.path / "model.safetensors")) for r in refs)
    assert float(w0["seg_head.map_scale_count"]) == 3 and float(w1["seg_head.map_scale_count"]) == 6
    store = BasisStore.load(run_dir / "bases" / task_file_name(0))
    head_layers = [n for n in store.bases if n.startswith("seg_head.")]
    assert len(head_layers) == 7
    for name in head_layers:
        U = store.basis(name, torch.float64)
        delta = (w1[f"{name}.weight"] - w0[f"{name}.weight"]).double().flatten(1)
        if U.shape[1]:
            assert float((delta @ U).norm()) <= 1e-3 * float(delta.norm()) + 1e-9, name
    results = json.loads((run_dir / "report" / "results.json").read_text())
    assert "fused.pixel_ap" in json.dumps(results)
