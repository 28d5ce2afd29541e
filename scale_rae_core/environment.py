"""What this machine has: versions and devices (for `srae env` and run records)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe() -> dict:
    """Versions of the stack and the devices torch can see; never imports torch_xla (it may be broken)."""
    import torch

    from scale_rae_core.version import __version__

    cuda = []
    if torch.cuda.is_available():
        cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "srae": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "torch_xla": _version("torch_xla"),
        "webdataset": _version("webdataset"),
        "huggingface_hub": _version("huggingface_hub"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_devices": cuda,
        "tpu_device_files": sorted(p for p in os.listdir("/dev") if p.startswith("accel")) if os.path.isdir("/dev") else [],
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE", "0"),
    }
