"""`make demo`: a QnA layer on a random image batch, forward and backward, with time and memory.

Runs the fused Triton kernels on a GPU and the PyTorch reference path on a CPU.
"""

from __future__ import annotations

import argparse
import time

import torch

from qna_triton import QnA
from qna_triton.ops import resolve_backend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=56)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kernel-size", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layer = QnA(args.width, args.width, args.heads, kernel_size=args.kernel_size).to(device)
    x = torch.randn(args.batch, args.size, args.size, args.width, device=device)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"backend {resolve_backend(device)}, compute dtype {dtype}")
    print(f"layer {layer}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            y = layer(x)
        y.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    print(f"input {tuple(x.shape)} -> output {tuple(y.shape)}")
    best = min(times[1:] or times)
    print(f"forward+backward: {best * 1e3:.2f} ms per step ({args.batch / best:.1f} images/s), best of {args.steps}")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
    else:
        try:
            import resource

            print(f"peak process memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB")
        except ImportError:
            pass


if __name__ == "__main__":
    main()
