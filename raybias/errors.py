"""Errors shared by modules that must import without Ray (the sampling core on a GPU box
that has torch and diffusers but no Ray, e.g. benchmarks/device/). `raybias.ray_utils`
re-exports `ResourceError`, so `from raybias.ray_utils import ResourceError` is the same class."""

from __future__ import annotations


class ResourceError(RuntimeError):
    """The cluster lacks what the config asks for (e.g. GPUs); better than waiting forever."""
