"""The fused QnA kernels (``forward``, ``backward``, ``banded``, ``banded_bwd``), their launcher
(:mod:`.launch`: the problem description, one launch builder per kernel, the backward's occupancy
model, the entry points) and the ahead-of-time compile check (:mod:`.aot`). This module only
re-exports the launcher's public names."""

from .launch import (
    BackwardLaunches,
    KernelLaunch,
    Problem,
    backward_launches,
    delta_launch,
    forward_launch,
    main_backward_launch,
    qna_backward,
    qna_forward,
    resident_programs,
)

__all__ = [
    "qna_forward",
    "qna_backward",
    "Problem",
    "KernelLaunch",
    "BackwardLaunches",
    "forward_launch",
    "delta_launch",
    "main_backward_launch",
    "backward_launches",
    "resident_programs",
]
