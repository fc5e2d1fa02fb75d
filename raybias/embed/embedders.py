"""Image (and text) embedders, registered by name (`embed.embedder`, raybias/registry.py).

An embedder turns encoded images into L2-normalised float32 vectors:

    emb = get_embedder(cfg.embed)            # builtin (no download) or clip (hub id / folder)
    emb.dim                                  # vector length
    emb.embed_images([png_bytes, ...])       # -> np.ndarray [N, dim] float32, rows of norm 1
    emb.embed_texts(["a red three", ...])    # -> np.ndarray [N, dim] (CLIP only)

It works in-process and inside a Ray actor alike (`raybias.embed.vectors.embed_dataset`
builds one per actor); `register_embedder` adds one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, Mapping, Sequence, Union

import numpy as np

from raybias.config import ConfigError
from raybias.registry import EMBEDDERS, load_code


class Embedder(ABC):
    """Base class: subclasses set `name` and `dim` and implement `_images`/`_texts`."""

    name = "embedder"
    dim: int = 0
    # The canonical float type of the stored vectors.
    dtype = np.float32

    def embed_images(self, images: Sequence[bytes]) -> np.ndarray:
        """Encoded images (PNG/JPEG bytes) -> [N, dim] float32, each row of norm 1."""
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalize(self._images(list(images)))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> [N, dim] float32 in the image space, each row of norm 1."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalize(self._texts(list(texts)))

    @abstractmethod
    def _images(self, images: list) -> np.ndarray:
        """Unnormalised [N, dim] features of decoded-on-demand encoded images."""

    def _texts(self, texts: list) -> np.ndarray:
        raise ConfigError(f"embed.embedder={self.name} has no text encoder")

    def describe(self) -> Dict[str, Any]:
        return {"embedder": self.name, "dim": int(self.dim)}


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32, copy=False)


def register_embedder(name: str, factory: Callable[[Dict[str, Any]], Embedder]) -> None:
    """Make `embed.embedder=<name>` build `factory(options)` (options: the embed section)."""
    EMBEDDERS[name] = factory


def embedder_names():
    return tuple(EMBEDDERS)


def embed_options(embed_cfg: Union[Mapping[str, Any], Any, None]) -> Dict[str, Any]:
    """The embed section as a plain dict (picklable for Ray actors); defaults when None."""
    from omegaconf import DictConfig, OmegaConf

    from raybias.config import EmbedConfig

    if embed_cfg is None:
        return OmegaConf.to_container(OmegaConf.structured(EmbedConfig), resolve=True)
    if isinstance(embed_cfg, DictConfig):
        return OmegaConf.to_container(embed_cfg, resolve=True)
    return dict(embed_cfg)


def get_embedder(embed_cfg=None, device: str | None = None) -> Embedder:
    """Build the embedder named by `embed_cfg.embedder` (the `embed` config section or a dict).

    `device`: "cpu", "cuda", … ; None picks CUDA when embed.num_gpus > 0 and one is visible.
    """
    opts = embed_options(embed_cfg)
    name = opts.get("embedder", "builtin")
    if name not in EMBEDDERS:
        raise ConfigError(f"config key 'embed.embedder' has bad value {name!r}: allowed one of "
                          + ", ".join(sorted(EMBEDDERS)))
    factory = EMBEDDERS[name]
    if isinstance(factory, str):
        factory = load_code(factory)
    if device is None:
        device = _pick_device(float(opts.get("num_gpus") or 0))
    return factory(opts, device=device)


def _pick_device(num_gpus: float) -> str:
    if num_gpus <= 0:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"

