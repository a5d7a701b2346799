"""Image sources: random access to ``(image, label)`` at the experiment's resolution.

Every source yields uint8 RGB arrays ``[H, W, 3]``. Nothing here downloads unless the config
says ``download: true``; every source also accepts a local ``path`` (machines without internet).

An image folder is ``<root>/<class>/<image>``: labels number the class folders in sorted order;
images directly in ``<root>`` get label -1; names starting with ``.`` are skipped.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import operator
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
SOURCES = ("digits", "cifar10", "cifar100", "stl10", "image_folder", "webdataset")
# torchvision's extracted folder of each dataset (its ``base_folder``).
TORCHVISION_FOLDERS = {
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "stl10": "stl10_binary",
}


class ImageDecodeError(ValueError):
    """An image file that cannot be decoded (corrupt, truncated, unsupported mode)."""


def to_rgb(img: Image.Image) -> np.ndarray:
    """uint8 ``[H, W, 3]`` of a decoded PIL image, at its own resolution.

    16-bit greyscale (PIL modes ``I;16*`` and ``I``) is scaled to 8 bits (``round(v / 257)``):
    PIL's own ``convert("RGB")`` clips it to 255. Alpha is dropped, as torchvision's image
    loader does, so images match what encoders are usually trained on.
    """
    if img.mode.startswith("I"):
        a = np.asarray(img)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(
                f"{img.mode} image with values in [{a.min()}, {a.max()}]: expected 8 or 16 bits"
            )
        grey = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode == "F":
        raise ValueError("32-bit float image: expected 8 or 16 bits per channel")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def pixel_sha256(pixels: np.ndarray) -> str:
    """SHA-256 of uint8 RGB pixels and their shape: equal for identical decoded images."""
    h = hashlib.sha256("{}x{}x{}\n".format(*pixels.shape).encode())
    h.update(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    return h.hexdigest()


@dataclass
class ImageSource:
    """A dataset by index: ``native(i)`` is uint8 ``[H, W, 3]``, ``labels[i]`` its class.

    ``keys[i]`` names image ``i`` for people: its index for the bundled and torchvision
    datasets, its path under the root for an image folder, its ``__key__`` in webdataset shards.
    ``where(i)`` is the file that holds it. ``labels`` is None for a source opened by keys
    (the manifest holds the labels then).
    """

    name: str
    keys: list[str]
    labels: np.ndarray | None
    _open: Callable[[int], Image.Image]
    _where: Callable[[int], str]

    def __len__(self) -> int:
        return len(self.keys)

    def where(self, index: int) -> str:
        return self._where(int(index))

    def native(self, index: int) -> np.ndarray:
        """The image at its own resolution; a file that cannot be decoded is named."""
        try:
            img = self._open(int(index))
            img.load()
            return to_rgb(img)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"image {self.keys[index]!r} ({self.where(index)}) does not exist"
            ) from err
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            # PIL's messages ("Truncated File Read", ...) do not say which file.
            raise ImageDecodeError(
                f"cannot decode image {self.keys[index]!r} ({self.where(index)}): {err}"
            ) from err

    def image(self, index: int, size: int) -> np.ndarray:
        return resize(self.native(index), size)

    def content_sha256(self, index: int) -> str:
        return pixel_sha256(self.native(index))

    def content_hashes(self) -> list[str]:
        """``content_sha256`` of every image (decodes them all)."""
        return [self.content_sha256(i) for i in range(len(self))]


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    if pixels.shape[:2] == (size, size):
        return pixels
    img = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def load_source(cfg: dict[str, Any], keys: Sequence[str] | None = None) -> ImageSource:
    """Open the dataset named by ``cfg['name']`` (see ``SOURCES``).

    With ``keys``, the source holds just those images, in that order, and no labels; an image
    folder is then not listed (each file is opened by its path, so a missing one fails when it
    is read). Keys the other sources do not have are left out: callers compare ``keys``.
    """
    name = cfg["name"]
    if name == "digits":
        source = _digits()
    elif name in TORCHVISION_FOLDERS:
        source = _torchvision(name, cfg)
    elif name == "image_folder":
        root = _existing(cfg.get("path"), name)
        return _folder_files(root, keys) if keys is not None else _image_folder(root)
    elif name == "webdataset":
        return _webdataset(cfg.get("urls") or cfg.get("path"), keys)
    else:
        raise ValueError(f"unknown dataset {name!r}; expected one of {SOURCES}")
    return source if keys is None else _indexed_subset(source, keys)


def _existing(path: str | None, name: str) -> Path:
    if not path:
        raise ValueError(f"dataset {name!r} needs a local 'path'")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"dataset {name!r}: path {p} does not exist")
    return p


def _indexed_subset(source: ImageSource, keys: Sequence[str]) -> ImageSource:
    n = len(source)
    keys = [k for k in keys if k.isdigit() and int(k) < n]
    idx = [int(k) for k in keys]
    return ImageSource(
        source.name,
        keys,
        None,
        lambda i: source._open(idx[i]),
        lambda i: source.where(idx[i]),
    )


def _digits() -> ImageSource:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8x8 images with 17 grey levels (0..16), bundled with scikit-learn: no download.
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return ImageSource(
        "digits",
        [str(i) for i in range(len(pixels))],
        digits.target.astype(np.int64),
        lambda i: Image.fromarray(pixels[i]),
        lambda i: "sklearn.datasets.load_digits",
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
    folder = str(Path(root) / TORCHVISION_FOLDERS[name])
    return ImageSource(
        name,
        [str(i) for i in range(len(arrays))],
        np.asarray(labels, dtype=np.int64),
        lambda i: Image.fromarray(arrays[i]),
        lambda i: folder,
    )


def _walk_images(root: Path) -> list[tuple[str, os.DirEntry]]:
    """``(POSIX path under root, entry)`` of every image file, in path order (components
    compared one by one, as ``sorted`` orders ``Path`` objects)."""
    found: list[tuple[str, os.DirEntry]] = []
    seen: set[tuple[int, int]] = set()
    by_name = operator.attrgetter("name")

    def walk(folder: str, prefix: str) -> None:
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop
            return
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as it:
            # Sorting each folder's names, depth first, gives the order of the whole paths.
            entries = sorted((e for e in it if not e.name.startswith(".")), key=by_name)
        for entry in entries:
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()
                if entry.is_symlink() and not (is_dir or is_file):
                    os.stat(entry.path)  # raises for a dangling link or a loop
            except OSError as err:
                # A link that leads nowhere holds no image: skipped, said once per listing.
                why = "a symbolic link loop" if err.errno == errno.ELOOP else "a dangling link"
                print(f"image folder {root}: skipping {prefix}{entry.name}: {why}", file=sys.stderr)
                continue
            if is_dir:
                walk(entry.path, f"{prefix}{entry.name}/")
            elif entry.name.lower().endswith(IMAGE_SUFFIXES) and is_file:
                found.append((prefix + entry.name, entry))

    walk(str(root), "")
    return found


def _image_folder(root: Path) -> ImageSource:
    """``root/<class>/<image>`` (labels from sorted class folders) or a flat folder (label -1)."""
    keys = [key for key, _ in _walk_images(root)]
    if not keys:
        raise ValueError(f"image folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    parents = [key.rpartition("/")[0] for key in keys]
    classes = sorted(set(parents) - {""}, key=lambda c: c.split("/"))
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index.get(p, -1) for p in parents], dtype=np.int64)
    return _folder_source(root, keys, labels)


def _folder_files(root: Path, keys: Sequence[str]) -> ImageSource:
    """The images of ``keys`` (POSIX paths under ``root``), opened without listing the folder."""
    for key in keys:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"image folder key {key!r} is not a path inside {root}")
    return _folder_source(root, list(keys), None)


def _folder_source(root: Path, keys: list[str], labels: np.ndarray | None) -> ImageSource:
    return ImageSource(
        f"folder:{root.name}",
        keys,
        labels,
        lambda i: Image.open(root / keys[i]),
        lambda i: str(root / keys[i]),
    )


def _webdataset(urls: str | list[str] | None, keys: Sequence[str] | None) -> ImageSource:
    """Existing shards, read once into memory (keys sorted for a stable order).

    With ``keys``, only those samples are kept.
    """
    import webdataset as wds

    if not urls:
        raise ValueError("dataset 'webdataset' needs 'urls' (a brace pattern or list of shards)")
    wanted = None if keys is None else set(keys)
    samples: dict[str, tuple[bytes, int, str]] = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        key = sample["__key__"]
        if wanted is not None and key not in wanted:
            continue
        payload = next((sample[k] for k in ("png", "jpg", "jpeg", "webp") if k in sample), None)
        if payload is None:
            raise ValueError(
                f"webdataset sample {key!r} ({sample.get('__url__')}) has no png/jpg image"
            )
        label = int(sample["cls"]) if "cls" in sample else -1
        samples[key] = (payload, label, str(sample.get("__url__", urls)))
    if not samples and keys is None:
        raise ValueError(f"webdataset {urls!r} holds no samples")
    if keys is None:
        order = sorted(samples)
        labels = np.array([samples[k][1] for k in order], dtype=np.int64)
    else:
        order, labels = [k for k in keys if k in samples], None
    return ImageSource(
        "webdataset",
        order,
        labels,
        lambda i: Image.open(io.BytesIO(samples[order[i]][0])),
        lambda i: samples[order[i]][2],
    )


def source_fingerprint(dataset: dict[str, Any], digest_cache: str | Path | None = None) -> str:
    """SHA-256 of the source's files: their paths (under the source's root), sizes and byte
    contents, so adding, removing or replacing an image changes it and a ``touch`` or
    ``cp -r`` of the folder (same bytes, new times) does not.

    ``digest_cache``, a JSON file, keeps each file's digest with its size, modification time
    and inode: a later call reads only the files that changed since (the workflow passes one
    under the results folder, as it fingerprints the source at every DAG build).
    A torchvision dataset whose folder is missing is refused unless ``download`` is set.
    """
    name = dataset["name"]
    h = hashlib.sha256(f"{name}\n".encode())
    cache = _DigestCache(digest_cache)
    if name == "digits":
        from importlib.metadata import version

        h.update(f"scikit-learn {version('scikit-learn')}".encode())
    elif name == "image_folder":
        root = _existing(dataset.get("path"), name)
        for key, entry in _walk_images(root):
            h.update(f"{key}\t{cache.digest(entry.path, entry.stat())}\n".encode())
    elif name in TORCHVISION_FOLDERS:
        folder = Path(dataset.get("path") or "data") / TORCHVISION_FOLDERS[name]
        if not folder.is_dir() and not dataset.get("download"):
            raise FileNotFoundError(
                f"dataset {name!r}: {folder} does not exist; put the torchvision-format files "
                f"under path {dataset.get('path') or 'data'!r} or set download: true"
            )
        h.update(f"split {dataset.get('split', 'train')}\n".encode())
        for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if path.is_file():
                rel = path.relative_to(folder).as_posix()
                h.update(f"{rel}\t{cache.digest(str(path), path.stat())}\n".encode())
    elif name == "webdataset":
        for url in _shard_urls(dataset.get("urls") or dataset.get("path")):
            h.update(url.encode())
            if os.path.isfile(url):
                h.update(f"\t{cache.digest(url, os.stat(url))}".encode())
            h.update(b"\n")
    else:
        raise ValueError(f"unknown dataset {name!r}; expected one of {SOURCES}")
    cache.save()
    return h.hexdigest()


class _DigestCache:
    """``size:sha256`` of files by absolute path, reused while size, mtime and inode hold."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = None if path is None else Path(path)
        self.entries: dict[str, list] = {}
        self.changed = False
        if self.path is not None and self.path.is_file():
            try:
                entries = json.loads(self.path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                entries = {}  # a damaged cache is only slower: every file is read again
            self.entries = entries if isinstance(entries, dict) else {}

    def digest(self, path: str, st: os.stat_result) -> str:
        key = os.path.abspath(path)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]
        entry = self.entries.get(key)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == stamp:
            return entry[1]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        value = f"{st.st_size}:{h.hexdigest()}"
        if self.path is not None:
            self.entries[key], self.changed = [stamp, value], True
        return value

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        from mimia.storage import write_json

        try:
            write_json(self.path, self.entries)
        except OSError as err:  # only a cache: the next call reads the files again
            print(f"cannot save file digests to {self.path}: {err}", file=sys.stderr)


def _shard_urls(urls: str | list[str] | None) -> list[str]:
    from braceexpand import braceexpand

    if not urls:
        raise ValueError("dataset 'webdataset' needs 'urls' (a brace pattern or list of shards)")
    return [
        u for pattern in ([urls] if isinstance(urls, str) else urls) for u in braceexpand(pattern)
    ]
