"""Errors shared by modules that must import without Ray (the sampling core on a GPU box
that has torch and diffusers but no Ray, e.g. benchmarks/device/). `raybias.ray_utils`
re-exports `ResourceError`, so `from raybias.ray_utils import ResourceError` is the same class."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """An error's first line of text (its type's name when it has none), for one-line messages."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ResourceError(RuntimeError):
    """The cluster lacks what the config asks for (e.g. GPUs); better than waiting forever."""
