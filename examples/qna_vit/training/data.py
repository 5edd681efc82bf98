"""Datasets, transforms and the resumable, deterministic sampler.

Determinism is the design constraint here: a run that is killed and resumed must see exactly the
batches, and exactly the augmentations, an uninterrupted run would. So

* the order of an epoch is a permutation drawn from ``(seed, epoch)`` alone (:class:`ResumableSampler`),
  and resuming at step ``s`` starts that permutation at batch ``s`` instead of replaying the loader;
* every sample carries its own augmentation seed, a function of ``(seed, epoch, position)``, and its
  transform runs under that seed (:class:`SeededDataset`). Augmentations therefore do not depend on the
  number of loader workers, on which worker got the sample, or on how many processes share the batch.

The transforms are timm's (``create_transform``: RandAugment, random erasing, the exact ImageNet
recipe); an ImageFolder is listed by timm's folder reader. WebDataset tar shards are indexed with
``tarfile`` and read by index, so they serve the same sampler. An image that cannot be decoded raises
:class:`BadSampleError`, which :class:`SeededDataset` turns into a deterministic replacement (training)
or a left-out item (evaluation), reported with the batch (:class:`BadSampleLog`).
"""

from __future__ import annotations

import contextlib
import glob
import io
import math
import os
import random
import sys
import tarfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from timm.data import create_transform
from torch.utils.data import Dataset, Sampler, default_collate, get_worker_info

from ..config import IMAGENET_MEAN, IMAGENET_STD

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_REPLACEMENTS = 64  # consecutive unreadable draws before a sample gives up (a dataset mostly unreadable)


# ----------------------------------------------------------------------------------- decoding
class BadSampleError(Exception):
    """An image (or, in a shard, a sample) that cannot be read; ``name`` says which file, ``reason`` why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


class TooManyBadSamplesError(RuntimeError):
    """More unreadable training images than ``--max-bad-samples`` allows; ``reported``: the message was
    already printed."""

    def __init__(self, message: str, reported: bool = False) -> None:
        super().__init__(message)
        self.reported = reported


def to_rgb(img: Any) -> Any:
    """Any PIL mode -> ``RGB``: CMYK, greyscale, palette (with transparency through RGBA, as PIL asks),
    and 16/32-bit greyscale scaled to 8 bits instead of clipped."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img).astype(np.float64) / 257.0  # 16-bit samples (PNG's) -> 0..255
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def decode_image(source: Any, name: str) -> Any:
    """Opens and fully decodes ``source`` (a path or a binary file object) as an RGB PIL image.

    Raises:
        BadSampleError: the bytes are not a readable image (empty, truncated, not an image at all);
            ``name`` goes into the error so the file can be found.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as img:
            img.load()  # decodes now: a truncated file fails here, not later inside a transform
            return to_rgb(img)
    except UnidentifiedImageError as e:  # its message repeats the path or shows a buffer's address
        raise BadSampleError(name, "not an image format PIL can identify") from e
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, EOFError, ... by format
        raise BadSampleError(name, f"{type(e).__name__}: {e}") from e


def load_image_file(path: str) -> Any:
    """A path -> RGB PIL image; raises :class:`BadSampleError` naming ``path``."""
    if os.path.getsize(path) == 0:
        raise BadSampleError(path, "empty file")
    return decode_image(path, path)


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
    """``root/<class>/<image>`` -> ``(PIL RGB image, class index)``.

    The files are listed by timm's ``find_images_and_targets`` (what timm's ``ImageDataset`` reads an
    ImageFolder with): a class is the name of the folder holding the image, classes and files in natural
    order (ImageNet's synsets: plain sorted order, as torchvision's ImageFolder has them). The images are
    decoded here (:func:`load_image_file`) rather than by timm's dataset, which steps over an unreadable
    file to the next index silently; an unreadable file raises :class:`BadSampleError` naming it, for
    :class:`SeededDataset` to replace and count.
    """

    def __init__(self, root: str, extensions: Sequence[str] = IMG_EXTENSIONS) -> None:
        from timm.data.readers.reader_image_folder import find_images_and_targets

        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        self.root = root
        exts = tuple(e.lower() for e in extensions)
        self.samples, self.class_to_idx = find_images_and_targets(root, types=exts)
        if not self.samples:
            raise FileNotFoundError(f"no images with extensions {exts} under {root!r}")
        if "" in self.class_to_idx:  # timm's label for an image directly in root
            raise FileNotFoundError(
                f"no class sub-folders in {root!r}: images lie in it (expected root/<class>/<image>)"
            )
        self.classes = sorted(self.class_to_idx, key=self.class_to_idx.__getitem__)
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        path, target = self.samples[index]
        return load_image_file(path), target


def image_folder(root: str) -> Dataset:
    """The ImageFolder ``root`` (:class:`ImageFolderDataset`)."""
    return ImageFolderDataset(root)


# ----------------------------------------------------------------------------------- tar shards
def shard_files(data_dir: str, split: str) -> List[str]:
    """``data_dir/<split>-*.tar`` (WebDataset shards), sorted; empty when there are none."""
    return sorted(glob.glob(os.path.join(glob.escape(data_dir), f"{glob.escape(split)}-*.tar")))


class TarShardDataset(Dataset):
    """WebDataset-convention tar shards -> ``(PIL RGB image, class index)``, by index.

    The files of a sample share a key (the member path up to the first dot of its base name):
    ``<key>.jpg`` (or another image extension) and ``<key>.cls``, the class as decimal text. The shards
    are indexed once, when the dataset is built: one pass over the tar headers records where each image
    lies, and the ``.cls`` texts are read then. An item is then one read at a known offset, so the shards
    serve the same :class:`ResumableSampler` as an ImageFolder (the same exact resume, the same split
    over processes and loader workers). A sample whose image or class is missing or unreadable raises
    :class:`BadSampleError` named ``<shard>:<member>``, as an unreadable file of an ImageFolder does.

    Args:
        shards: paths of uncompressed ``.tar`` files (random access needs them uncompressed).
    """

    max_open = 32  # open shard files per process

    def __init__(self, shards: Sequence[str]) -> None:
        if not shards:
            raise FileNotFoundError("no tar shards given")
        self.shards = [os.path.abspath(p) for p in shards]
        # (shard, member name or key, image (offset, size) or None, target or -1, why it is unusable)
        self.samples: List[Tuple[int, str, Optional[Tuple[int, int]], int, str]] = []
        exts = {e.lstrip(".") for e in IMG_EXTENSIONS}
        for si, path in enumerate(self.shards):
            members: Dict[str, Dict[str, tarfile.TarInfo]] = {}
            try:
                with tarfile.open(path, "r:") as tar:
                    labels: Dict[str, bytes] = {}
                    for m in tar:
                        if not m.isfile():
                            continue
                        head, base = os.path.split(m.name)
                        stem, dot, ext = base.partition(".")
                        if not dot:
                            continue
                        key = os.path.join(head, stem)
                        members.setdefault(key, {})[ext.lower()] = m
                        if ext.lower() == "cls":
                            labels[key] = tar.extractfile(m).read()
            except (tarfile.TarError, OSError) as e:
                raise ValueError(f"{path}: not a readable uncompressed tar file ({e})") from e
            for key, files in members.items():
                image = next((files[e] for e in sorted(files) if e in exts), None)
                name = f"{os.path.basename(path)}:{image.name if image is not None else key}"
                problem, target = "", -1
                if image is None:
                    problem = f"no image member (one of .{', .'.join(sorted(exts))}) for key {key!r}"
                elif key not in labels:
                    problem = "no .cls member"
                else:
                    try:
                        target = int(labels[key].decode("ascii").strip())
                        if target < 0:
                            raise ValueError("negative")
                    except (UnicodeDecodeError, ValueError):
                        problem = f".cls holds {labels[key][:20]!r}, not a class index"
                where = (image.offset_data, image.size) if image is not None else None
                self.samples.append((si, name, where, target, problem))
        if not self.samples:
            raise FileNotFoundError(f"no samples in {len(self.shards)} shard(s) ({self.shards[0]}, ...)")
        self.targets = [t for *_, t, _ in self.samples]
        self.classes = [str(c) for c in range(max(self.targets) + 1)]
        self._files: Dict[int, Any] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        # One handle per shard and process: a handle opened before the loader forked would share its
        # file position with the workers.
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        f = self._files.pop(shard, None)
        if f is None:
            if len(self._files) >= self.max_open:  # ImageNet comes in ~1000 shards: stay under ulimit -n
                self._files.pop(next(iter(self._files))).close()
            f = open(self.shards[shard], "rb")
        self._files[shard] = f  # re-inserted: the dict's order is least recently used first
        f.seek(offset)
        return f.read(size)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        shard, name, where, target, problem = self.samples[index]
        if problem:
            raise BadSampleError(name, problem)
        data = self._read(shard, *where)
        if not data:
            raise BadSampleError(name, "empty file")
        return decode_image(io.BytesIO(data), name), target

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = {}, -1  # open files do not pickle (spawned workers)
        return state


@dataclass
class DataSpec:
    """Where the images come from: an ImageFolder tree, WebDataset tar shards
    (``data_dir/<split>-*.tar``) or the generated set."""

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
    name = spec.train_split if split == "train" else spec.val_split
    ds = split_dataset(spec.data_dir, name)
    return ds, len(ds.classes)


def split_dataset(data_dir: str, split: str) -> Dataset:
    """The split ``split`` of ``data_dir``: its tar shards ``<split>-*.tar`` when there are any, else the
    ImageFolder ``data_dir/<split>``."""
    shards = shard_files(data_dir, split)
    if shards:
        return TarShardDataset(shards)
    folder = os.path.join(data_dir, split)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{data_dir!r} holds neither {split}-*.tar shards nor an ImageFolder {split}/")
    return image_folder(folder)


def describe_dataset(ds: Dataset) -> str:
    """``'12 tar shards'`` or ``'ImageFolder'``: what a log line says the data is."""
    if isinstance(ds, TarShardDataset):
        return f"{len(ds.shards)} tar shard(s)"
    return "ImageFolder" if not isinstance(ds, SyntheticShapes) else "generated"


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
    under :func:`seeded_rng` (``seed``), plain indices with whatever the RNGs hold.

    Items are ``(image tensor, target, unreadable)``: ``unreadable`` lists the ``(file, reason)`` of
    every image that could not be decoded on the way (:class:`BadSampleError`), so the counts travel
    from the loader workers to the training process with the batch (:func:`collate_samples`). With
    ``replace_bad`` (training) an unreadable image is replaced by another, drawn from the item's seed
    (a function of ``(seed, epoch, position)``), so the batch keeps its size and a resumed run draws the
    same replacement; the augmentation seed stays the item's. Without it (evaluation) the item comes
    back as ``(None, -1, unreadable)`` and :func:`collate_samples` drops it: every readable image is
    evaluated exactly once.
    """

    def __init__(self, base: Dataset, transform: Callable[[Any], torch.Tensor], replace_bad: bool = True) -> None:
        self.base, self.transform, self.replace_bad = base, transform, replace_bad

    def __len__(self) -> int:
        return len(self.base)

    def _load(self, index: int, seed: Optional[int]) -> Tuple[Any, int, Tuple[Tuple[str, str], ...]]:
        unreadable: List[Tuple[str, str]] = []
        first = index
        for attempt in range(MAX_REPLACEMENTS + 1):
            try:
                img, target = self.base[index]
                return img, target, tuple(unreadable)
            except BadSampleError as e:
                unreadable.append((e.name, e.reason))
                if not self.replace_bad:
                    return None, -1, tuple(unreadable)
                entropy = [seed, attempt] if seed is not None else [first, attempt, 1]
                index = int(np.random.default_rng(entropy).integers(len(self.base)))
        raise RuntimeError(
            f"{MAX_REPLACEMENTS + 1} unreadable images in a row while replacing item {first} "
            f"(the last: {unreadable[-1][0]}): most of the dataset cannot be decoded"
        )

    def __getitem__(self, item: Any) -> Tuple[Optional[torch.Tensor], int, Tuple[Tuple[str, str], ...]]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        img, target, unreadable = self._load(index, seed)
        if img is None:
            return None, target, unreadable
        if seed is None:
            return self.transform(img), target, unreadable
        with seeded_rng(seed):
            return self.transform(img), target, unreadable


def collate_samples(
    batch: Sequence[Tuple[Any, int, Sequence[Tuple[str, str]]]],
) -> Tuple[torch.Tensor, torch.Tensor, List[Tuple[str, str]]]:
    """:class:`SeededDataset` items -> ``(images, targets, unreadable files)``; skipped items (``None``)
    are left out, so an evaluation batch may be short, or empty (``images`` of shape ``[0]``)."""
    unreadable = [u for item in batch for u in item[2]]
    kept = [(x, y) for x, y, _ in batch if x is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), unreadable
    x, y = default_collate(kept)
    return x, y, unreadable


class BadSampleLog:
    """The unreadable files the loaders of a run met, per epoch, merged over processes.

    :meth:`batches` unpacks :func:`collate_samples` batches for the training loop, warning (once per
    file and process) with the file's name and keeping what it met; :meth:`sync` merges what every
    process met since the last call (a collective: all processes call it at the same points), after
    which :attr:`files` and :meth:`count` agree on every process.
    """

    def __init__(self, action: str = "skipped", warn: Optional[Callable[[str], None]] = None) -> None:
        self.action = action
        self.files: Dict[str, str] = {}  # file -> reason, over the whole run
        self.per_epoch: Dict[int, Set[str]] = {}
        self._new: List[Tuple[int, str, str]] = []
        self._warned: Set[str] = set()
        self._warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))

    def record(self, epoch: int, unreadable: Iterable[Tuple[str, str]]) -> None:
        """Notes files met in ``epoch`` by this process (warning about new ones)."""
        for name, reason in unreadable:
            self._new.append((epoch, name, reason))
            if name not in self._warned:
                self._warned.add(name)
                self._warn(f"warning: unreadable image {name} {self.action} ({reason})")

    def batches(self, loader: Iterable, epoch: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """``(images, targets)`` of ``loader``'s batches, recording their unreadable files; empty
        batches (every image of an evaluation batch unreadable) are passed over."""
        for x, y, unreadable in loader:
            if unreadable:
                self.record(epoch, unreadable)
            if len(y):
                yield x, y

    def sync(self, info: Any = None) -> None:
        """Merges the files every process met since the last call (``info``: a :class:`DistInfo`)."""
        new, self._new = self._new, []
        if info is not None and info.enabled:
            import torch.distributed as dist

            gathered: List[Any] = [None] * info.world_size
            dist.all_gather_object(gathered, new)
            new = [r for part in gathered for r in part]
        for epoch, name, reason in new:
            self.files.setdefault(name, reason)
            self.per_epoch.setdefault(epoch, set()).add(name)

    def count(self, epoch: Optional[int] = None) -> int:
        """Distinct unreadable files met in ``epoch`` (``None``: in the whole run), as of the last sync."""
        return len(self.files) if epoch is None else len(self.per_epoch.get(epoch, ()))

    def listing(self, limit: int = 20) -> str:
        """``'a.jpg (reason), b.jpg (reason), ... and N more'``: the files for a one-line message."""
        items = [f"{n} ({r})" for n, r in sorted(self.files.items())]
        more = f" and {len(items) - limit} more" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint keeps, so a resumed run's counts continue the interrupted run's."""
        return {"files": dict(self.files), "per_epoch": {str(e): sorted(n) for e, n in self.per_epoch.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.files = dict(state.get("files") or {})
        self.per_epoch = {int(e): set(n) for e, n in (state.get("per_epoch") or {}).items()}

    def summary(self) -> Dict[str, Any]:
        """``{"per_epoch": {epoch: count}, "files": {file: reason}}`` for ``summary.json``."""
        return {"per_epoch": {e: len(n) for e, n in sorted(self.per_epoch.items())}, "files": dict(self.files)}


class TrackedLoader:
    """``loader`` (of :func:`collate_samples` batches) iterated as ``(images, targets)``, its unreadable
    files going to ``log`` under ``epoch``: what :func:`~qna_vit.training.engine.evaluate` takes."""

    def __init__(self, loader: Any, log: BadSampleLog, epoch: int = 0) -> None:
        self.loader, self.log, self.epoch = loader, log, epoch

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        return self.log.batches(self.loader, self.epoch)

    def __len__(self) -> int:
        return len(self.loader)


class _Probe(Dataset):
    """``None`` for a readable item of ``base``, ``(file, reason)`` for an unreadable one."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Optional[Tuple[str, str]]:
        try:
            self.base[index]
        except BadSampleError as e:
            return e.name, e.reason
        return None


def _unreadable_only(batch: Sequence[Optional[Tuple[str, str]]]) -> List[Tuple[str, str]]:
    return [b for b in batch if b is not None]


def verify_dataset(ds: Dataset, workers: int = 0, batch_size: int = 64) -> List[Tuple[str, str]]:
    """Decodes every image of ``ds`` (in ``workers`` loader processes); returns the ``(file, reason)``
    of each unreadable one, in dataset order."""
    from torch.utils.data import DataLoader

    loader = DataLoader(_Probe(ds), batch_size=batch_size, num_workers=workers, collate_fn=_unreadable_only)
    return [u for batch in loader for u in batch]


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
