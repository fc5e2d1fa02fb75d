"""What machine this process runs on: CPU, cores, memory, GPUs and package versions.

Used by the report (a "Machine" line in report.md) and by the benchmarks
(benchmarks/machine.py builds its line from these functions). Nothing here runs work on a GPU:
torch is asked only whether it sees CUDA, how many devices and their names (which initialises
CUDA in the asking process: the report asks as the run's last stage).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Dict, List, Optional, Sequence

__all__ = ["PACKAGES", "cpu_model", "cores", "memory_bytes", "version", "versions", "gpu_name", "gpus",
           "describe", "machine_line"]

# import name -> (label, distribution name)
PACKAGES = {
    "raybias": ("raybias", "raybias"),
    "torch": ("torch", "torch"),
    "ray": ("ray", "ray"),
    "diffusers": ("diffusers", "diffusers"),
    "numpy": ("numpy", "numpy"),
    "sklearn": ("scikit-learn", "scikit-learn"),
    "PIL": ("Pillow", "Pillow"),
    "pyarrow": ("pyarrow", "pyarrow"),
}

# the versions the report names
REPORT_PACKAGES = ("raybias", "ray", "torch", "diffusers")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else platform.processor(), else "unknown"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cores() -> str:
    """"N cores", or "N cores (M usable)" when this process may run on fewer of them."""
    n = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = n
    return f"{n} cores" + (f" ({usable} usable)" if usable != n else "")


def memory_bytes() -> Optional[int]:
    """Physical memory in bytes (sysconf, else /proc/meminfo), None where unknown."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _memory_text(b: Optional[int]) -> str:
    return "memory unknown" if b is None else f"{int(b) / 2 ** 30:.0f} GiB memory"


def version(name: str) -> str:
    """Version of the package imported as `name`, or "not installed".

    From the already-imported module when there is one, else from the installed
    distribution's metadata (so nothing is imported just for its version)."""
    dist = PACKAGES.get(name, (name, name))[1]
    mod = sys.modules.get(name)
    if mod is not None and getattr(mod, "__version__", None):
        return str(mod.__version__)
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions(names: Sequence[str] = REPORT_PACKAGES) -> Dict[str, str]:
    """{label: version} for the packages imported as `names`."""
    return {PACKAGES.get(n, (n,))[0]: version(n) for n in names}


def _cuda_torch():
    """torch when it is installed and sees CUDA, else None."""
    try:
        import torch
    except ImportError:
        return None
    try:
        return torch if torch.cuda.is_available() else None
    except Exception:  # a broken driver is "no GPU" here, not a failed report
        return None


def gpu_name(device: str = "cuda") -> Optional[str]:
    """The name (and CUDA version) of GPU 0 when `device` is cuda and CUDA is available, else None."""
    if not str(device).startswith("cuda"):
        return None
    torch = _cuda_torch()
    if torch is None:
        return None
    return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"


def gpus() -> List[str]:
    """The names of the CUDA devices torch sees (empty without torch, CUDA or a device)."""
    torch = _cuda_torch()
    if torch is None:
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def _gpu_text(names: Sequence[str], cuda: Optional[str]) -> str:
    """"2 × NVIDIA H200 (CUDA 12.4)", "1 × A, 1 × B", or "none (torch sees no CUDA device)"."""
    if not names:
        return "none (torch sees no CUDA device)"
    counts: Dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    text = ", ".join(f"{c} × {n}" for n, c in counts.items())
    return text + (f" (CUDA {cuda})" if cuda else "")


def describe(packages: Sequence[str] = REPORT_PACKAGES) -> Dict[str, object]:
    """The machine as a dict: cpu, cores, memory_bytes, gpus (names), cuda, versions."""
    names = gpus()
    cuda = None
    if names:
        import torch

        cuda = torch.version.cuda
    return {"cpu": cpu_model(), "cores": cores(), "memory_bytes": memory_bytes(), "gpus": names, "cuda": cuda,
            "python": platform.python_version(), "versions": versions(packages)}


def machine_line(info: Optional[Dict[str, object]] = None) -> str:
    """One line: "CPU, N cores, M GiB memory; GPU …; raybias x, ray y, torch z, diffusers w"."""
    info = describe() if info is None else info
    gpu = _gpu_text(list(info.get("gpus") or []), info.get("cuda"))
    vers = ", ".join(f"{k} {v}" for k, v in dict(info.get("versions") or {}).items())
    return (f"{info['cpu']}, {info['cores']}, {_memory_text(info.get('memory_bytes'))}; GPU: {gpu}; "
            f"python {info.get('python', platform.python_version())}, {vers}")
