"""Mixup / CutMix with label smoothing (timm's ``batch`` mode) and the matching losses.

:class:`Mixup` is a self-contained version of ``timm.data.Mixup`` (same sampling of lambda and of the
CutMix box, same soft targets); :class:`TimmMixup` wraps timm's own. Both take an explicit seed per
call, so the mixing of a batch is a function of the training step alone and survives a resume.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F


def smoothed_one_hot(target: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """``1 - smoothing + smoothing / n`` at the label, ``smoothing / n`` elsewhere (timm's convention)."""
    off = smoothing / num_classes
    out = torch.full((target.shape[0], num_classes), off, device=target.device, dtype=torch.float32)
    return out.scatter_(1, target.long().view(-1, 1), 1.0 - smoothing + off)


def mixup_target(target: torch.Tensor, num_classes: int, lam: float, smoothing: float) -> torch.Tensor:
    """Soft targets of a batch mixed with its reverse: ``lam * y + (1 - lam) * y.flip(0)``, smoothed."""
    y = smoothed_one_hot(target, num_classes, smoothing)
    return y * lam + y.flip(0) * (1.0 - lam)


def cutmix_box(rng: np.random.Generator, h: int, w: int, lam: float) -> Tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of a box of about ``(1 - lam)`` of the image at a uniform centre, clipped
    to the image (timm's ``rand_bbox``)."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    y0, y1 = int(np.clip(cy - ch // 2, 0, h)), int(np.clip(cy + ch // 2, 0, h))
    x0, x1 = int(np.clip(cx - cw // 2, 0, w)), int(np.clip(cx + cw // 2, 0, w))
    return y0, y1, x0, x1


class Mixup:
    """timm's ``Mixup(mode='batch')``: with probability ``prob`` mix the whole batch with its reverse,
    by CutMix (probability ``switch_prob`` when both are on) or by Mixup, lambda ~ Beta(alpha, alpha);
    CutMix's lambda is corrected to the clipped box's area.

    ``__call__(x [B, C, H, W], target [B], seed) -> (mixed x, soft targets [B, num_classes])``.
    """

    def __init__(
        self,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        num_classes: int = 1000,
    ) -> None:
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob = prob, switch_prob
        self.label_smoothing, self.num_classes = label_smoothing, num_classes

    def __call__(self, x: torch.Tensor, target: torch.Tensor, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if x.shape[0] % 2:
            raise ValueError(f"mixup needs an even batch per process, got {x.shape[0]}")
        rng = np.random.default_rng(seed)
        lam, cutmix = 1.0, False
        if rng.random() < self.prob:
            if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
                cutmix = bool(rng.random() < self.switch_prob)
                alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
                lam = float(rng.beta(alpha, alpha))
            elif self.mixup_alpha > 0:
                lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
            elif self.cutmix_alpha > 0:
                cutmix, lam = True, float(rng.beta(self.cutmix_alpha, self.cutmix_alpha))
        if cutmix:
            h, w = x.shape[-2:]
            y0, y1, x0, x1 = cutmix_box(rng, h, w, lam)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
        elif lam < 1.0:
            x = x * lam + x.flip(0) * (1.0 - lam)
        return x, mixup_target(target, self.num_classes, lam, self.label_smoothing)


class TimmMixup:
    """``timm.data.Mixup`` (batch mode) behind the same interface; its numpy draws run under ``seed``
    and the global numpy state is restored afterwards."""

    def __init__(
        self,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        num_classes: int = 1000,
    ) -> None:
        from timm.data import Mixup as _TimmMixup

        self.fn = _TimmMixup(
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            prob=prob,
            switch_prob=switch_prob,
            mode="batch",
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )

    def __call__(self, x: torch.Tensor, target: torch.Tensor, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
        state = np.random.get_state()
        np.random.seed(seed % 2**32)
        try:
            return self.fn(x, target)
        finally:
            np.random.set_state(state)


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum(target * log_softmax(logits))``, in float32."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy on hard labels (optionally label-smoothed) or on soft targets, in float32."""
    if target.dim() == 2:
        return soft_target_cross_entropy(logits, target)
    return F.cross_entropy(logits.float(), target, label_smoothing=smoothing)
