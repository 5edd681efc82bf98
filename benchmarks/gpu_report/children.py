"""Measurements run in child processes (the only code of the report that imports torch): the environment and the launch
overhead."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from typing import Sequence

from .settings import LAUNCH_SHAPE


def child_environment(out_json: str, rehearse: bool) -> int:
    """Versions, device properties, ``nvidia-smi`` and the two ceilings, into ``out_json``."""
    import torch

    from qna_triton.env import capture_environment

    from ..env import sanitise
    from ..timing import TimingConfig

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    env = capture_environment(device)
    data = {
        "gpu": env.device_name,
        "device_key": sanitise(env.device_name),
        "torch": env.torch,
        "triton": env.triton,
        "cuda": env.cuda,
        "python": env.python,
        "cuda_available": cuda,
        "date": env.date,
        "l2_bytes": env.l2_bytes,
        "memory_bytes": env.memory_bytes,
    }
    if cuda:
        data.update(capability=env.capability, multiprocessors=env.multiprocessors)
    _save(out_json, data)
    fields = (
        "name",
        "driver_version",
        "pstate",
        "clocks.sm",
        "clocks.max.sm",
        "clocks.mem",
        "clocks.max.mem",
        "power.draw",
        "power.limit",
        "temperature.gpu",
        "memory.total",
    )
    smi = _nvidia_smi(fields)
    if "error" in smi:  # an older driver may lack a field: name and driver at least
        fallback = _nvidia_smi(fields[:2])
        smi = smi if "error" in fallback else {**fallback, "error": smi["error"]}
    data["nvidia_smi"] = smi
    data["driver"] = data["nvidia_smi"].get("driver_version")
    if "error" in smi or getattr(torch.version, "hip", None):  # an AMD machine: ROCm's own tool
        data["rocm_smi"] = _rocm_smi()
        data["driver"] = data["driver"] or data["rocm_smi"].get("driver_version")
    _save(out_json, data)
    print(json.dumps(data, indent=1), flush=True)
    from ..hw import measure_copy_bandwidth, measure_matmul_rate

    cfg = TimingConfig()
    bw, ms = measure_copy_bandwidth(device, cfg, nbytes=(1 << 30) if cuda else (32 << 20))
    data.update(copy_gb_s=bw / 1e9, copy_bytes=(1 << 30) if cuda else (32 << 20), copy_ms=ms)
    _save(out_json, data)
    n = 8192 if cuda else 256
    rate, ms = measure_matmul_rate(device, cfg, n=n)
    data.update(matmul_tflop_s=rate / 1e12, matmul_n=n, matmul_ms=ms)
    _save(out_json, data)
    print(f"copy {data['copy_gb_s']:.1f} GB/s, bf16 matmul {data['matmul_tflop_s']:.2f} TFLOP/s", flush=True)
    return 0


def _nvidia_smi(fields: Sequence[str]) -> dict:
    """``nvidia-smi``'s values of ``fields`` for the first GPU (read only: nothing is changed), or
    ``{"error": ...}``."""
    try:
        smi = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"{type(e).__name__}: {e}"[:200]}
    if smi.returncode != 0 or not smi.stdout.strip():
        return {"error": (smi.stderr or smi.stdout).strip()[:200] or f"exit {smi.returncode}"}
    return dict(zip(fields, (v.strip() for v in smi.stdout.strip().splitlines()[0].split(","))))


def _rocm_smi() -> dict:
    """``rocm-smi``'s product name, driver version and clocks of the first GPU as JSON (read only), or
    ``{"error": ...}`` saying why not (on a machine without it: that it is absent)."""
    try:
        smi = subprocess.run(
            ["rocm-smi", "--showproductname", "--showdriverversion", "--showclocks", "--json"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except FileNotFoundError:
        return {"error": "rocm-smi is absent"}
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"{type(e).__name__}: {e}"[:200]}
    try:
        report = json.loads(smi.stdout)
    except ValueError:
        return {"error": (smi.stderr or smi.stdout).strip()[:200] or f"exit {smi.returncode}"}
    first = next((v for k, v in report.items() if k.startswith("card")), {})
    driver = report.get("system", {}).get("Driver version")
    return {**({"driver_version": driver} if driver else {}), **{k: str(v) for k, v in first.items()}}


def child_launch(out_json: str, rehearse: bool) -> int:
    """Host-side cost: time per call of a tiny problem in eager mode, calls back to back."""
    import torch

    from qna_triton import qna_attention

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = LAUNCH_SHAPE
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    logits = torch.randn(s["B"], s["H"], s["W"], s["N"], s["h"], device=device, generator=g).to(dtype)
    values = torch.randn(s["B"], s["H"], s["W"], s["h"], s["d"], device=device, generator=g).to(dtype)
    rpb = torch.randn(s["k"] ** 2, s["N"], s["h"], device=device, generator=g)
    leaves = [t.requires_grad_() for t in (logits, values, rpb)]
    calls = 200 if device.type == "cuda" else 5

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def per_call_us(fn) -> float:
        for _ in range(5):
            fn()
        sync()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            times.append((time.perf_counter() - t0) / calls * 1e6)
        return statistics.median(times)

    def fwd():
        with torch.no_grad():
            qna_attention(logits, values, rpb, None, s["k"])

    def fwd_bwd():
        qna_attention(*leaves, None, s["k"]).sum().backward()

    data = {
        "shape": f"B{s['B']} {s['H']}x{s['W']} N{s['N']} h{s['h']} d{s['d']} k{s['k']} "
        f"{str(dtype).replace('torch.', '')}",
        # the library's default backend: the kernels on CUDA tensors, the PyTorch path on CPU ones
        "backend": "triton" if device.type == "cuda" else "reference",
        "device": device.type,
        "calls": calls,
    }
    data["fwd_us"] = per_call_us(fwd)
    data["fwd_bwd_us"] = per_call_us(fwd_bwd)
    _save(out_json, data)
    print(json.dumps(data), flush=True)
    return 0


def _save(path: str, data: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


CHILDREN = {"environment": child_environment, "launch": child_launch}
