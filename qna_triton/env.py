"""What a measurement names beside its numbers: the device, the software versions, the date.

One definition for everything that records a run (the autotuner's config files, the benchmarks' rows,
the training summary, the evaluation results), so they all name a machine the same way.
"""

from __future__ import annotations

import datetime
import platform
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Union

import torch

__all__ = ["Environment", "capture_environment", "triton_version", "utc_now"]


def utc_now() -> str:
    """The current time in UTC, ISO 8601 to the second (``2026-11-24T18:00:00+00:00``)."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()


def triton_version() -> Optional[str]:
    """Triton's version, or None where it cannot be imported (it is optional off Linux)."""
    try:
        import triton
    except Exception:  # a missing or broken install: the record says so instead of failing
        return None
    return triton.__version__


@dataclass(frozen=True)
class Environment:
    """The machine and software of a run. Device fields are None on a CPU."""

    device_type: str  # "cuda" or "cpu"
    device_name: str  # the CUDA device name, or "cpu (<processor>)"
    capability: Optional[str]  # CUDA compute capability, "9.0"
    multiprocessors: Optional[int]
    memory_bytes: Optional[int]  # total device memory
    l2_bytes: Optional[int]
    torch: str
    triton: Optional[str]
    cuda: Optional[str]  # the CUDA version torch was built with (None for a CPU build)
    python: str
    qna_triton: str
    date: str  # UTC, ISO 8601, to the second

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def capture_environment(device: Union[torch.device, str, None] = None) -> Environment:
    """The environment of a run on ``device`` (default: the current CUDA device if there is one, else
    the CPU)."""
    from . import __version__

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    common = dict(
        torch=torch.__version__,
        triton=triton_version(),
        cuda=torch.version.cuda,
        python=platform.python_version(),
        qna_triton=__version__,
        date=utc_now(),
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        l2 = getattr(props, "L2_cache_size", None)
        return Environment(
            "cuda",
            torch.cuda.get_device_name(device),
            f"{props.major}.{props.minor}",
            int(props.multi_processor_count),
            int(props.total_memory),
            int(l2) if l2 else None,
            **common,
        )
    processor = platform.processor() or platform.machine()
    return Environment(device.type, f"{device.type} ({processor})", None, None, None, None, **common)
