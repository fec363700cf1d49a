"""A user's images in torchvision's class-per-folder layout: `root/<class>/<image>`.

With `root/train/<class>/...` (and `val/`, `test/` beside it, each optional) those folders are the
splits; otherwise the images are split like every data set (seeded, stratified). Each image is
resized so that its shorter side is `size`, centre-cropped to size × size and converted to
`channels` (1: grey, 3: RGB), as uint8 (C, H, W).

Decoding is the slow part, so it is done once: the decoded images go to a memory-mapped `.npy` file
under `cache_dir`, named by a hash of the folder's file list (paths, sizes, modification times) and
of the resize settings; a later run over an unchanged folder reads the cache and decodes nothing,
and any change to a file makes a new one. A cache is checked before it is used (its shape and a
CRC-32 of its bytes, recorded beside it in a `.json` written last): a damaged one is rebuilt, never
trusted. Files that fail to decode are skipped and counted (`bad_images=skip`) or refused (`error`).
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dlrun.data.datamodule import Arrays, InMemoryDataModule
from dlrun.errors import DataError, UserError
from dlrun.rundir import write_atomic

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
SPLIT_FOLDERS = ("train", "val", "test")
CACHE_FORMAT = 1  # part of the cache key: a new layout never reads an old file
EXAMPLE = "dlrun dataset=image_folder dataset.root=~/data/pets"


class ImageFolder(InMemoryDataModule):
    """The images under `root`, one class per folder, decoded once into a cache under `cache_dir`."""

    task = "multiclass"
    pixel_inputs = True

    def __init__(self, root: str | None = None, size: int = 64, channels: int = 3, cache_dir: str = "data/image_cache",
                 bad_images: str = "skip", **kwargs):
        super().__init__(**kwargs)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise UserError(f"dataset.size = {size!r}: expected an integer >= 1 (pixels of the shorter side)")
        if channels not in (1, 3):
            raise UserError(f"dataset.channels = {channels!r}: expected 1 (grey) or 3 (RGB)")
        if bad_images not in ("skip", "error"):
            raise UserError(f"dataset.bad_images = {bad_images!r}: expected skip or error")
        self.root = root
        self.size, self.channels = size, channels
        self.cache_dir = Path(cache_dir).expanduser()
        self.bad_images = bad_images
        self.decoded = 0  # images decoded by this process (0 when the cache served them all)

    # --- the folder -----------------------------------------------------------------------------
    def folder(self) -> Path:
        if not self.root:
            raise DataError(f"dataset={self.name} needs a folder, and dataset.root is not set.", f"e.g. {EXAMPLE}")
        root = Path(self.root).expanduser()
        if not root.exists():
            raise DataError(f"dataset={self.name}: no folder at {root.resolve()} (dataset.root).", f"e.g. {EXAMPLE}")
        if not root.is_dir():
            raise DataError(f"dataset={self.name}: {root.resolve()} (dataset.root) is a file; a folder of class "
                            "folders is wanted (root/<class>/<image>).", f"e.g. {EXAMPLE}")
        return root.resolve()

    def listing(self, root: Path) -> tuple[list[tuple[str, str, int]], tuple[str, ...]]:
        """([(path relative to root, split, class index)], class names): split is '' without split folders."""
        splits = [s for s in SPLIT_FOLDERS if (root / s).is_dir()] if (root / "train").is_dir() else [""]
        found = {split: _images_by_class(root / split) for split in splits}
        classes = tuple(sorted(found[splits[0]]))
        where = root / splits[0]
        if sum(len(v) for v in found[splits[0]].values()) == 0:
            raise DataError(f"dataset={self.name}: {where} holds no images (files ending in "
                            f"{', '.join(sorted(IMAGE_SUFFIXES))}) in class folders.",
                            "Lay the images out as root/<class>/<image>.")
        if len(classes) < 2:
            raise DataError(f"dataset={self.name}: {where} has {len(classes)} class folder with images "
                            f"({', '.join(classes)}); a classifier needs two or more.",
                            "Lay the images out as root/<class>/<image>, one folder per class.")
        files = []
        for split in splits:
            extra = sorted(set(found[split]) - set(classes))
            if extra:
                raise DataError(f"dataset={self.name}: {root / split} has class folders that {where} lacks: "
                                f"{', '.join(extra)}.", "Every split needs the training split's classes only.")
            for label, name in enumerate(classes):
                files += [(str(Path(split, name, f)), split, label) for f in found[split].get(name, [])]
        return files, classes

    # --- loading through the cache ----------------------------------------------------------------
    def load(self) -> Arrays:
        root = self.folder()
        files, classes = self.listing(root)
        images, bad = self.cached(root, [f for f, _, _ in files])
        if bad and self.bad_images == "error":
            raise DataError(f"dataset={self.name}: {len(bad)} image(s) under {root} cannot be decoded: "
                            f"{', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}.",
                            "Remove or replace them, or set dataset.bad_images=skip to train without them.")
        self.notes.update(images=len(files) - len(bad), decoded=self.decoded, bad_images=len(bad))
        broken = set(bad)
        parts = {}
        for split in dict.fromkeys(s for _, s, _ in files):
            rows = [i for i, (f, s, _) in enumerate(files) if s == split and f not in broken]
            labels = np.array([files[i][2] for i in rows], dtype=np.int64)
            contiguous = rows and rows[-1] - rows[0] + 1 == len(rows)  # a slice of the memory map copies nothing
            parts[split] = (images[rows[0] : rows[-1] + 1] if contiguous else images[rows], labels)
        x, y = parts.get("train", parts.get(""))
        x_val, y_val = parts.get("val", (None, None))
        x_test, y_test = parts.get("test", (None, None))
        return Arrays(x, y, x_test, y_test, class_names=classes, x_val=x_val, y_val=y_val)

    def cache_key(self, root: Path, files: list[str]) -> str:
        digest = hashlib.sha256(f"{CACHE_FORMAT}\n{root}\n{self.size}\n{self.channels}\n".encode())
        for name in files:
            stat = (root / name).stat()
            digest.update(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:24]

    def cached(self, root: Path, files: list[str]) -> tuple[np.ndarray, list[str]]:
        """(every file's image, uint8 (N, C, S, S) memory-mapped, zeros for the bad ones; the bad files)."""
        key = self.cache_key(root, files)
        data = self.cache_dir / f"{root.name}-{key}.npy"
        meta = self.cache_dir / f"{root.name}-{key}.json"
        shape = (len(files), self.channels, self.size, self.size)
        if meta.exists() or data.exists():
            try:
                record = json.loads(meta.read_text())
                images = np.load(data, mmap_mode="r", allow_pickle=False)
                if images.shape == shape and images.dtype == np.uint8 and record["crc32"] == zlib.crc32(images):
                    self.notes["cache"] = "read"
                    return images, list(record["bad"])
            except (OSError, ValueError, KeyError, TypeError):
                pass
            self.notes["cache"] = "rebuilt (the old one was damaged)"
        else:
            self.notes["cache"] = "built"
        return self.build(root, files, data, meta, shape)

    def build(self, root: Path, files: list[str], data: Path, meta: Path, shape: tuple[int, ...]):
        """Decode every file into a new cache (written under a temporary name, then renamed; its record last)."""
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = data.with_name(f".{data.name}.{os.getpid()}.tmp")
            images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        except OSError as err:
            raise DataError(f"dataset={self.name}: cannot write the image cache in {self.cache_dir.resolve()}: {err}",
                            "Set dataset.cache_dir (or paths.data_dir) to a writable folder.") from err

        bad = self.decode_all(root, files, images)
        self.decoded = len(files) - len(bad)
        images.flush()
        record = {"format": CACHE_FORMAT, "root": str(root), "shape": list(shape), "bad": bad,
                  "crc32": zlib.crc32(images)}
        del images
        os.replace(tmp, data)
        write_atomic(meta, json.dumps(record) + "\n")
        return np.load(data, mmap_mode="r", allow_pickle=False), bad


    def decode_all(self, root: Path, files: list[str], images: np.ndarray) -> list[str]:
        """Decode files[i] into images[i], on threads (Pillow decodes without the GIL); the files that failed."""

        def decode_into(i: int) -> str | None:
            try:
                images[i] = decode(root / files[i], self.size, self.channels)
                return None
            except Exception:  # Pillow raises many kinds for a damaged file; each means "cannot decode"
                return files[i]

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            return [f for f in pool.map(decode_into, range(len(files))) if f is not None]


def _images_by_class(folder: Path) -> dict[str, list[str]]:
    """{class folder: image paths relative to it, sorted}, for the class folders that hold images."""
    found = {}
    for entry in sorted(p for p in folder.iterdir() if p.is_dir()):
        names = sorted(str(p.relative_to(entry)) for p in entry.rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if names:
            found[entry.name] = names
    return found


def decode(path: Path, size: int, channels: int) -> np.ndarray:
    """One image as uint8 (C, size, size): the shorter side resized to `size`, then the centre cropped."""
    from PIL import Image

    mode = "RGB" if channels == 3 else "L"
    with Image.open(path) as image:
        image.draft(mode, (size, size))  # JPEG: decode at the smallest scale that still covers size x size
        image = image.convert(mode)
        width, height = image.size
        scale = size / min(width, height)
        new = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(new, Image.Resampling.BILINEAR)
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
