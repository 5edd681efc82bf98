"""The GPU architectures the kernels are built for: one table that the heuristics, the autotuner and the
ahead-of-time compile check (``python -m qna_triton.kernels.aot --arch T``) all read.

Per target: the vendor and Triton backend, the warp (wavefront) width, the shared memory (LDS) one
program may take, the register file, and the matrix instructions Triton lowers ``tl.dot`` to there.
``banded`` names the kernels whose banded (tensor-core) form the heuristic may choose on the target, each
with the oldest Triton release whose compiler builds it for that target (by the compile check's matrix,
``docs/kernels.md``); a kernel not named there always takes the direct algorithm by default (it can still
be forced or tuned, and a variant that then fails to compile falls back to the direct one at run time).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple, Union

import torch
import triton

# The Triton releases the library supports: the banded kernels' entries below were compiled under both.
OLDEST_TRITON = (3, 6)

_ALL_BANDED = {"fwd": OLDEST_TRITON, "bwd_delta": OLDEST_TRITON, "bwd": OLDEST_TRITON}
# sm_80/86/89/120 (mma.sync): the banded main backward kernel's default tile spills 140-210 bytes there
# (its split products' operands all live in registers; sm_90's warpgroup products read them from shared
# memory), so the heuristic leaves it to the autotuner.
_NO_BANDED_BWD = {"fwd": OLDEST_TRITON, "bwd_delta": OLDEST_TRITON}


@dataclass(frozen=True)
class GPUArch:
    """One compile target and the limits a configuration must respect on it."""

    name: str  # "sm_90", "gfx942": what --arch and the reports print
    vendor: str  # "nvidia" or "amd"
    arch: Union[int, str]  # Triton's GPUTarget arch: compute capability x10, or the gfx name
    warp_size: int
    shared_per_block: int  # bytes of shared memory (LDS) one program may allocate
    registers_per_sm: int  # 32-bit registers per SM (per CU: its VGPRs across the SIMDs' lanes)
    max_threads_per_sm: int
    matrix_unit: str  # the instructions tl.dot becomes: mma.sync, wgmma, tcgen05, mfma
    gpus: str  # examples, for the docs
    banded: Mapping[str, Tuple[int, int]] = field(default_factory=dict)
    # whether the banded kernels' float32-operand products (tf32x3: float16 and float32 inputs of the
    # forward and the delta) are taken by default; sm_86/sm_89's ptxas spills 200-300 bytes on them
    tf32x3_banded: bool = True

    @property
    def backend(self) -> str:
        """Triton's backend name for this target."""
        return "cuda" if self.vendor == "nvidia" else "hip"

    @property
    def capability(self) -> Optional[Tuple[int, int]]:
        """The CUDA compute capability (None for AMD)."""
        return divmod(int(self.arch), 10) if self.vendor == "nvidia" else None

    def gpu_target(self):
        """Triton's ``GPUTarget`` for this architecture."""
        from triton.backends.compiler import GPUTarget

        return GPUTarget(self.backend, self.arch, self.warp_size)

    def banded_allowed(
        self, kernel: str, triton_version: Optional[Tuple[int, int]] = None, dtype: Optional[torch.dtype] = None
    ) -> bool:
        """Whether the heuristic may take ``kernel``'s banded form here under ``triton_version``
        (default: the installed Triton), for inputs of ``dtype`` (None: for some dtype)."""
        oldest = self.banded.get(kernel)
        version = triton_version or installed_triton()
        if oldest is None or version < oldest:
            return False
        return self.tf32x3_banded or dtype is None or not uses_tf32x3(kernel, dtype)


_KB = 1024
TARGETS: Mapping[str, GPUArch] = {
    t.name: t
    for t in (
        GPUArch("sm_80", "nvidia", 80, 32, 163 * _KB, 65536, 2048, "mma.sync", "A100, A800", _NO_BANDED_BWD),
        GPUArch(
            "sm_86",
            "nvidia",
            86,
            32,
            99 * _KB,
            65536,
            1536,
            "mma.sync",
            "RTX 3090, A40, A10, RTX A6000",
            _NO_BANDED_BWD,
            tf32x3_banded=False,
        ),
        GPUArch(
            "sm_89",
            "nvidia",
            89,
            32,
            99 * _KB,
            65536,
            1536,
            "mma.sync",
            "RTX 4090, L40S, L4, RTX 6000 Ada",
            _NO_BANDED_BWD,
            tf32x3_banded=False,
        ),
        GPUArch("sm_90", "nvidia", 90, 32, 227 * _KB, 65536, 2048, "wgmma", "H100, H200, GH200", _ALL_BANDED),
        # Triton 3.6 and 3.7 fail to build the banded delta kernel in bf16 for sm_100 ("PassManager::run
        # failed" in the tensor-memory layout pass); 3.9 builds it, 3.8 is unchecked.
        GPUArch(
            "sm_100",
            "nvidia",
            100,
            32,
            227 * _KB,
            65536,
            2048,
            "tcgen05",
            "B200, GB200",
            {"fwd": OLDEST_TRITON, "bwd_delta": (3, 9), "bwd": OLDEST_TRITON},
        ),
        GPUArch(
            "sm_120", "nvidia", 120, 32, 99 * _KB, 65536, 1536, "mma.sync", "RTX 5090, RTX PRO 6000", _NO_BANDED_BWD
        ),
        # AMD: the banded kernels do not all build through Triton's AMD backend yet (the main backward kernel
        # on gfx942, the forward too on gfx950), and none has run on AMD hardware: direct only by default.
        GPUArch("gfx942", "amd", "gfx942", 64, 64 * _KB, 512 * 64 * 4, 2048, "mfma", "MI300X, MI300A, MI325X"),
        GPUArch("gfx950", "amd", "gfx950", 64, 160 * _KB, 512 * 64 * 4, 2048, "mfma", "MI350X, MI355X"),
    )
}


def uses_tf32x3(kernel: str, dtype: torch.dtype) -> bool:
    """Whether ``kernel``'s banded form multiplies float32 (tf32x3) operands for ``dtype`` inputs: the
    forward and the delta for float16 and float32, the main backward kernel for float32 (float16 takes
    split bfloat16 products there)."""
    return dtype == torch.float32 or (dtype == torch.float16 and kernel != "bwd")


def installed_triton() -> Tuple[int, int]:
    """(major, minor) of the installed Triton."""
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def target_named(name: Union[str, int]) -> GPUArch:
    """The target ``name`` (``"90"``, ``90``, ``"sm_90"``, ``"gfx942"``); ValueError naming the choices."""
    key = str(name).strip().lower()
    key = f"sm_{key}" if key.isdigit() else key
    if key not in TARGETS:
        raise ValueError(f"arch must be one of {', '.join(TARGETS)} (or the number of an sm_ target); got {name!r}")
    return TARGETS[key]


def target_for_capability(capability: Tuple[int, int]) -> Optional[GPUArch]:
    """The NVIDIA target of a device of ``capability``: its own entry, else the newest entry of the same
    major version below it (sm_87 -> sm_86, sm_103 -> sm_100, sm_121 -> sm_120); None when there is none
    (older GPUs, or a new family: the direct kernels only)."""
    major, minor = capability
    same = [
        t for t in TARGETS.values() if t.vendor == "nvidia" and t.capability[0] == major and t.capability[1] <= minor
    ]
    return max(same, key=lambda t: t.capability) if same else None


def target_for_gfx(gfx: str) -> Optional[GPUArch]:
    """The AMD target of a ``gcnArchName`` such as ``"gfx942:sramecc+:xnack-"``; None when not in the table."""
    t = TARGETS.get(gfx.split(":")[0].strip().lower())
    return t if t is not None and t.vendor == "amd" else None


def is_rocm() -> bool:
    """Whether this torch is a ROCm (HIP) build: its "cuda" devices are AMD GPUs."""
    return getattr(torch.version, "hip", None) is not None


@functools.lru_cache(maxsize=16)
def device_target(index: int) -> Optional[GPUArch]:
    """The target of GPU ``index`` (a ROCm build reports a CUDA-like capability, e.g. (9, 4) for gfx942,
    so its gfx name is asked first); None for a GPU outside the table."""
    props = torch.cuda.get_device_properties(index)
    if is_rocm():
        return target_for_gfx(getattr(props, "gcnArchName", ""))
    return target_for_capability((props.major, props.minor))
