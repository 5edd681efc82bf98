"""The compile matrix: every kernel's default plan compiles for every target of the table (NVIDIA sm_80
to sm_120 through the ptxas Triton ships, AMD gfx942 / gfx950 through its AMD backend; no GPU needed).

The interpreter accepts kernels a GPU would reject; this closes that gap on CPU-only CI and reads
the compiler's report: the default configurations must not spill more than SPILL_BOUND_BYTES, nor take
more shared memory than the target gives a program. Compilation needs the real Triton compiler, so it
runs in a subprocess without ``TRITON_INTERPRET``; CI runs it under both release stacks.
"""

import json
import os
import subprocess
import sys

import pytest

from qna_triton.tuning import TARGETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "qna_triton.kernels.aot", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.exists(), proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc


def test_every_kernel_compiles_for_every_target(compiled):
    results, proc = compiled
    failed = [r for r in results if not r["ok"]]
    assert not failed, failed
    assert proc.returncode == 0
    kinds = {(r["arch"], r["kernel"], r.get("algo", "direct")) for r in results}
    assert {(a, k) for a, k, _ in kinds} == {(a, k) for a in TARGETS for k in ("fwd", "bwd_delta", "bwd")}
    assert {r["head_dim"] for r in results} >= {8, 12, 16, 32, 64, 128}
    # the banded variants each target's heuristic may take (and only those) are in its plan
    for name, target in TARGETS.items():
        banded = {k for a, k, algo in kinds if a == name and algo == "banded"}
        assert banded == {k for k in ("fwd", "bwd_delta", "bwd") if target.banded_allowed(k)}, name
    for r in results:
        assert r["shared_bytes"] <= TARGETS[r["arch"]].shared_per_block, r


# Bytes of spills (stored + loaded; AMD: scratch bytes per lane) a default configuration may have. ptxas
# sometimes trades a few (L1-resident) spills for occupancy: 8-64 bytes under Triton 3.6 and 3.9. A tile
# that really does not fit spills hundreds of bytes, which is what this guards against.
SPILL_BOUND_BYTES = 64
# The banded forward's larger tiles (k = 31 in bf16, tf32x3 operands on sm_100) trade up to 192 bytes for
# two 8-warp programs per SM (sm_80 at k = 31 under Triton 3.9: 72 stored + 68 loaded, 128 registers,
# where 0 spills take 180); the sm_86/sm_89 tf32x3 tiles that spill 200-300 bytes are not chosen there
# (targets.GPUArch.tf32x3_banded), so they are not in the plan.
BANDED_SPILL_BOUND_BYTES = 200


def _spill_limit(r) -> int:
    return BANDED_SPILL_BOUND_BYTES if r.get("algo") == "banded" else SPILL_BOUND_BYTES


def test_default_configs_spill_at_most_a_few_registers(compiled):
    results, _ = compiled
    spilling = [r for r in results if r["ok"] and r["spill_stores"] + r["spill_loads"] > _spill_limit(r)]
    assert not spilling, spilling
    assert all(r["registers"] <= (255 if TARGETS[r["arch"]].vendor == "nvidia" else 512) for r in results if r["ok"])


def _value_loops(result):
    """The loops that multiply-add the values: they load, and their d-wide FFMAs outnumber their
    exponentials at least two to one (three to one or more under Triton 3.6 and 3.9; the logits-only
    loops are the other way round)."""
    return [lp for lp in result["loops"] if lp["global_loads"] and lp["ffma"] >= 2 * max(1, lp["exp2"])]


def test_layer_layout_keeps_window_loops_free_of_layout_conversions(compiled):
    """On the QnA layer's packed layout (query-minor logits, [h, d] values) at the benchmark's head
    shape, the forward and delta kernels' window loops hold no shared-memory round trips (no
    barriers), and the value loads are 128-bit vectors; under Triton 3.6 the generic [N, h] logits
    layout needs barriers there (Triton 3.9 avoids them for it too). This is what `_head_blocks`'s
    compile-time offsets are for: a change that loses it fails here."""
    results, _ = compiled
    pick = {
        (r["kernel"], r["layout"]): r
        for r in results
        if r["ok"]
        and r["arch"] == "sm_90"
        and (r["heads"], r["head_dim"], r["n_queries"]) == (16, 8, 2)
        and not r.get("wide")
        and r.get("algo") != "banded"
    }
    for kernel in ("fwd", "bwd_delta"):
        packed, generic = pick[(kernel, "packed")], pick[(kernel, "generic")]
        assert packed["loop_barriers"] == 0, packed["loops"]
        assert generic["loop_barriers"] >= packed["loop_barriers"], generic["loops"]
        value_loops = _value_loops(packed)
        assert value_loops and all(lp["global_loads"].get("128", 0) >= 1 for lp in value_loops), value_loops


def test_unaligned_projection_width_still_gets_vector_loads(compiled):
    """4 heads x 32 with 2 queries: the layer's projection is 8 + 128 = 136 columns wide, not a multiple
    of 16, so Triton's own specialisation cannot prove the pixels aligned; the kernels' pixel-stride
    alignment (`_pixel_align`) must still give 128-bit value loads in the forward's value loop."""
    results, _ = compiled
    fwd = next(
        r
        for r in results
        if r["ok"]
        and r["arch"] == "sm_90"
        and r["kernel"] == "fwd"
        and r["layout"] == "packed"
        and r.get("algo") != "banded"
        and (r["heads"], r["head_dim"], r["n_queries"]) == (4, 32, 2)
    )
    value_loops = _value_loops(fwd)
    assert value_loops and all(lp["global_loads"].get("128", 0) >= 1 for lp in value_loops), value_loops


def test_banded_forward_runs_its_window_rows_on_tensor_cores(compiled):
    """The banded forward compiles for every NVIDIA target at its default tiles (every dtype, head dims 8
    to 128, both halo widths); its window-row loop issues tensor-core products and only one exponential
    per source pixel and per band element (``E`` and ``T'``), never one per (pixel, offset) pair. (With
    16-wide value chunks the compiler recomputes ``E`` in the threads that share it rather than moving
    it: up to twice the count, a per-pair form would issue ``16 * 16 * k`` per row: 7,936 at k = 31, against a bound of 4,096.)"""
    results, _ = compiled
    banded = [r for r in results if r.get("algo") == "banded"]
    nvidia = {n for n, t in TARGETS.items() if t.vendor == "nvidia"}
    assert {r["arch"] for r in banded} == nvidia and {r["dtype"] for r in banded} == {"bf16", "fp16", "fp32"}
    for r in banded:
        assert r["ok"], r
        mma_loops = [lp for lp in r["loops"] if lp["mma"] > 0]
        assert len(mma_loops) == 1, r["loops"]
        halo = max(16, 1 << (15 + r["window"] - 1).bit_length())
        threads = 32 * r["config"]["num_warps"]
        if r["head_dim"] <= 32:  # head dim 128: the replication grows with the threads along d (docs/kernels.md)
            assert mma_loops[0]["exp2"] * threads <= 2 * (16 + 16) * halo, (r["window"], mma_loops[0])
