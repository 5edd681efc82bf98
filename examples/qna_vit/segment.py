"""QnA-ViT as a dense-prediction backbone: a small semantic-segmentation head on its 4-level feature
pyramid (strides 4, 8, 16, 32), trained for a few steps on generated images.

    python examples/segment.py --model qna_vit_tiny --steps 200 --img-size 128
    python examples/segment.py --width 16 --steps 50        # a reduced backbone: quick on a CPU

The pyramid comes from timm's ``features_only=True`` wrapper (``--backend timm``, the default) or from
the model's own ``forward_intermediates`` (``--backend qna_vit``); both give the same NCHW maps, their
channels read off ``feature_info``. Any input size works: the LSA windows pad and mask maps they
do not tile. The head is a light FPN: a 1x1 projection of every level, all summed at stride 4, one 3x3
conv, a per-pixel classifier and a bilinear up-sampling to the input size.

The generated data: noise images with a few filled rectangles and discs; the label of a pixel is the
shape class covering it (0 for background).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from qna_vit import MODEL_CONFIGS, create_model

NUM_CLASSES = 3  # background, rectangle, disc


class SegmentationHead(nn.Module):
    """Light FPN: per-level 1x1 projections to ``dim`` channels summed at the finest level, a 3x3 conv
    (BatchNorm, ReLU), a 1x1 classifier, up-sampled to the input size."""

    def __init__(self, channels: Sequence[int], num_classes: int, dim: int = 64) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in channels)
        self.fuse = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU())
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor], size: Tuple[int, int]) -> torch.Tensor:
        top = features[0].shape[-2:]
        x = sum(
            F.interpolate(lat(f), size=top, mode="bilinear", align_corners=False) if f.shape[-2:] != top else lat(f)
            for lat, f in zip(self.lateral, features)
        )
        return F.interpolate(self.classifier(self.fuse(x)), size=size, mode="bilinear", align_corners=False)


class Segmenter(nn.Module):
    """Backbone pyramid -> :class:`SegmentationHead`; ``[B, 3, H, W]`` -> logits ``[B, classes, H, W]``."""

    def __init__(self, backbone: nn.Module, channels: Sequence[int], num_classes: int, timm_features: bool) -> None:
        super().__init__()
        self.backbone, self.timm_features = backbone, timm_features
        self.head = SegmentationHead(channels, num_classes)

    def features(self, x: torch.Tensor) -> List[torch.Tensor]:
        if self.timm_features:
            return list(self.backbone(x))
        return self.backbone.forward_intermediates(x, intermediates_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x), x.shape[-2:])


def reduced_architecture(width: int) -> Dict[str, Any]:
    """A ``width``-wide QnA-ViT with one block per stage (head dims 8 for QnA, 16 for LSA)."""
    if width < 16 or width % 16:
        raise ValueError(f"--width must be a positive multiple of 16, got {width}")
    return dict(
        base_dim=width,
        qna_layers=(1, 1, 1, 0),
        qna_heads=tuple(width * 2**s // 8 for s in range(4)),
        lsa_layers=(0, 0, 1, 1),
        lsa_heads=tuple(width * 2**s // 16 for s in range(4)),
    )


def build(model: str, width: Optional[int], backend: str, num_classes: int = NUM_CLASSES) -> Segmenter:
    """The segmenter on a ``model`` backbone (``width``: a reduced one), features from timm or qna_vit."""
    arch = reduced_architecture(width) if width else {}
    if backend == "timm":
        import timm

        backbone = timm.create_model(model, features_only=True, **arch)
        channels = backbone.feature_info.channels()
    else:
        backbone = create_model(model, num_classes=0, global_pool="", **arch)
        channels = [f["num_chs"] for f in backbone.feature_info]
    return Segmenter(backbone, channels, num_classes, timm_features=backend == "timm")


def generated_batch(batch: int, size: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Noise images with 1-3 rectangles (class 1) and discs (class 2) each, and their label maps."""
    images = torch.rand(batch, 3, size, size, generator=generator) * 0.3
    labels = torch.zeros(batch, size, size, dtype=torch.long)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for b in range(batch):
        for _ in range(int(torch.randint(2, 5, (1,), generator=generator))):
            cls = int(torch.randint(1, NUM_CLASSES, (1,), generator=generator))
            cy, cx = (torch.rand(2, generator=generator) * size).tolist()
            r = float(size) * (0.08 + 0.15 * float(torch.rand(1, generator=generator)))
            if cls == 1:
                mask = ((yy - cy).abs() < r) & ((xx - cx).abs() < r)
            else:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            colour = torch.rand(3, 1, generator=generator) * 0.7 + 0.3
            images[b][:, mask] = colour
            labels[b][mask] = cls
    return images, labels


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qna_vit_tiny", choices=sorted(MODEL_CONFIGS))
    ap.add_argument("--width", type=int, default=None, help="a reduced backbone of this width, one block per stage")
    ap.add_argument(
        "--backend",
        default="timm",
        choices=("timm", "qna_vit"),
        help="the pyramid from timm's features_only wrapper or from forward_intermediates",
    )
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--output", default=None, help="save the trained segmenter's state dict here")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.img_size < 32:
        ap.error("--steps and --batch-size must be >= 1, --img-size >= 32")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    torch.manual_seed(args.seed)
    net = build(args.model, args.width, args.backend).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.01)
    # A fixed set of 4 batches, cycled: a few steps must show the loss going down.
    gen = torch.Generator().manual_seed(args.seed)
    data = [generated_batch(args.batch_size, args.img_size, gen) for _ in range(4)]
    losses = []
    net.train()
    for step in range(args.steps):
        images, labels = (t.to(device) for t in data[step % len(data)])
        logits = net(images)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step + 1}/{args.steps} loss {losses[-1]:.4f}")
    net.eval()
    with torch.no_grad():
        images, labels = (t.to(device) for t in data[0])
        logits = net(images)
        accuracy = (logits.argmax(1) == labels).float().mean().item()
        feats = net.features(images)
    k = max(1, min(3, len(losses) // 4))
    summary = {
        "steps": args.steps,
        "first_loss": sum(losses[:k]) / k,
        "last_loss": sum(losses[-k:]) / k,
        "pixel_accuracy": accuracy,
        "logits_shape": list(logits.shape),
        "feature_channels": [f.shape[1] for f in feats],
        "feature_strides": [args.img_size // f.shape[-1] for f in feats],
    }
    print(
        f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f} | pixel accuracy {accuracy:.3f} | "
        f"pyramid channels {summary['feature_channels']} strides {summary['feature_strides']}"
    )
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        torch.save(net.state_dict(), args.output)
    return summary


if __name__ == "__main__":
    main()
    sys.exit(0)
