"""Schedule, EMA, parameter groups, evaluation and logging for the training loop."""

from __future__ import annotations

import ast
import copy
import csv
import math
import os
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import DistInfo, all_reduce_sum

# Parameters never decayed even when a model does not list them in no_weight_decay(): QnA's relative
# position bias and attention scales, windowed attention's position tables, position embeddings.
NO_DECAY_NAME_PARTS = ("rpe_bias", "attn_scale", "relative_position_bias_table", "pos_embed")


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss (or parameters); ``step`` is the 1-based optimizer step."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (well mixed, unlike ``sum`` or ``hash``)."""
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1)
    )


def _literal(text: str) -> Any:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string option such as head=gap
    return tuple(value) if isinstance(value, list) else value


def parse_model_kwargs(items: Sequence[str]) -> Dict[str, Any]:
    """``["base_dim=32", "qna_layers=1,1,1,0"]`` -> ``{"base_dim": 32, "qna_layers": (1, 1, 1, 0)}``."""
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-kwargs takes key=value items, got {item!r}")
        out[key.strip().replace("-", "_")] = _literal(text.strip())
    return out


# ----------------------------------------------------------------------------------- optimisation
def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups: decay on weight matrices; none on ``model.no_weight_decay()`` names, on 1-D
    parameters (norms, biases, layer scales) and on position tables / attention scales by name."""
    exempt = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in exempt or p.ndim <= 1 or name.endswith(".bias") or any(s in name for s in NO_DECAY_NAME_PARTS):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class CosineSchedule:
    """Per-step learning rate: linear warm-up from ``warmup_lr`` to ``base_lr`` over ``warmup_steps``,
    then a cosine from ``base_lr`` down to ``min_lr`` at ``total_steps``. A pure function of the step,
    so resuming needs nothing but the step (the state is saved to check that the run is the same)."""

    def __init__(
        self, base_lr: float, total_steps: int, warmup_steps: int = 0, warmup_lr: float = 1e-6, min_lr: float = 1e-5
    ) -> None:
        self.base_lr, self.total_steps, self.warmup_steps = float(base_lr), int(total_steps), int(warmup_steps)
        self.warmup_lr, self.min_lr = float(warmup_lr), float(min_lr)

    def lr(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * t))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> Dict[str, float]:
        return {
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "warmup_lr": self.warmup_lr,
            "min_lr": self.min_lr,
        }

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.__init__(**state)


class ModelEma:
    """Exponential moving average of a model's parameters and buffers (timm's ModelEmaV3, simplified).

    ``ema = decay * ema + (1 - decay) * model`` after every optimizer step; with ``warmup`` the decay is
    ``min(decay, (1 + step) / (10 + step))`` so early averages do not drag the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, warmup: bool = False) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup = float(decay), warmup
        self._pairs: Optional[List[Any]] = None

    def _bind(self, model: nn.Module) -> None:
        ema_state, state = self.module.state_dict(), model.state_dict()
        floats = [(ema_state[k], state[k]) for k in ema_state if ema_state[k].is_floating_point()]
        others = [(ema_state[k], state[k]) for k in ema_state if not ema_state[k].is_floating_point()]
        self._pairs = [[e for e, _ in floats], [m for _, m in floats], others]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        if self._pairs is None:
            self._bind(model)
        decay = min(self.decay, (1.0 + step) / (10.0 + step)) if self.warmup else self.decay
        ema_f, model_f, others = self._pairs
        if ema_f:
            torch._foreach_lerp_(ema_f, model_f, 1.0 - decay)
        for e, m in others:
            e.copy_(m)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


# ----------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    info: DistInfo,
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    progress: Optional[Progress] = None,
) -> Dict[str, float]:
    """Top-1/top-5 accuracy (percent) and mean cross-entropy over every image of ``loader``, summed over
    all processes (each must see a disjoint shard). Also the wall time and images/s of the pass."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, images
    t0 = time.perf_counter()
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        hit = logits.topk(k, dim=1).indices.eq(y[:, None])
        sums += torch.stack(
            [
                F.cross_entropy(logits, y, reduction="sum"),
                hit[:, 0].sum(),
                hit.any(dim=1).sum(),
                torch.tensor(y.shape[0], device=device),
            ]
        ).double()
        if progress is not None:
            progress.update(1)
    all_reduce_sum(sums, info)
    loss, top1, top5, n = sums.tolist()
    seconds = time.perf_counter() - t0
    model.train(was_training)
    n = max(n, 1.0)
    return {
        "loss": loss / n,
        "top1": 100.0 * top1 / n,
        "top5": 100.0 * top5 / n,
        "images": int(n),
        "seconds": seconds,
        "images_per_s": n / max(seconds, 1e-9),
    }


# ----------------------------------------------------------------------------------- logging
class CsvLog:
    """Appends rows to a CSV file (header written once), flushed after every write; inactive off rank 0."""

    def __init__(self, path: str, fields: Sequence[str], enabled: bool = True) -> None:
        self.path, self.fields, self.enabled = path, list(fields), enabled

    def write(self, rows: Iterable[Dict[str, Any]]) -> None:
        if not self.enabled:
            return
        rows = list(rows)
        if not rows:
            return
        new = not os.path.isfile(self.path) or os.path.getsize(self.path) == 0
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerows(_fmt(r) for r in rows)


def _fmt(row: Dict[str, Any]) -> Dict[str, Any]:
    # repr() of a float round-trips exactly: two runs with identical losses give identical files.
    return {k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()}


def _use_tqdm(mode: str) -> bool:
    if mode == "plain" or mode == "none":
        return False
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return mode == "bar" or sys.stderr.isatty()


class Progress:
    """A tqdm bar when tqdm is installed and stderr is a terminal (or ``mode='bar'``), otherwise plain
    lines; ``write`` prints a line either way (above the bar). Silent when not ``enabled``."""

    def __init__(self, total: int, desc: str, enabled: bool = True, mode: str = "auto", initial: int = 0) -> None:
        self.enabled = enabled and mode != "none"
        self.bar = None
        if self.enabled and _use_tqdm(mode):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True, file=sys.stderr)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def set_postfix(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TensorBoard:
    """Scalars to TensorBoard when ``torch.utils.tensorboard`` imports (needs the tensorboard package)."""

    def __init__(self, log_dir: str, enabled: bool = True) -> None:
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard not installed
                return
            self.writer = SummaryWriter(log_dir=log_dir)

    @property
    def active(self) -> bool:
        return self.writer is not None

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                if v is not None and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
