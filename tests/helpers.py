"""Shared test helpers: random problem generation and the float64 oracle."""

from __future__ import annotations

import importlib.util
import os
import random
import sys
from types import ModuleType
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from qna_triton.reference import naive_qna_attention, output_size

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(name: str) -> ModuleType:
    """The script ``examples/<name>.py`` as a module (registered under ``name``, so a script that imports
    another, as demo.py imports train, finds it): the scripts are the checkout's tools, not installed."""
    if name in sys.modules and getattr(sys.modules[name], "__file__", "") == os.path.join(EXAMPLES, name + ".py"):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Case:
    B: int
    H: int
    W: int
    N: int
    h: int
    d: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    with_scale: bool = True

    @property
    def geometry(self) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]:
        return (self.kh, self.kw), (self.sh, self.sw), (self.ph, self.pw)

    @property
    def out_hw(self) -> Tuple[int, int]:
        return output_size(self.H, self.kh, self.sh, self.ph), output_size(self.W, self.kw, self.sw, self.pw)

    def __str__(self) -> str:
        return (f"B{self.B}_{self.H}x{self.W}_N{self.N}_h{self.h}_d{self.d}_k{self.kh}x{self.kw}"
                f"_s{self.sh}x{self.sw}_p{self.ph}x{self.pw}{'' if self.with_scale else '_noscale'}")


def random_cases(n: int, seed: int, max_k: int = 7, head_dims=(1, 3, 8, 12, 16)) -> list:
    """``n`` random valid configurations: odd/non-square images, even/non-square windows, stride 1-3,
    padding 0..k, 1-4 queries, 1-8 heads."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < n:
        kh, kw = rng.randint(1, max_k), rng.randint(1, max_k)
        if rng.random() < 0.5:
            kw = kh
        sh, sw = rng.randint(1, 3), rng.randint(1, 3)
        ph, pw = rng.randint(0, kh), rng.randint(0, kw)
        H, W = rng.randint(1, 11), rng.randint(1, 11)
        if kh > H + 2 * ph or kw > W + 2 * pw:
            continue
        cases.append(Case(rng.randint(1, 2), H, W, rng.randint(1, 4), rng.randint(1, 8), rng.choice(head_dims),
                          kh, kw, sh, sw, ph, pw, with_scale=rng.random() < 0.8))
    return cases


def make_inputs(case: Case, dtype=torch.float64, device="cpu", seed: int = 0, logit_scale: float = 2.0,
                query_minor_logits: bool = False):
    """Random ``logits, values, rpb, scale``; ``query_minor_logits`` stores the logits as the QnA
    layer's packed projection does (same values, other strides: the kernels' fast path)."""
    g = torch.Generator().manual_seed(seed)
    K = case.kh * case.kw

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype=dtype, device=device)

    logits = rnd(case.B, case.H, case.W, case.N, case.h, s=logit_scale)
    values = rnd(case.B, case.H, case.W, case.h, case.d)
    rpb = rnd(K, case.N, case.h, s=0.5)
    scale = rnd(K, case.N, case.h) if case.with_scale else None
    if query_minor_logits:
        logits = logits.transpose(-1, -2).contiguous().transpose(-1, -2)
    return logits, values, rpb, scale


def oracle(logits, values, rpb, scale: Optional[torch.Tensor], geometry) -> torch.Tensor:
    """The float64 naive reference, whatever the inputs' dtype."""
    f = lambda t: None if t is None else t.detach().double().cpu()  # noqa: E731
    return naive_qna_attention(f(logits), f(values), f(rpb), f(scale), *geometry)


# A two-stage QnA-ViT small enough to export and compile ahead of time in seconds on a CPU: a QnA
# block, a stride-2 down-sampling QnA block, an LSA block; maps 8 then 4 at 32x32 (any multiple of 16).
DEPLOY_VIT = dict(base_dim=16, qna_layers=(1, 0), lsa_layers=(0, 1), qna_heads=(2, 4), lsa_heads=(1, 2),
                  lsa_window=(4, 4), kernel_size=(3, 3), num_classes=10)
