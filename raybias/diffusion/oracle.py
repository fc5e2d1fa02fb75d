"""The oracle: a small CNN that reads digit (10 classes) and colour (the corpus palette).

Trained on the rendered font corpus only (never on task data), it judges the backbone's
generations (the quality bar of `raybias base`), and other stages may use its class
probabilities. Its weights ship in raybias/assets/oracle/ as safetensors + config.json.
"""

from __future__ import annotations

import json
import os
import time
from importlib import resources
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from raybias.config import ConfigError
from raybias.diffusion.corpus import PALETTE_NAMES, Corpus

ORACLE_SIZE = 16  # images are resized to this before the network
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class OracleNet(nn.Module):
    def __init__(self, n_colors: int, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * w * 16, 128), nn.ReLU(), nn.Dropout(0.2),
        )
        self.digit_head = nn.Linear(128, 10)
        # colour from per-channel pooled statistics too: the ink's colour is global
        self.color_head = nn.Linear(128 + 6, n_colors)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        flat = x.flatten(2)
        ink = flat.amax(dim=2)
        weights = flat.mean(dim=1, keepdim=True)  # brightness as a soft ink mask
        mean_ink = (flat * weights).sum(2) / weights.sum(2).clamp_min(1e-6)
        return self.digit_head(h), self.color_head(torch.cat([h, ink, mean_ink], dim=1))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x 16 x 16 in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != ORACLE_SIZE or x.shape[-2] != ORACLE_SIZE:
        x = F.interpolate(x, size=(ORACLE_SIZE, ORACLE_SIZE), mode="bilinear", align_corners=False,
                          antialias=True)
    return x


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Robustness to what generated images look like: a little blur, noise, brightness, shift."""
    n = x.shape[0]
    scale = 0.75 + 0.35 * torch.rand(n, 1, 1, 1, generator=gen)
    x = x * scale
    blur = torch.rand(n, generator=gen) < 0.3
    if blur.any():
        kernel = torch.tensor([0.25, 0.5, 0.25])
        k2 = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
        x[blur] = F.conv2d(x[blur], k2, padding=1, groups=3)
    x = x + 0.04 * torch.randn(x.shape, generator=gen) * (torch.rand(n, 1, 1, 1, generator=gen) < 0.5)
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    return x.clamp(0, 1)


def train_oracle(corpus: Corpus, epochs: int = 4, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                 progress: bool = True) -> Tuple[OracleNet, Dict[str, float]]:
    """Train on the corpus; the last 10 % is held out and its accuracies returned."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_all = to_tensor(corpus.images)
    d_all = torch.from_numpy(corpus.digits)
    c_all = torch.from_numpy(corpus.colors)
    n_val = max(1, len(corpus) // 10)
    n_train = len(corpus) - n_val
    model = OracleNet(len(corpus.palette))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * max(1, n_train // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    start = time.time()
    it = range(steps)
    if progress:
        from raybias.console import bar

        it = bar(iterable=it, desc="training oracle", unit="step", mininterval=2)
    model.train()
    for _ in it:
        idx = torch.randint(0, n_train, (batch_size,), generator=gen)
        x = _augment(x_all[idx].clone(), gen)
        d_logits, c_logits = model(x)
        loss = F.cross_entropy(d_logits, d_all[idx]) + F.cross_entropy(c_logits, c_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        d_logits, c_logits = model(x_all[n_train:])
    metrics = {
        "heldout_digit_acc": float((d_logits.argmax(1) == d_all[n_train:]).float().mean()),
        "heldout_color_acc": float((c_logits.argmax(1) == c_all[n_train:]).float().mean()),
        "train_seconds": time.time() - start,
    }
    model.palette = list(corpus.palette)
    return model, metrics


def save_oracle(model: OracleNet, folder: str, metrics: Optional[Dict] = None) -> str:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(folder, WEIGHTS))
    with open(os.path.join(folder, CONFIG), "w") as f:
        json.dump({"palette": list(model.palette), "size": ORACLE_SIZE, "metrics": metrics or {}}, f, indent=2)
    return folder


def builtin_oracle_folder() -> str:
    return str(resources.files("raybias") / "assets" / "oracle")


_CACHE: Dict[str, OracleNet] = {}


def check_oracle_folder(folder: Optional[str] = None, key: Optional[str] = None) -> str:
    """The oracle folder `load_oracle(folder)` reads (None: the shipped one); ConfigError if
    its weights or config are missing. `key`: the config key that named the folder (e.g.
    filter.oracle), put in the message. Needs no Ray and no run directory (raybias.stages.preflight)."""
    folder = folder or builtin_oracle_folder()
    if not (os.path.isfile(os.path.join(folder, WEIGHTS)) and os.path.isfile(os.path.join(folder, CONFIG))):
        named = f"config key '{key}' has value {folder!r}: " if key else ""
        raise ConfigError(f"{named}oracle weights missing in {folder} (rebuild with "
                          "`raybias base CONFIG base.model=builtin`)")
    return folder


def load_oracle(folder: Optional[str] = None) -> OracleNet:
    """The shipped oracle (or one saved in `folder`), in eval mode; cached per folder."""
    from safetensors.torch import load_file

    folder = folder or builtin_oracle_folder()
    if folder in _CACHE:
        return _CACHE[folder]
    check_oracle_folder(folder)
    weights, config = os.path.join(folder, WEIGHTS), os.path.join(folder, CONFIG)
    with open(config) as f:
        meta = json.load(f)
    model = OracleNet(len(meta["palette"]))
    model.load_state_dict(load_file(weights))
    model.palette = list(meta["palette"])
    model.eval()
    _CACHE[folder] = model
    return model


def palette_names(model: Optional[OracleNet] = None) -> List[str]:
    return list(model.palette) if model is not None else list(PALETTE_NAMES)


@torch.no_grad()
def predict(images: np.ndarray, model: Optional[OracleNet] = None,
            batch_size: int = 512) -> Tuple[np.ndarray, np.ndarray]:
    """(digit_probs N x 10, colour_probs N x len(palette)) for uint8 N x H x W x 3 images."""
    model = model or load_oracle()
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"oracle.predict expects uint8 N x H x W x 3 images, got shape {images.shape}")
    d_out, c_out = [], []
    for i in range(0, len(images), batch_size):
        d_logits, c_logits = model(to_tensor(images[i:i + batch_size]))
        d_out.append(d_logits.softmax(1).numpy())
        c_out.append(c_logits.softmax(1).numpy())
    if not d_out:
        return np.zeros((0, 10), np.float32), np.zeros((0, len(model.palette)), np.float32)
    return np.concatenate(d_out), np.concatenate(c_out)


def recognition_rate(images: np.ndarray, digits: np.ndarray, colors: np.ndarray,
                     model: Optional[OracleNet] = None) -> Dict[str, float]:
    """Fractions of images whose digit, colour, and both the oracle reads as intended."""
    d_probs, c_probs = predict(images, model)
    d_ok = d_probs.argmax(1) == np.asarray(digits)
    c_ok = c_probs.argmax(1) == np.asarray(colors)
    return {"digit": float(d_ok.mean()), "color": float(c_ok.mean()), "both": float((d_ok & c_ok).mean()),
            "n": int(len(d_ok))}
