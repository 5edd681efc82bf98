"""What every result row names: device, versions, date; and the device-dependent constants."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from qna_triton.env import capture_environment

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


def detect_env(device: torch.device, smoke: bool) -> Env:
    """Reads the device's name and properties (L2 size decides how many input sets to rotate)."""
    e = capture_environment(device)
    cuda = str(e.cuda) if e.device_type == "cuda" else "none"
    return Env(
        e.device_type,
        e.device_name,
        e.torch,
        e.triton or "unavailable",
        cuda,
        e.date,
        e.l2_bytes,
        e.memory_bytes,
        smoke,
    )
