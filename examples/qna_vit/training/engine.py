"""The training loop's optimizer, schedule (timm's factory and cosine scheduler), evaluation and logging;
the model EMA is timm's ``ModelEmaV3``."""

from __future__ import annotations

import ast
import csv
import math
import os
import sys
import time
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from .distributed import DistInfo, all_reduce_sum


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
def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    layer_decay: Optional[float] = None,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """AdamW from timm's optimizer factory: weight decay on weight matrices, none on 1-D parameters
    (norms, biases, layer scales) nor on ``model.no_weight_decay()`` (QnA-ViT lists its position tables
    and attention scales there); ``layer_decay`` scales each layer's learning rate by depth (timm's
    layer-wise decay through the model's ``group_matcher``, for fine-tuning)."""
    kwargs: Dict[str, Any] = {"betas": tuple(betas), "eps": eps}
    if fused:
        kwargs["fused"] = True
    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay, layer_decay=layer_decay, **kwargs)


def decayed_parameter_count(optimizer: torch.optim.Optimizer) -> int:
    """Number of parameter elements the optimizer applies weight decay to."""
    return sum(p.numel() for g in optimizer.param_groups if g.get("weight_decay", 0.0) > 0 for p in g["params"])


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_lr: float = 1e-6,
    min_lr: float = 1e-5,
) -> CosineLRScheduler:
    """timm's cosine schedule per optimizer step (``step_update(step)``): a linear warm-up from
    ``warmup_lr`` to the optimizer's lr over ``warmup_steps``, then a cosine down to ``min_lr`` at
    ``total_steps`` (``min_lr`` equal to the lr: constant). A pure function of the step, so resuming
    needs nothing but the step; its state is saved to check that a resumed run is the same."""
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, total_steps - warmup_steps),
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=warmup_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def set_step_lr(scheduler: CosineLRScheduler, optimizer: torch.optim.Optimizer, step: int) -> float:
    """Sets the learning rates of optimizer step ``step`` (0-based); returns the largest (the one of
    the layers that layer-wise decay leaves unscaled)."""
    scheduler.step_update(step)
    return max(g["lr"] for g in optimizer.param_groups)


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
