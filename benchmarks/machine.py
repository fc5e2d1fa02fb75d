"""What machine a benchmark ran on: one shared helper for every script in this folder.

    from machine import machine          # the scripts run as `python benchmarks/bench_x.py`,
    print(machine())                     # so this folder is on sys.path
    print(machine("cuda", extra=("sklearn", "PIL")))

`machine(device)` returns one line starting with "machine: ": CPU model, cores, the load
average when this module was first imported (i.e. when the benchmark started, before its own
work loads the machine), the GPU when `device` is "cuda" and CUDA is available, and the
versions of python, torch (with its thread count), ray and diffusers, plus any `extra` packages.
torch is imported; other versions come from the already-imported module when there is one,
else from the installed package's metadata (so ray or diffusers are not imported just for this).
CPU, cores, versions and GPU name are raybias.machine's (the run report uses them too).
"""

from __future__ import annotations

import os
import platform
import sys

# the CPU, core count, versions and GPU come from the package (the report names the machine too)
from raybias.machine import PACKAGES as _PACKAGES, cores, cpu_model, gpu_name, version

__all__ = ["cpu_model", "cores", "load_at_start", "version", "gpu_name", "machine"]

# The load average when the benchmark started (this module is imported at the top of each script).
_LOAD_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def load_at_start() -> float:
    """1-minute load average when this module was first imported (NaN where unknown)."""
    return _LOAD_AT_START


def machine(device: str = "cpu", extra=()) -> str:
    """One line: "machine: CPU, cores, load at start[; GPU ...]; versions".

    device: "cpu" or "cuda" (a torch.device works too); the GPU is named only for cuda.
    extra: import names of further packages whose versions to add, e.g. ("numpy", "sklearn", "PIL").
    """
    device = str(getattr(device, "type", device))
    parts = [f"machine: {cpu_model()}, {cores()}, load average {load_at_start():.1f} at start"]
    if device.startswith("cuda"):
        parts.append(f"GPU {gpu_name(device) or 'none (CUDA not available)'}")
    try:  # imported for its full version (e.g. "+cu130") and thread count; every benchmark uses it anyway
        import torch

        torch_v = f"{torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:
        torch_v = "not installed"
    names = ["ray", "diffusers", *[e for e in extra if e not in ("torch", "ray", "diffusers")]]
    versions = [f"python {platform.python_version()}", f"torch {torch_v}"]
    versions += [f"{_PACKAGES.get(n, (n,))[0]} {version(n)}" for n in names]
    parts.append(", ".join(versions))
    return "; ".join(parts)


if __name__ == "__main__":
    print(machine(sys.argv[1] if len(sys.argv) > 1 else "cpu"))
