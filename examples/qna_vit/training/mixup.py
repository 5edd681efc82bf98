"""Mixup / CutMix with label smoothing (``timm.data.Mixup``, batch mode) under an explicit seed per call,
and the matching losses (timm's soft-target cross-entropy)."""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

_soft_target_cross_entropy = SoftTargetCrossEntropy()


class SeededMixup:
    """``timm.data.Mixup(mode='batch')``, its numpy draws made under ``seed`` (the global numpy state is
    restored afterwards), so the mixing of a batch is a function of the training step alone and a
    resumed run mixes exactly as the interrupted one would have.

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
        self.fn = Mixup(
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            prob=prob,
            switch_prob=switch_prob,
            mode="batch",
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )

    def __call__(self, x: torch.Tensor, target: torch.Tensor, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if x.shape[0] % 2:
            raise ValueError(f"mixup needs an even batch per process, got {x.shape[0]}")
        state = np.random.get_state()
        np.random.seed(seed % 2**32)
        try:
            # timm mixes in place; the caller's batch stays as it was
            return self.fn(x.clone(), target)
        finally:
            np.random.set_state(state)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy in float32 on soft targets (``[B, classes]``, timm's ``SoftTargetCrossEntropy``) or on
    hard labels (``[B]``, optionally label-smoothed)."""
    if target.dim() == 2:
        return _soft_target_cross_entropy(logits.float(), target)
    return F.cross_entropy(logits.float(), target, label_smoothing=smoothing)
