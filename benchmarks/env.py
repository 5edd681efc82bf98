"""What every result row names: device, versions, date; and the device-dependent constants."""

from __future__ import annotations

import datetime as _dt
import platform
from dataclasses import asdict, dataclass
from typing import Optional

import torch

__all__ = ["Env", "detect_env", "sanitise"]


def sanitise(name: str) -> str:
    """A device name as a folder name, as the library names its per-GPU files (the autotuner's report
    lands in the same folder): ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia_h100_80gb_hbm3"``."""
    from qna_triton.tuning import sanitize_gpu_name

    return sanitize_gpu_name(name)


@dataclass(frozen=True)
class Env:
    """The machine and software a run measured on."""

    device: str  # "cuda" or "cpu"
    gpu: str  # the CUDA device name, or "cpu (<processor>)"
    torch: str
    triton: str
    cuda: str
    date: str  # UTC, ISO 8601, to the second
    l2_bytes: Optional[int]
    total_memory_bytes: Optional[int]
    smoke: bool

    def as_dict(self) -> dict:
        return asdict(self)


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception as e:  # triton is optional on CPU
        return f"unavailable ({type(e).__name__})"


def detect_env(device: torch.device, smoke: bool) -> Env:
    """Reads the device's name and properties (L2 size decides how many input sets to rotate)."""
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        l2 = getattr(props, "L2_cache_size", None)
        return Env("cuda", torch.cuda.get_device_name(device), torch.__version__, _triton_version(),
                   str(torch.version.cuda), now, int(l2) if l2 else None, int(props.total_memory), smoke)
    proc = platform.processor() or platform.machine()
    return Env("cpu", f"cpu ({proc})", torch.__version__, _triton_version(), "none", now, None, None, smoke)
