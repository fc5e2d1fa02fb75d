"""The CLIP embedder: transformers' CLIPModel with its tokenizer and image processor.

`embed.model` is a hub id (e.g. openai/clip-vit-base-patch32) or a local folder written by
`save_pretrained` (config.json, model.safetensors, tokenizer files, preprocessor_config.json).
Weights are loaded from safetensors only and no remote code is ever run. Image and text
vectors live in the same projection space (CLIP's `projection_dim`), L2-normalised, so
`embed_images(x) @ embed_texts(t).T` is CLIP's cosine similarity.
"""

from __future__ import annotations

import os
from typing import Any, Dict

import numpy as np

from raybias.config import ConfigError
from raybias.data.images import decode
from raybias.embed.embedders import Embedder


def _features(out) -> "Any":
    """transformers 4 returns the projected tensor; 5 returns an output whose pooler_output is it."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        pooled = out[1] if isinstance(out, (tuple, list)) else out["pooler_output"]
    return pooled


def check_clip_model(model_id) -> None:
    """ConfigError if embed.model is unset, or spelled as a local path (/x, ./x, ../x, ~/x,
    a/b/c) that is not a folder. A hub id (org/name) cannot be checked without fetching it.
    Needs no Ray and no run directory (raybias.stages.preflight calls it)."""
    if not model_id:
        raise ConfigError("config key 'embed.model' is not set: embed.embedder=clip needs a CLIP hub id "
                          "or a local folder")
    text = str(model_id)
    local = os.path.expanduser(text)
    spelled_as_path = text.startswith(("/", "./", "../", "~")) or text.count("/") >= 2
    if spelled_as_path and not os.path.isdir(local):
        raise ConfigError(f"config key 'embed.model' has value {text!r}: folder not found (give a local CLIP "
                          "folder written by save_pretrained, or a hub id such as openai/clip-vit-base-patch32)")


class ClipEmbedder(Embedder):
    name = "clip"

    def __init__(self, options: Dict[str, Any], device: str = "cpu"):
        import torch
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        model_id = options.get("model")
        check_clip_model(model_id)
        local = os.path.expanduser(str(model_id))
        source = os.path.abspath(local) if os.path.isdir(local) else str(model_id)
        try:
            self.model = CLIPModel.from_pretrained(source, use_safetensors=True)
            self.tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
            self.processor = CLIPImageProcessor.from_pretrained(source)
        except (OSError, ValueError) as exc:
            where = "local folder" if os.path.isdir(local) else "hub id (not a local folder)"
            raise ConfigError(f"embed.model={model_id!r} ({where}) could not be loaded as a CLIP model "
                              f"with safetensors weights, tokenizer and image processor: {exc}") from exc
        self.device = device
        self.model.eval().to(device)
        self.batch_size = int(options.get("batch_size") or 64)
        self.dim = int(self.model.config.projection_dim)
        text_positions = int(self.model.config.text_config.max_position_embeddings)
        self.max_length = min(int(getattr(self.tokenizer, "model_max_length", text_positions) or text_positions),
                              text_positions)
        self.source = source
        self._torch = torch

    def _images(self, images: list) -> np.ndarray:
        torch = self._torch
        out = []
        for start in range(0, len(images), self.batch_size):
            # decode() gives read-only arrays; torch wants writable ones.
            chunk = [decode(b, where=f"image {start + i}").copy()
                     for i, b in enumerate(images[start:start + self.batch_size])]
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"].to(self.device)
            with torch.inference_mode():
                feats = _features(self.model.get_image_features(pixel_values=pixels))
            out.append(feats.float().cpu().numpy())
        return np.concatenate(out)

    def _texts(self, texts: list) -> np.ndarray:
        torch = self._torch
        out = []
        for start in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            with torch.inference_mode():
                feats = _features(self.model.get_text_features(
                    input_ids=tok["input_ids"].to(self.device),
                    attention_mask=tok["attention_mask"].to(self.device)))
            out.append(feats.float().cpu().numpy())
        return np.concatenate(out)

    def describe(self) -> Dict[str, Any]:
        return {"embedder": self.name, "dim": self.dim, "model": self.source, "device": self.device}
