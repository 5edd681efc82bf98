"""Datasets, transforms and the resumable, deterministic sampler.

Determinism is the design constraint here: a run that is killed and resumed must see exactly the
batches, and exactly the augmentations, an uninterrupted run would. So

* the order of an epoch is a permutation drawn from ``(seed, epoch)`` alone (:class:`ResumableSampler`),
  and resuming at step ``s`` starts that permutation at batch ``s`` instead of replaying the loader;
* every sample carries its own augmentation seed, a function of ``(seed, epoch, position)``, and its
  transform runs under that seed (:class:`SeededDataset`). Augmentations therefore do not depend on the
  number of loader workers, on which worker got the sample, or on how many processes share the batch.

The transforms are timm's (``create_transform``: RandAugment, random erasing, the exact ImageNet
recipe). The ImageFolder reader is torchvision's when importable and an equivalent PIL reader
otherwise.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from timm.data import create_transform
from torch.utils.data import Dataset, Sampler, get_worker_info

from ..config import IMAGENET_MEAN, IMAGENET_STD

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------------- generated data
def _disk(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + v * v <= 1.0


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.8


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (v >= -0.85) & (v <= 0.75) & (np.abs(u) <= (v + 0.85) * 0.6)


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r2 = u * u + v * v
    return (r2 >= 0.36) & (r2 <= 1.0)


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.28) & (av <= 0.95)) | ((av <= 0.28) & (au <= 0.95))


def _diamond(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.abs(u) + np.abs(v) <= 1.0


def _bars(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (np.maximum(np.abs(u), np.abs(v)) <= 0.85) & (np.floor((v + 0.85) * 3.0) % 2 == 0)


def _saltire(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return (np.abs(au - av) <= 0.3) & (np.maximum(au, av) <= 0.9)


SHAPES: Tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], ...] = (
    _disk,
    _square,
    _triangle,
    _ring,
    _cross,
    _diamond,
    _bars,
    _saltire,
)
SHAPE_NAMES = ("disk", "square", "triangle", "ring", "cross", "diamond", "bars", "saltire")
COLOUR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "white")
PALETTE = np.array(
    [
        (0.95, 0.15, 0.10),  # red
        (0.10, 0.85, 0.20),  # green
        (0.15, 0.30, 1.00),  # blue
        (0.95, 0.90, 0.10),  # yellow
        (0.90, 0.15, 0.90),  # magenta
        (0.10, 0.90, 0.90),  # cyan
        (1.00, 0.55, 0.05),  # orange
        (0.95, 0.95, 0.95),  # white
    ],
    dtype=np.float32,
)


class SyntheticShapes(Dataset):
    """A generated classification set: one coloured shape on a noisy, tinted background.

    Class ``c`` is the pair (shape ``c % 8``, colour ``(c + c // 8) % 8``); the diagonal colour
    assignment makes both cues necessary from 9 classes on. Classes beyond 64 add a background stripe
    texture whose frequency is ``c // 64``, so any number of classes is well defined. Position, size,
    rotation, shade, background tint and pixel noise are random per image, so a model must learn the
    shape and colour, not memorise pixels; a small QnA-ViT reaches high accuracy on 10 classes within
    a few hundred steps. Images are rendered on the fly from ``(seed, split, index)``: nothing is stored,
    and the same index always gives the same image. Labels are balanced (``index % num_classes``).

    Args:
        num_classes: number of classes (>= 1).
        num_images: dataset length.
        image_size: side of the square images.
        seed: generation seed; train and val of the same seed are disjoint (``split`` enters the seed).
        split: a name mixed into every image's seed (``train``/``val``).
        noise: standard deviation of the per-pixel Gaussian noise (image range 0..1).
        as_pil: return ``PIL.Image`` (what timm/torchvision transforms expect) instead of an
            ``[H, W, 3]`` uint8 array.
    """

    def __init__(
        self,
        num_classes: int,
        num_images: int,
        image_size: int,
        seed: int = 0,
        split: str = "train",
        noise: float = 0.08,
        as_pil: bool = False,
    ) -> None:
        if num_classes < 1 or num_images < 1 or image_size < 8:
            raise ValueError(
                f"need num_classes >= 1, num_images >= 1, image_size >= 8; got "
                f"{num_classes}, {num_images}, {image_size}"
            )
        self.num_classes, self.num_images, self.image_size = num_classes, num_images, image_size
        self.seed, self.split, self.noise, self.as_pil = seed, split, noise, as_pil
        self._split_code = int.from_bytes(split.encode()[:8].ljust(8, b"\0"), "little")
        self.classes = [self.class_name(c) for c in range(num_classes)]
        self.targets = [i % num_classes for i in range(num_images)]

    @staticmethod
    def class_spec(label: int) -> Tuple[int, int, int]:
        """``(shape index, palette index, texture frequency)`` of a class."""
        return label % 8, (label + label // 8) % 8, label // 64

    @classmethod
    def class_name(cls, label: int) -> str:
        shape, colour, texture = cls.class_spec(label)
        return f"{COLOUR_NAMES[colour]}-{SHAPE_NAMES[shape]}" + (f"-t{texture}" if texture else "")

    def __len__(self) -> int:
        return self.num_images

    def render(self, index: int) -> np.ndarray:
        """Image ``index`` as an ``[H, W, 3]`` uint8 array."""
        rng = np.random.default_rng([self.seed, self._split_code, index])
        shape, colour, texture = self.class_spec(index % self.num_classes)
        s = self.image_size
        xx, yy = self._grid()
        img = np.empty((s, s, 3), dtype=np.float32)
        img[:] = rng.uniform(0.05, 0.45, size=3).astype(np.float32)
        if texture:
            theta = rng.uniform(0.0, math.pi)
            wave = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * np.float32(4 * math.pi * texture / s))
            img += 0.12 * wave[..., None]
        radius = rng.uniform(0.22, 0.38) * s
        cx, cy = rng.uniform(radius, s - radius, size=2)
        angle = rng.uniform(-0.35, 0.35)
        # The shape's frame: (u, v) = rotated offset from the centre, in radii.
        c, sn = np.float32(math.cos(angle) / radius), np.float32(math.sin(angle) / radius)
        dx, dy = xx - np.float32(cx), yy - np.float32(cy)
        u, v = dx * c + dy * sn, dy * c - dx * sn
        mask = SHAPES[shape](u, v)
        img[mask] = PALETTE[colour] * rng.uniform(0.75, 1.0) + rng.normal(0.0, 0.04, size=3)
        noise = rng.standard_normal(img.shape, dtype=np.float32)
        noise *= np.float32(self.noise)
        img += noise
        np.clip(img, 0.0, 1.0, out=img)
        img *= 255.0
        img += 0.5
        return img.astype(np.uint8)

    def _grid(self) -> Tuple[np.ndarray, np.ndarray]:
        """Pixel-centre coordinates ``(x, y)``, ``[H, W]`` float32 each, computed once per process."""
        if getattr(self, "_xy", None) is None:
            yy, xx = np.mgrid[0 : self.image_size, 0 : self.image_size].astype(np.float32) + np.float32(0.5)
            self._xy = (xx, yy)
        return self._xy

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        arr = self.render(index)
        if self.as_pil:
            from PIL import Image

            return Image.fromarray(arr), index % self.num_classes
        return arr, index % self.num_classes


# ----------------------------------------------------------------------------------- image folders
class ImageFolderDataset(Dataset):
    """``root/<class>/**/<image>`` -> ``(PIL RGB image, class index)``; torchvision's ImageFolder without
    torchvision. Classes are the sorted sub-folder names; files are sorted and filtered by extension."""

    def __init__(self, root: str, extensions: Sequence[str] = IMG_EXTENSIONS) -> None:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        self.root = root
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"no class sub-folders in {root!r} (expected root/<class>/<image>)")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        exts = tuple(e.lower() for e in extensions)
        self.samples: List[Tuple[str, int]] = []
        for cls in self.classes:
            files = []
            for dirpath, _, names in os.walk(os.path.join(root, cls), followlinks=True):
                files += [os.path.join(dirpath, n) for n in names if n.lower().endswith(exts)]
            self.samples += [(f, self.class_to_idx[cls]) for f in sorted(files)]
        if not self.samples:
            raise FileNotFoundError(f"no images with extensions {exts} under {root!r}")
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        from PIL import Image

        path, target = self.samples[index]
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        return img, target


def image_folder(root: str, prefer_torchvision: bool = True) -> Dataset:
    """torchvision's ``ImageFolder`` when it imports, :class:`ImageFolderDataset` otherwise (same
    classes, same order, same ``(PIL image, target)`` items)."""
    if prefer_torchvision:
        from torchvision.datasets import ImageFolder

        return ImageFolder(root)
    return ImageFolderDataset(root)


@dataclass
class DataSpec:
    """Where the images come from: an ImageFolder tree or the generated set."""

    data_dir: Optional[str] = None
    train_split: str = "train"
    val_split: str = "val"
    synthetic: bool = False
    synthetic_classes: int = 10
    synthetic_train_size: int = 1280
    synthetic_val_size: int = 256
    synthetic_image_size: int = 224
    synthetic_seed: int = 0


def build_dataset(spec: DataSpec, split: str, as_pil: bool) -> Tuple[Dataset, int]:
    """The ``train`` or ``val`` dataset of ``spec`` (untransformed items) and its number of classes."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if spec.synthetic:
        size = spec.synthetic_train_size if split == "train" else spec.synthetic_val_size
        ds = SyntheticShapes(
            spec.synthetic_classes,
            size,
            spec.synthetic_image_size,
            seed=spec.synthetic_seed,
            split=split,
            as_pil=as_pil,
        )
        return ds, spec.synthetic_classes
    if not spec.data_dir:
        raise ValueError("give --data-dir (an ImageFolder tree with train/ and val/) or --synthetic")
    folder = os.path.join(spec.data_dir, spec.train_split if split == "train" else spec.val_split)
    ds = image_folder(folder)
    return ds, len(ds.classes)


# ----------------------------------------------------------------------------------- transforms
@dataclass
class AugConfig:
    """The image pipeline; defaults are the paper's ImageNet recipe (timm names in brackets)."""

    img_size: int = 224
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: float = 0.5
    color_jitter: float = 0.3
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"  # [aa]
    reprob: float = 0.25
    interpolation: str = "bicubic"
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875


def build_transform(cfg: AugConfig, train: bool) -> Callable[[Any], torch.Tensor]:
    """The training or evaluation transform of ``cfg``: timm's ``create_transform`` (PIL image in, a
    normalised ``[3, size, size]`` float tensor out). It draws from ``random``, ``numpy.random`` and
    torch's RNG, which :class:`SeededDataset` seeds per sample."""
    return create_transform(
        input_size=cfg.img_size,
        is_training=train,
        scale=cfg.scale,
        ratio=cfg.ratio,
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.auto_augment,
        interpolation=cfg.interpolation,
        mean=cfg.mean,
        std=cfg.std,
        re_prob=cfg.reprob,
        re_mode="pixel",
        re_count=1,
        crop_pct=cfg.crop_pct,
    )


# ----------------------------------------------------------------------------------- seeding, sampling
@contextlib.contextmanager
def seeded_rng(seed: int, python_and_numpy: bool = True) -> Iterator[None]:
    """Seeds torch's CPU generator and (``python_and_numpy``) ``random`` and ``numpy.random``: the RNGs
    that timm's and torchvision's transforms draw from. In the main process (``workers=0``)
    the previous states are restored afterwards, so the per-sample seeds do not disturb the training
    RNG; in a loader worker nothing else uses them."""
    restore = get_worker_info() is None
    if restore:
        saved_torch = torch.random.get_rng_state()
        if python_and_numpy:
            saved_py, saved_np = random.getstate(), np.random.get_state()
    torch.random.default_generator.manual_seed(seed)
    if python_and_numpy:
        random.seed(seed)
        np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        if restore:
            torch.random.set_rng_state(saved_torch)
            if python_and_numpy:
                random.setstate(saved_py)
                np.random.set_state(saved_np)


class SeededDataset(Dataset):
    """Applies ``transform`` to ``base``'s images; items requested as ``(index, seed)`` are transformed
    under :func:`seeded_rng` (``seed``), plain indices with whatever the RNGs hold."""

    def __init__(self, base: Dataset, transform: Callable[[Any], torch.Tensor]) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: Any) -> Tuple[torch.Tensor, int]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        img, target = self.base[index]
        if seed is None:
            return self.transform(img), target
        with seeded_rng(seed):
            return self.transform(img), target


class ResumableSampler(Sampler):
    """Training order as a pure function of ``(seed, epoch)``, resumable at any step.

    Each epoch is a permutation of the dataset drawn from ``(seed, epoch)``, cut into optimizer steps of
    ``global_batch = batch_size * world_size * accum_steps`` samples (an incomplete last step is
    dropped). Within step ``s``, micro-batch ``a`` of rank ``r`` takes the ``batch_size`` positions
    starting at ``s * global_batch + (a * world_size + r) * batch_size``. So the samples of an optimizer
    step are the same for any split of the global batch into processes and accumulation steps, and
    :meth:`set_epoch` with ``start_step`` skips consumed steps without loading them.

    Yields ``(dataset index, augmentation seed)``; the seed is drawn from ``(seed, epoch)`` per position.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        accum_steps: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.world_size, self.rank, self.accum_steps = world_size, rank, accum_steps
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = batch_size * world_size * accum_steps
        self.steps_per_epoch = num_samples // self.global_batch
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the dataset ({num_samples} images) is smaller than one global batch "
                f"({batch_size} x {world_size} processes x {accum_steps} accumulation steps)"
            )
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Selects the epoch (its permutation) and the first optimizer step to yield."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside 0..{self.steps_per_epoch}")
        self.epoch, self.start_step = epoch, start_step

    def epoch_order(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(permutation, per-position augmentation seeds)`` of ``epoch``."""
        n = self.num_samples
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        seeds = np.random.default_rng([self.seed, epoch, 1]).integers(0, 2**62, size=n)
        return order, seeds

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        order, seeds = self.epoch_order(self.epoch)
        b = self.batch_size
        for step in range(self.start_step, self.steps_per_epoch):
            for a in range(self.accum_steps):
                start = step * self.global_batch + (a * self.world_size + self.rank) * b
                for p in range(start, start + b):
                    yield int(order[p]), int(seeds[p])

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum_steps * self.batch_size


class ShardSampler(Sampler):
    """Evaluation order: rank ``r`` of ``world_size`` takes indices ``r, r + world_size, ...`` (every
    image exactly once over all ranks, no padding, so summed metrics are exact)."""

    def __init__(self, num_samples: int, world_size: int = 1, rank: int = 0) -> None:
        super().__init__()
        self.indices = range(rank, num_samples, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
