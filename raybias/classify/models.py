"""Classifiers: an encoder followed by one linear head.

`small_cnn` (default; any input size, made for 16x16 colored digits) and torchvision's
ResNet-18/50. Every model is `Classifier(encoder, head)` so two-stage training can freeze
the encoder and re-initialise the head, and SupCon can read the encoder's features (through
an optional projection head, as SupContrast trains it).
ImageNet weights come from torchvision's own weights API, only where they are already in
torch's hub cache: nothing is downloaded here (`check_pretrained` says what is missing).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from raybias.ray_utils import ResourceError

# Inputs are RGB in [0, 1]; every model standardises them the same way (ImageNet statistics,
# which pretrained ResNets need and which are harmless for the others).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision weight enums by model name (attribute names, resolved lazily)
IMAGENET_WEIGHTS = {"resnet18": ("ResNet18_Weights", "IMAGENET1K_V1"),
                    "resnet50": ("ResNet50_Weights", "IMAGENET1K_V2")}


@dataclass(frozen=True)
class ProjectionSpec:
    """The SupCon projection head (HobbitLong/SupContrast's SupConResNet head): `mlp` is
    Linear(d, hidden) -> ReLU -> Linear(hidden, out) with hidden = d (the encoder's feature
    size) unless given, `linear` is Linear(d, out). Its output is L2-normalised by the loss."""

    kind: str
    out_dim: int = 128
    hidden_dim: Optional[int] = None

    def text(self) -> str:
        """As written into a model file's metadata (`parse` reads it back)."""
        return f"{self.kind}:{self.out_dim}:{self.hidden_dim or 0}"

    @classmethod
    def parse(cls, text: Optional[str]) -> Optional["ProjectionSpec"]:
        if not text or text == "none":
            return None
        kind, out_dim, hidden = text.split(":")
        return cls(kind, int(out_dim), int(hidden) or None)


def projection_head(spec: ProjectionSpec, dim_in: int) -> nn.Module:
    if spec.kind == "linear":
        return nn.Linear(dim_in, spec.out_dim)
    if spec.kind == "mlp":
        hidden = spec.hidden_dim or dim_in
        return nn.Sequential(nn.Linear(dim_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, spec.out_dim))
    raise ValueError(f"unknown projection head {spec.kind!r} (known: mlp, linear)")


class Classifier(nn.Module):
    """Standardise -> encoder (image -> feature vector) -> linear head (feature -> logits).

    With a `projection` spec it also holds the SupCon projection head, which only the
    contrastive term reads (`forward(x, with_features=True)` returns it applied to the
    features); the logits never go through it.
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, n_classes: int,
                 projection: Optional[ProjectionSpec] = None):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.encoder = encoder
        self.feature_dim = feature_dim
        self.n_classes = n_classes
        self.head = nn.Linear(feature_dim, n_classes)
        # built after the head, so encoder and head draw the same initial weights with or without it
        self.projection_spec = projection
        self.projection = projection_head(projection, feature_dim) if projection is not None else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor, with_features: bool = False):
        """Logits; with_features: (logits, what SupCon reads: the projection of the encoder's
        features, or the features themselves without a projection head)."""
        f = self.features(x)
        logits = self.head(f)
        if not with_features:
            return logits
        return logits, (self.projection(f) if self.projection is not None else f)

    def reset_head(self, generator: Optional[torch.Generator] = None) -> None:
        """Re-initialise the head as nn.Linear does (uniform +-1/sqrt(fan_in)), seeded."""
        bound = 1.0 / self.feature_dim ** 0.5
        with torch.no_grad():
            self.head.weight.uniform_(-bound, bound, generator=generator)
            self.head.bias.uniform_(-bound, bound, generator=generator)


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def small_cnn_encoder(width: int = 16, feature_dim: int = 128) -> Tuple[nn.Module, int]:
    """Three conv blocks (stride 1, 2, 2), pooled to a 4 x 4 grid (any input size), one
    hidden layer. Pooling to a grid rather than to one vector keeps where strokes are:
    with global pooling the model learnt digit shape far more slowly than colour
    (colored_digits at s = 0.95: test WGA 0 after 20 epochs vs. about 0.6 with the grid)."""
    enc = nn.Sequential(
        _conv_block(3, width, 1),
        _conv_block(width, 2 * width, 2),
        _conv_block(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(4 * width * 16, feature_dim),
        nn.ReLU(inplace=True),
    )
    return enc, feature_dim


def imagenet_weights(model: str):
    """torchvision's weights enum member for `model` (no download)."""
    import torchvision.models as tvm

    enum_name, member = IMAGENET_WEIGHTS[model]
    return getattr(getattr(tvm, enum_name), member)


def cached_weights_path(model: str) -> str:
    """Where torch's hub cache keeps `model`'s ImageNet weights (TORCH_HOME/hub/checkpoints)."""
    url = imagenet_weights(model).url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def check_pretrained(model: str, pretrained: Optional[str]) -> None:
    """Raise ResourceError if `pretrained` weights are asked for but not in the local cache."""
    if not pretrained:
        return
    if pretrained != "imagenet" or model not in IMAGENET_WEIGHTS:
        raise ResourceError(f"train.pretrained={pretrained!r} is not available for train.model={model!r} "
                            "(imagenet weights exist for resnet18 and resnet50)")
    path = cached_weights_path(model)
    if not os.path.isfile(path):
        raise ResourceError(
            f"train.pretrained=imagenet asks for torchvision's {model} ImageNet weights, but {path} "
            "does not exist and nothing is downloaded here. Fetch them on a connected machine "
            f"(python -c \"import torchvision; torchvision.models.{model}(weights='DEFAULT')\") and copy "
            "the file there (or set TORCH_HOME), or set train.pretrained=null for random init.")


def _resnet_encoder(model: str, pretrained: Optional[str]) -> Tuple[nn.Module, int]:
    import torchvision.models as tvm

    weights = None
    if pretrained:
        check_pretrained(model, pretrained)
        weights = imagenet_weights(model)  # torchvision loads it from the hub cache
    net = getattr(tvm, model)(weights=weights)
    dim = net.fc.in_features
    net.fc = nn.Identity()  # the torchvision ResNet up to global pooling + flatten
    return net, dim


def build_model(model: str, n_classes: int, pretrained: Optional[str] = None,
                seed: Optional[int] = None, projection: Optional[ProjectionSpec] = None) -> Classifier:
    """A Classifier for `n_classes`, initialised from `seed` (torch's global RNG) when given,
    with the SupCon projection head `projection` (None: none)."""
    if seed is not None:
        torch.manual_seed(seed)
    if model == "small_cnn":
        if pretrained:
            raise ResourceError("train.pretrained must be null for train.model=small_cnn")
        enc, dim = small_cnn_encoder()
    elif model in IMAGENET_WEIGHTS:
        enc, dim = _resnet_encoder(model, pretrained)
    else:
        raise ValueError(f"unknown train.model {model!r}")
    return Classifier(enc, dim, n_classes, projection)


# --- saving / loading (safetensors, never pickles) ---------------------------------------

def state_to_safetensors(state: Dict[str, torch.Tensor], meta: Optional[Dict[str, str]] = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata=meta or {})


def state_from_safetensors(data: bytes) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def model_bytes(model: Classifier, model_name: str) -> bytes:
    meta = {"model": model_name, "n_classes": str(model.n_classes), "feature_dim": str(model.feature_dim),
            "projection": model.projection_spec.text() if model.projection_spec is not None else "none"}
    return state_to_safetensors(model.state_dict(), meta)


def safetensors_metadata(data: bytes) -> Dict[str, str]:
    """The `__metadata__` of a safetensors blob (header: 8-byte length, then JSON)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__", {}) or {}


def load_classifier(data: bytes) -> Classifier:
    """A Classifier from `model_bytes` output (e.g. classifiers/<method>/<seed>/model.safetensors)."""
    meta = safetensors_metadata(data)
    model = build_model(meta["model"], int(meta["n_classes"]), projection=ProjectionSpec.parse(meta.get("projection")))
    model.load_state_dict(state_from_safetensors(data))
    return model


def describe(model: Classifier) -> str:
    n = sum(p.numel() for p in model.parameters())
    return json.dumps({"params": n, "feature_dim": model.feature_dim, "n_classes": model.n_classes})
