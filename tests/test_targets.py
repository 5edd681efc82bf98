"""Every GPU a user owns: the target table, the heuristic's choice per target, ROCm, and the run-time
fallback from a banded variant that does not compile to the direct kernels (one warning, never an
exception). The compile matrix itself is tests/test_aot.py."""

import warnings

import pytest
import torch
import triton
from helpers import DEVICE, Case, make_inputs

from qna_triton import ops, tuning
from qna_triton.kernels import launch, qna_backward, qna_forward
from qna_triton.reference import direct_qna_attention
from qna_triton.tuning import TARGETS, Target, banded_config, select_config, target_for_capability, target_named
from qna_triton.tuning import targets as targets_mod

ISSUE_TARGETS = {"sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120", "gfx942", "gfx950"}


def test_the_table_names_every_target_with_its_limits():
    assert set(TARGETS) == ISSUE_TARGETS
    for t in TARGETS.values():
        assert t.vendor in ("nvidia", "amd") and t.warp_size == (32 if t.vendor == "nvidia" else 64)
        assert 64 * 1024 <= t.shared_per_block <= 228 * 1024 and t.registers_per_sm >= 65536
        assert set(t.banded) <= set(tuning.BANDED_KERNELS)
    # the consumer parts give one program 99 KB, the data-centre ones more
    assert {n for n, t in TARGETS.items() if t.shared_per_block == 99 * 1024} == {"sm_86", "sm_89", "sm_120"}
    assert target_named(90) is target_named("90") is target_named("SM_90") is TARGETS["sm_90"]
    with pytest.raises(ValueError, match="arch"):
        target_named("sm_75")


def test_capabilities_outside_the_table_take_their_family_or_nothing():
    assert target_for_capability((8, 7)).name == "sm_86"
    assert target_for_capability((10, 3)).name == "sm_100"
    assert target_for_capability((12, 1)).name == "sm_120"
    assert target_for_capability((7, 5)) is None and target_for_capability((11, 0)) is None
    assert targets_mod.target_for_gfx("gfx942:sramecc+:xnack-").name == "gfx942"
    assert targets_mod.target_for_gfx("gfx1100") is None


def _choice(arch, kernel, window, dtype=torch.bfloat16, head_dim=8):
    return select_config(
        kernel, dtype, 4, head_dim, 2, (window, window), (1, 1), 1, Target(known_arch=arch), algo="auto"
    )


def test_heuristic_takes_banded_kernels_only_where_the_table_allows(monkeypatch):
    for name in ("sm_80", "sm_86", "sm_89", "sm_120"):
        assert _choice(name, "fwd", 15) == banded_config((15, 15))
        assert _choice(name, "bwd", 15).algo == "direct"  # spills with mma.sync
    for name in ("sm_90", "sm_100"):
        assert _choice(name, "bwd", 15) == banded_config((15, 15), kernel="bwd")
    for name in ("gfx942", "gfx950"):  # the AMD backend rejects banded variants: direct only
        assert all(_choice(name, k, 15).algo == "direct" for k in ("fwd", "bwd_delta", "bwd"))
    # sm_100's banded delta: not before Triton 3.9, whose predecessors' compilers reject it
    sm100 = TARGETS["sm_100"]
    assert not sm100.banded_allowed("bwd_delta", (3, 6)) and not sm100.banded_allowed("bwd_delta", (3, 7))
    assert sm100.banded_allowed("bwd_delta", (3, 9)) and sm100.banded_allowed("fwd", (3, 6))
    monkeypatch.setattr(targets_mod, "installed_triton", lambda: (3, 7))
    assert _choice("sm_100", "bwd_delta", 15).algo == "direct"
    assert _choice("sm_100", "fwd", 15).algo == "banded"
    monkeypatch.setattr(targets_mod, "installed_triton", lambda: (3, 9))
    assert _choice("sm_100", "bwd_delta", 15).algo == "banded"


def test_a_rocm_build_reads_the_gfx_name_not_the_capability(monkeypatch):
    """ROCm's torch reports gfx942 as capability (9, 4): the table's gfx942 entry must decide (direct),
    not an sm_90-like capability (banded), and the launch path must not use NVIDIA's register model."""
    monkeypatch.setattr(torch.version, "hip", "6.4.0", raising=False)
    monkeypatch.setattr(tuning.selection, "_capability", lambda index: (9, 4))
    props = type("Props", (), {"gcnArchName": "gfx942:sramecc+:xnack-", "major": 9, "minor": 4})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    tuning.clear_cache()
    try:
        target = Target(tuned_index=0, cuda_index=0)
        assert target.arch().name == "gfx942" and target.capability() is None and target.describe() == "gfx942"
        assert (
            select_config("fwd", torch.bfloat16, 4, 8, 2, (15, 15), (1, 1), 1, Target(cuda_index=0), algo="auto").algo
            == "direct"
        )
        # `auto` runs the kernels on a ROCm GPU (its tensors are "cuda" tensors)
        monkeypatch.delenv("QNA_TRITON_BACKEND", raising=False)
        assert ops.resolve_backend(torch.device("cuda", 0), torch.bfloat16) == "triton"
        assert launch._resident_per_sm(None, {}, torch.device("cuda", 0)) is None
    finally:
        tuning.clear_cache()
    # tuned files of AMD GPUs are named after the device, like NVIDIA's
    assert tuning.config_file_name("AMD Instinct MI300X") == "amd_instinct_mi300x.json"


class _Rejected:
    """A kernel whose compiler rejects it, as Triton 3.7 does the banded delta on sm_100."""

    def __init__(self):
        self.calls = 0

    def __getitem__(self, grid):
        def launch(**kwargs):
            self.calls += 1
            raise RuntimeError("PassManager::run failed")

        return launch


@pytest.fixture
def fresh_fallback_state(monkeypatch):
    monkeypatch.setattr(launch, "_UNCOMPILABLE", {})
    monkeypatch.setattr(launch, "_WARNED", set())


def test_a_banded_variant_that_does_not_compile_runs_the_direct_kernels(monkeypatch, fresh_fallback_state):
    """Forced banded kernels whose compile fails: the forward and the backward give the direct results
    (equal to the float64 oracle), with one warning per kernel naming it, the target and the Triton
    release; the next call neither warns nor tries the variant again."""
    monkeypatch.setenv(tuning.ALGO_ENV, "banded")
    rejected = _Rejected()
    monkeypatch.setattr(launch, "qna_banded_kernel", rejected)
    monkeypatch.setattr(launch, "qna_banded_bwd_kernel", rejected)
    case = Case(B=1, H=6, W=7, N=2, h=2, d=4, k=3, s=1, p=1)
    logits, values, rpb, scale = make_inputs(case, dtype=torch.float32, device=DEVICE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, lse = qna_forward(logits, values, rpb, scale, *case.geometry)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        grads = qna_backward(g, logits, values, rpb, scale, lse, *case.geometry)
    messages = [str(w.message) for w in caught if "qna_triton: the banded" in str(w.message)]
    assert len(messages) == 3, messages  # fwd, bwd_delta, bwd
    for kernel, msg in zip(("fwd", "bwd_delta", "bwd"), messages):
        assert f"banded {kernel} kernel" in msg and triton.__version__ in msg and "direct" in msg
        assert "cpu" in msg  # the target: the interpreter's
    assert rejected.calls == 3

    ref_out, ref_lse = direct_qna_attention(*(t.double() for t in (logits, values, rpb, scale)), *case.geometry)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    with tuning.kernel_algorithm("direct"):
        direct = qna_backward(g, logits, values, rpb, scale, lse, *case.geometry)
    for a, b in zip(grads, direct):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        out2, lse2 = qna_forward(logits, values, rpb, scale, *case.geometry)
        qna_backward(g, logits, values, rpb, scale, lse2, *case.geometry)
    assert not [w for w in again if "qna_triton: the banded" in str(w.message)]
    assert rejected.calls == 3  # known not to compile: not tried again
    assert torch.equal(out2, out)


def test_explicit_configs_and_direct_kernels_still_raise(monkeypatch, fresh_fallback_state):
    """Only a chosen banded variant falls back. One given explicitly (the autotuner's candidates) raises,
    so that the tuner records it as failed instead of timing the direct kernels under its name; a direct
    kernel that does not compile has nothing to fall back to, and its error propagates."""
    rejected = _Rejected()
    monkeypatch.setattr(launch, "qna_banded_kernel", rejected)
    case = Case(B=1, H=6, W=7, N=2, h=2, d=4, k=3, s=1, p=1)
    logits, values, rpb, scale = make_inputs(case, dtype=torch.float32, device=DEVICE)
    with pytest.raises(RuntimeError, match="PassManager"):
        qna_forward(logits, values, rpb, scale, *case.geometry, config=banded_config((3, 3), 4, torch.float32))
    out, lse = qna_forward(logits, values, rpb, scale, *case.geometry)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="PassManager"):
        qna_backward(
            g,
            logits,
            values,
            rpb,
            scale,
            lse,
            *case.geometry,
            delta_config=banded_config((3, 3), 4, torch.float32, kernel="bwd_delta"),
        )
    assert rejected.calls == 2
    monkeypatch.setenv(tuning.ALGO_ENV, "direct")
    monkeypatch.setattr(launch, "qna_fwd_kernel", _Rejected())
    case = Case(B=1, H=5, W=5, N=1, h=1, d=4, k=3, s=1, p=1)
    logits, values, rpb, scale = make_inputs(case, dtype=torch.float32, device=DEVICE)
    with pytest.raises(RuntimeError, match="PassManager"):
        qna_forward(logits, values, rpb, scale, *case.geometry)


def test_a_banded_launch_that_fails_otherwise_still_raises(monkeypatch, fresh_fallback_state):
    """Only a compile failure falls back: any other error of a chosen banded launch (here a device
    error) propagates, and nothing is remembered as uncompilable."""

    class DeviceError:
        def __getitem__(self, grid):
            def launch(**kwargs):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

            return launch

    monkeypatch.setenv(tuning.ALGO_ENV, "banded")
    monkeypatch.setattr(launch, "qna_banded_kernel", DeviceError())
    case = Case(B=1, H=6, W=7, N=2, h=2, d=4, k=3, s=1, p=1)
    logits, values, rpb, scale = make_inputs(case, dtype=torch.float32, device=DEVICE)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        qna_forward(logits, values, rpb, scale, *case.geometry)
    assert not launch._UNCOMPILABLE
