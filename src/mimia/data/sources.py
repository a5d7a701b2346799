"""Image sources: random access to ``(image, label)`` at the experiment's resolution.

Every source yields uint8 RGB arrays ``[H, W, 3]``. Nothing here downloads unless the config
says ``download: true``; every source also accepts a local ``path`` (machines without internet).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
SOURCES = ("digits", "cifar10", "cifar100", "stl10", "image_folder", "webdataset")


@dataclass
class ImageSource:
    """A dataset by index: ``image(i)`` is uint8 ``[H, W, 3]``, ``labels[i]`` its class.

    ``keys[i]`` names image ``i`` for people: its index for the bundled and torchvision
    datasets, its path under the root for an image folder, its ``__key__`` in webdataset shards.
    """

    name: str
    labels: np.ndarray
    _get: Any  # callable index -> PIL image
    keys: list[str] | None = None

    def __post_init__(self) -> None:
        if self.keys is None:
            self.keys = [str(i) for i in range(len(self.labels))]

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int, size: int) -> np.ndarray:
        img = self._get(int(index)).convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.uint8)


def load_source(cfg: dict[str, Any]) -> ImageSource:
    """Open the dataset named by ``cfg['name']`` (see ``SOURCES``)."""
    name = cfg["name"]
    if name == "digits":
        return _digits()
    if name in ("cifar10", "cifar100", "stl10"):
        return _torchvision(name, cfg)
    if name == "image_folder":
        return _image_folder(_existing(cfg.get("path"), name))
    if name == "webdataset":
        return _webdataset(cfg.get("urls") or cfg.get("path"))
    raise ValueError(f"unknown dataset {name!r}; expected one of {SOURCES}")


def _existing(path: str | None, name: str) -> Path:
    if not path:
        raise ValueError(f"dataset {name!r} needs a local 'path'")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"dataset {name!r}: path {p} does not exist")
    return p


def _digits() -> ImageSource:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8x8 images with 17 grey levels (0..16), bundled with scikit-learn: no download.
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return ImageSource(
        "digits", digits.target.astype(np.int64), lambda i: Image.fromarray(pixels[i])
    )


def _torchvision(name: str, cfg: dict[str, Any]) -> ImageSource:
    from torchvision import datasets

    root = cfg.get("path") or "data"
    download = bool(cfg.get("download", False))
    try:
        if name == "stl10":
            ds = datasets.STL10(root, split=cfg.get("split", "train"), download=download)
            arrays, labels = ds.data.transpose(0, 2, 3, 1), ds.labels
        else:
            cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
            ds = cls(root, train=cfg.get("split", "train") == "train", download=download)
            arrays, labels = ds.data, ds.targets
    except RuntimeError as err:
        raise FileNotFoundError(
            f"dataset {name!r} not found under {root!r} ({err}); put the torchvision-format "
            f"files there or set download: true on a machine with internet"
        ) from err
    arrays = np.ascontiguousarray(arrays)
    return ImageSource(
        name, np.asarray(labels, dtype=np.int64), lambda i: Image.fromarray(arrays[i])
    )


def _image_folder(root: Path) -> ImageSource:
    """``root/<class>/<image>`` (labels from sorted class folders) or a flat folder (label -1)."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    classes = sorted({p.parent for p in files} - {root})
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index.get(p.parent, -1) for p in files], dtype=np.int64)
    keys = [p.relative_to(root).as_posix() for p in files]
    return ImageSource(f"folder:{root.name}", labels, lambda i: Image.open(files[i]), keys)


def _webdataset(urls: str | list[str] | None) -> ImageSource:
    """Existing shards, read once into memory (keys sorted for a stable order)."""
    import webdataset as wds

    if not urls:
        raise ValueError("dataset 'webdataset' needs 'urls' (a brace pattern or list of shards)")
    samples: dict[str, tuple[bytes, int]] = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        payload = next((sample[k] for k in ("png", "jpg", "jpeg", "webp") if k in sample), None)
        if payload is None:
            raise ValueError(f"webdataset sample {sample['__key__']!r} has no png/jpg image")
        label = int(sample["cls"]) if "cls" in sample else -1
        samples[sample["__key__"]] = (payload, label)
    if not samples:
        raise ValueError(f"webdataset {urls!r} holds no samples")
    keys = sorted(samples)
    labels = np.array([samples[k][1] for k in keys], dtype=np.int64)
    return ImageSource(
        "webdataset", labels, lambda i: Image.open(io.BytesIO(samples[keys[i]][0])), keys
    )


def source_fingerprint(cfg: dict[str, Any]) -> str:
    """A cheap fingerprint of what the source holds (its file listing)."""
    import hashlib
    import os

    h = hashlib.sha256(cfg["name"].encode())
    root = cfg.get("path")
    if root and Path(root).exists():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                st = os.stat(os.path.join(dirpath, name))
                h.update(f"{dirpath}/{name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()
