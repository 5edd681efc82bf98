"""Datasets, transforms and the resumable, deterministic sampler.

Determinism is the design constraint here: a run that is killed and resumed must see exactly the
batches, and exactly the augmentations, an uninterrupted run would. So

* the order of an epoch is a permutation drawn from ``(seed, epoch)`` alone (:class:`ResumableSampler`),
  and resuming at step ``s`` starts that permutation at batch ``s`` instead of replaying the loader;
* every sample carries its own augmentation seed, a function of ``(seed, epoch, position)``, and its
  transform runs under that seed (:class:`SeededDataset`). Augmentations therefore do not depend on the
  number of loader workers, on which worker got the sample, or on how many processes share the batch.

Transforms come from timm when it is importable (RandAugment, random erasing, the exact ImageNet
recipe); otherwise a self-contained torch version does random-resized-crop, flip, colour jitter,
normalisation and random erasing (no RandAugment). The ImageFolder reader is torchvision's when
importable and an equivalent PIL reader otherwise.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler, get_worker_info

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DATA_BACKENDS = ("auto", "timm", "builtin")


def timm_available() -> bool:
    """Whether timm's data pipeline imports (it needs a working torchvision, which a CPU build of torch
    newer than the installed torchvision does not give: its C ops fail to register)."""
    try:
        import timm.data  # noqa: F401
    except Exception:  # ImportError, or RuntimeError from torchvision's operator registration
        return False
    return True


def torchvision_available() -> bool:
    try:
        import torchvision.datasets  # noqa: F401
    except Exception:
        return False
    return True


def resolve_data_backend(choice: str) -> str:
    """``auto`` -> ``timm`` when importable, else ``builtin``; an explicit ``timm`` must import."""
    if choice not in DATA_BACKENDS:
        raise ValueError(f"data backend must be one of {DATA_BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "timm" if timm_available() else "builtin"
    if choice == "timm" and not timm_available():
        raise RuntimeError("--data-backend timm: timm (and a torchvision matching this torch) do not import")
    return choice


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
    if prefer_torchvision and torchvision_available():
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


def to_float_tensor(img: Any) -> torch.Tensor:
    """PIL image, ``[H, W, C]`` uint8 array or ``[C, H, W]`` tensor -> ``[3, H, W]`` float32 in 0..1."""
    if isinstance(img, torch.Tensor):
        t = img
    else:
        arr = np.array(img)  # a copy: PIL buffers are read-only
        if arr.ndim == 2:
            arr = arr[..., None]
        t = torch.from_numpy(arr).permute(2, 0, 1)
    t = t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t.contiguous()


def _uniform(a: float, b: float) -> float:
    return float(torch.empty(()).uniform_(a, b))


def _randint(high: int) -> int:
    """Uniform in ``[0, high)``."""
    return int(torch.randint(0, high, ()))


def random_resized_crop_box(
    h: int, w: int, scale: Tuple[float, float], ratio: Tuple[float, float]
) -> Tuple[int, int, int, int]:
    """``(top, left, height, width)``: torchvision's RandomResizedCrop sampling (10 tries, then the
    largest central crop of an allowed aspect ratio)."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(*scale)
        aspect = math.exp(_uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return _randint(h - ch + 1), _randint(w - cw + 1), ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _resize(t: torch.Tensor, size: Tuple[int, int], interpolation: str) -> torch.Tensor:
    mode = "bicubic" if interpolation == "bicubic" else "bilinear"
    return F.interpolate(t[None], size=size, mode=mode, align_corners=False, antialias=True)[0].clamp_(0.0, 1.0)


def _grey(t: torch.Tensor) -> torch.Tensor:
    return (0.299 * t[0] + 0.587 * t[1] + 0.114 * t[2])[None]


def color_jitter(t: torch.Tensor, strength: float) -> torch.Tensor:
    """Brightness, contrast and saturation factors in ``[1 - s, 1 + s]``, applied in random order."""
    for op in torch.randperm(3).tolist():
        factor = _uniform(max(0.0, 1.0 - strength), 1.0 + strength)
        if op == 0:
            t = t * factor
        elif op == 1:
            mean = _grey(t).mean()
            t = (t - mean) * factor + mean
        else:
            g = _grey(t)
            t = (t - g) * factor + g
        t = t.clamp(0.0, 1.0)
    return t


def random_erase(
    t: torch.Tensor,
    prob: float,
    area: Tuple[float, float] = (0.02, 1 / 3),
    log_aspect: Tuple[float, float] = (math.log(0.3), math.log(1 / 0.3)),
) -> torch.Tensor:
    """timm's RandomErasing in ``pixel`` mode (one box of per-pixel normal noise), on a normalised image."""
    if prob <= 0.0 or _uniform(0.0, 1.0) >= prob:
        return t
    _, h, w = t.shape
    for _ in range(10):
        target = _uniform(*area) * h * w
        aspect = math.exp(_uniform(*log_aspect))
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if eh < h and ew < w:
            top, left = _randint(h - eh + 1), _randint(w - ew + 1)
            t = t.clone()
            t[:, top : top + eh, left : left + ew] = torch.randn(t.shape[0], eh, ew)
            return t
    return t


class _BuiltinTransform:
    """What the built-in transforms share: the config and the per-channel normalisation."""

    def __init__(self, cfg: AugConfig) -> None:
        self.cfg = cfg
        self.mean = torch.tensor(cfg.mean).view(3, 1, 1)
        self.std = torch.tensor(cfg.std).view(3, 1, 1)

    def normalize(self, t: torch.Tensor) -> torch.Tensor:
        return (t - self.mean) / self.std


class BuiltinTrainTransform(_BuiltinTransform):
    """Random-resized-crop, horizontal flip, colour jitter, normalise, random erasing, with torch ops.

    What timm's training transform does, minus RandAugment (which needs timm). Uses the global torch
    RNG, which :class:`SeededDataset` seeds per sample.
    """

    def __call__(self, img: Any) -> torch.Tensor:
        c = self.cfg
        t = to_float_tensor(img)
        top, left, ch, cw = random_resized_crop_box(t.shape[1], t.shape[2], c.scale, c.ratio)
        t = _resize(t[:, top : top + ch, left : left + cw], (c.img_size, c.img_size), c.interpolation)
        if c.hflip > 0 and _uniform(0.0, 1.0) < c.hflip:
            t = t.flip(-1)
        if c.color_jitter > 0:
            t = color_jitter(t, c.color_jitter)
        return random_erase(self.normalize(t), c.reprob)

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"BuiltinTrainTransform(size={c.img_size}, scale={c.scale}, hflip={c.hflip}, "
            f"color_jitter={c.color_jitter}, reprob={c.reprob}, interpolation={c.interpolation})"
        )


class BuiltinEvalTransform(_BuiltinTransform):
    """Resize the shorter side to ``floor(size / crop_pct)``, centre-crop ``size``, normalise (timm's eval)."""

    def __call__(self, img: Any) -> torch.Tensor:
        c = self.cfg
        t = to_float_tensor(img)
        h, w = t.shape[1:]
        short = int(math.floor(c.img_size / c.crop_pct))
        nh, nw = (short, max(1, int(short * w / h))) if h <= w else (max(1, int(short * h / w)), short)
        if (nh, nw) != (h, w):
            t = _resize(t, (nh, nw), c.interpolation)
        top, left = (nh - c.img_size) // 2, (nw - c.img_size) // 2
        return self.normalize(t[:, top : top + c.img_size, left : left + c.img_size])

    def __repr__(self) -> str:
        return f"BuiltinEvalTransform(size={self.cfg.img_size}, crop_pct={self.cfg.crop_pct})"


_warned_aa = False


def build_transform(cfg: AugConfig, train: bool, backend: str) -> Callable[[Any], torch.Tensor]:
    """The training or evaluation transform: timm's ``create_transform`` (``backend='timm'``) or the
    builtin torch version. Both end in a normalised ``[3, size, size]`` float tensor."""
    if backend == "timm":
        from timm.data import create_transform

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
    global _warned_aa
    if train and cfg.auto_augment and not _warned_aa:
        warnings.warn(
            f"auto-augment {cfg.auto_augment!r} needs timm, which does not import here; training "
            "without it (builtin transforms: crop, flip, colour jitter, random erasing)",
            stacklevel=2,
        )
        _warned_aa = True
    return BuiltinTrainTransform(cfg) if train else BuiltinEvalTransform(cfg)


# ----------------------------------------------------------------------------------- seeding, sampling
@contextlib.contextmanager
def seeded_rng(seed: int, python_and_numpy: bool = True) -> Iterator[None]:
    """Seeds torch's CPU generator and (``python_and_numpy``) ``random`` and ``numpy.random``: the RNGs
    that timm, torchvision and the builtin transforms draw from. In the main process (``workers=0``)
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
    under :func:`seeded_rng` (``seed``), plain indices with whatever the RNGs hold.

    ``torch_only``: the transform draws from torch's RNG alone (the builtin transforms), so ``random``
    and ``numpy.random`` need no seeding (saves about a millisecond per image).
    """

    def __init__(self, base: Dataset, transform: Callable[[Any], torch.Tensor], torch_only: bool = False) -> None:
        self.base, self.transform, self.torch_only = base, transform, torch_only

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: Any) -> Tuple[torch.Tensor, int]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        img, target = self.base[index]
        if seed is None:
            return self.transform(img), target
        with seeded_rng(seed, python_and_numpy=not self.torch_only):
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
