"""DeepSpeed ZeRO-1/2 on 2 CPU processes (gloo): the continual projection still protects the old tasks.

Under DeepSpeed, Accelerate steps the engine inside `backward` and the optimizer keeps fp32 master weights of its
own, so both the module's weights and the masters must stay orthogonal to the old tasks' inputs. These tests run the
projection issue's orthogonality check through the same Accelerator the engine builds (`make_accelerator` with the
environment `accelerate launch --config_file launch/deepspeed-zero2.yaml` sets), and the real engine end to end.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("deepspeed")

from dist_utils import accelerate_launch_cmd, run_distributed, run_first_task_then_resume  # noqa: E402
from engine_utils import make_small_demo, micro_overrides  # noqa: E402
from test_projection import (FROZEN, GAMMA, Net, assert_protected, batches_of, leak_and_bound,  # noqa: E402
                             noisy_images, record_inputs, smooth_images)

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _deepspeed_accelerator(stage: int, project_dir: str):
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(REPO / "launch" / "deepspeed" / f"zero{stage}.json")
    from cdad_dist.engine.accel import fill_deepspeed_config, make_accelerator

    acc = make_accelerator(mixed_precision="no", grad_accum=1, project_dir=project_dir, log_with=None)
    fill_deepspeed_config(acc, micro_batch_size=8, max_grad_norm=1e9)
    return acc


def _train_under_engine(acc, net, strategy, images, steps: int, seed: int, optimizer_kind: str) -> None:
    """The engine's order of calls: strategy hook, backward (DeepSpeed steps inside), strategy hook."""
    params = [p for p in net.parameters() if p.requires_grad]
    if optimizer_kind == "adamw":
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05)
    else:
        optimizer = torch.optim.SGD(params, lr=5e-2, momentum=0.9)
    acc.free_memory()
    engine, optimizer = acc.prepare(net, optimizer)
    g = torch.Generator().manual_seed(seed)
    targets = torch.randn(len(images), 5, generator=g)
    for _ in range(steps):
        idx = torch.randint(0, len(images), (8,), generator=g)
        loss = F.mse_loss(engine(images[idx]), targets[idx])
        strategy.before_optimizer_step(net)
        acc.backward(loss)
        optimizer.step()  # a no-op under DeepSpeed: the engine stepped inside backward
        strategy.after_optimizer_step(net)
        optimizer.zero_grad()


def _deepspeed_projection_run(stage: int, project: str, optimizer_kind: str, project_dir: str) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    from cdad_dist.continual.capture import CaptureConfig
    from cdad_dist.continual.protocol import StrategyContext
    from cdad_dist.continual.strategy import CDADStrategy, ContinualConfig
    from cdad_dist.engine.accel import describe_backend

    acc = _deepspeed_accelerator(stage, project_dir)
    assert "DEEPSPEED" in str(acc.distributed_type) and acc.num_processes == 2
    rank = acc.process_index
    torch.manual_seed(0)
    net = Net()
    strategy = CDADStrategy(ContinualConfig(project=project, gamma=GAMMA, capture=CaptureConfig(images=1.0, seed=3)))
    old, new = smooth_images(32, seed=10 + rank), noisy_images(32, seed=20 + rank)

    strategy.bind(StrategyContext(backend=describe_backend(acc)))
    assert strategy.context.backend.zero_stage == stage and strategy.context.backend.world == 2
    strategy.begin_task(0, net)
    _train_under_engine(acc, net, strategy, old, steps=10, seed=1, optimizer_kind=optimizer_kind)
    strategy.end_task(0, net, batches_of(old), lambda batch: net(batch["image"]))
    layers = strategy.protected_layers(net)
    x_old = record_inputs(net, layers, batches_of(old))
    for name, X in x_old.items():  # X_old is the union of both ranks' task-0 features
        parts = [torch.empty_like(X) for _ in range(2)]
        torch.distributed.all_gather(parts, X)
        x_old[name] = torch.cat(parts, dim=1)
    start = {name: m.weight.detach().double().clone() for name, m in layers.items()}

    strategy.begin_task(1, net)
    frozen = sorted(n for n, p in net.named_parameters() if not p.requires_grad)
    _train_under_engine(acc, net, strategy, new, steps=25, seed=2, optimizer_kind=optimizer_kind)
    checks = leak_and_bound(strategy, layers, start, x_old)
    # The optimizer's fp32 masters (what the next step starts from) must be protected as well.
    masters = {}
    for name, module in layers.items():
        full = safe_get_full_fp32_param(module.weight)
        masters[name] = None if full is None else float((full.double() - module.weight.double()).abs().max())
    weights = torch.cat([m.weight.detach().flatten() for m in layers.values()]).numpy()
    return {"checks": checks, "frozen": frozen, "digest": strategy.history[-1]["digest"], "weights": weights,
            "master_minus_module": masters}


@pytest.mark.parametrize("stage,project,optimizer_kind", [(2, "update", "adamw"), (1, "update", "adamw"),
                                                          (2, "grad", "sgd")])
def test_projection_holds_under_deepspeed_zero(tmp_path, stage, project, optimizer_kind):
    r0, r1 = run_distributed(_deepspeed_projection_run, world_size=2, init_process_group=False, timeout=240,
                             args=(stage, project, optimizer_kind, str(tmp_path)))
    assert r0["digest"] == r1["digest"]  # identical bases on both ranks
    assert (r0["weights"] == r1["weights"]).all()  # and identical weights after projected training
    assert_protected(r0["checks"])
    assert r0["frozen"] == FROZEN
    for result in (r0, r1):  # masters exist (ZeRO really ran) and agree with the module's weights
        assert all(v is not None and v < 1e-6 for v in result["master_minus_module"].values()), result


def test_engine_trains_resumes_and_evaluates_under_deepspeed_zero2(tmp_path):
    """`accelerate launch --config_file launch/deepspeed-zero2.yaml train.py`: 2 ranks, a task, then --resume."""
    demo = make_small_demo(tmp_path / "demo_data")
    overrides = micro_overrides(tmp_path, demo, name="zero2", extra=["train.checkpoint_every=2"])
    cmd = accelerate_launch_cmd(REPO / "launch" / "deepspeed-zero2.yaml", REPO / "train.py", overrides)
    _, second = run_first_task_then_resume(cmd, cwd=REPO)  # the yaml names its JSON relative to the repo
    from cdad_dist.engine.checkpoint import list_checkpoints, verify_checkpoint

    refs = list_checkpoints(tmp_path / "runs" / "zero2" / "checkpoints")
    assert [r.task for r in refs if r.task_end] == [0, 1]
    last = refs[-1].path
    verify_checkpoint(last)
    assert (last / "model.safetensors").exists() and (last / "pytorch_model").is_dir()  # weights + ZeRO states
    assert "resuming from task000" in second.stdout
