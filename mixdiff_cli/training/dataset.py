"""Captioned image datasets for fine-tuning: discovery, validation, hashing and preprocessing.

Two layouts are read (checked before any model loads):
  * kohya / ai-toolkit: images anywhere under a folder, each with a caption in `IMAGE.txt` (or `.caption`);
  * Hugging Face imagefolder: a `metadata.jsonl` whose lines hold `file_name` and `text` (or `caption`).
Images that cannot be decoded are reported and skipped; a dataset with nothing usable is an error.
PIL and numpy only at import time; torch is imported by the functions that return tensors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from mixdiff_cli.core.errors import MixdiffError
from mixdiff_cli.core.jsonl import iter_jsonl
from mixdiff_cli.catalog.headers import sha256_file

if TYPE_CHECKING:
    import torch
    from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_EXTENSIONS = (".txt", ".caption")
METADATA_NAME = "metadata.jsonl"
Crop = Literal["center", "random"]


class DatasetError(MixdiffError):
    """The training data cannot be used (missing, empty, uncaptioned, undecodable)."""


@dataclass(frozen=True)
class Record:
    """One training example: an image file and its caption (trigger words not yet added)."""

    path: Path
    caption: str


@dataclass
class Dataset:
    root: Path
    layout: Literal["captions", "metadata.jsonl"]
    records: list[Record]
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (image, why) that could not be decoded

    def __len__(self) -> int:
        return len(self.records)

    def hash(self) -> str:
        """sha256 over every (relative path, caption, image bytes), in order: the dataset's identity."""
        digest = hashlib.sha256()
        for rec in self.records:
            digest.update(_relative(rec.path, self.root).encode() + b"\0" + rec.caption.encode() + b"\0")
            digest.update(sha256_file(rec.path).encode() + b"\n")
        return digest.hexdigest()


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _names(paths: Sequence[Path], root: Path, limit: int = 5) -> str:
    shown = ", ".join(_relative(p, root) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _decode_error(path: Path) -> str | None:
    """None when PIL decodes the whole image, else why not."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError...
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def _caption_records(root: Path) -> tuple[list[Record], list[Path]]:
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(root).parts))
    records, uncaptioned = [], []
    for img in images:
        text = None
        for ext in CAPTION_EXTENSIONS:
            cap = img.with_suffix(ext)
            if cap.is_file():
                text = " ".join(cap.read_text(encoding="utf-8", errors="replace").split())
                break
        if text:
            records.append(Record(img, text))
        else:
            uncaptioned.append(img)
    return records, uncaptioned


def _metadata_records(root: Path, meta: Path) -> tuple[list[Record], list[Path]]:
    records, uncaptioned, missing = [], [], []
    example = 'each line needs {"file_name": "0001.png", "text": "a caption"}'
    for lineno, row in iter_jsonl(meta, hint=example, error=DatasetError):
        if not isinstance(row.get("file_name"), str):
            raise DatasetError(f"{meta}:{lineno}: no \"file_name\"", example)
        path = root / row["file_name"]
        text = row.get("text", row.get("caption"))
        if not path.is_file():
            missing.append(path)
        elif not isinstance(text, str) or not text.strip():
            uncaptioned.append(path)
        else:
            records.append(Record(path, " ".join(text.split())))
    if missing:
        raise DatasetError(f"{meta} names {len(missing)} missing image(s): {_names(missing, root)}", "fix the file_name entries or add the images")
    return records, uncaptioned


def scan_dataset(data: str | Path, *, check_images: bool = True) -> Dataset:
    """Find the captioned images of `data` (a folder); decode each once to report the unreadable ones."""
    root = Path(data).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist", "pass a folder of images with captions")
    if not root.is_dir():
        raise DatasetError(f"dataset {root} is not a folder", "pass a folder of images with .txt captions or a metadata.jsonl")
    meta = root / METADATA_NAME
    layout: Literal["captions", "metadata.jsonl"] = "metadata.jsonl" if meta.is_file() else "captions"
    records, uncaptioned = _metadata_records(root, meta) if meta.is_file() else _caption_records(root)
    if not records and not uncaptioned:
        raise DatasetError(
            f"no images in {root}", f"add images ({', '.join(IMAGE_EXTENSIONS)}) with a caption in IMAGE.txt beside each, or a {METADATA_NAME}"
        )
    if uncaptioned:
        where = f"a \"text\" field in {METADATA_NAME}" if layout == "metadata.jsonl" else "a caption file NAME.txt beside each image"
        raise DatasetError(
            f"{len(uncaptioned)} of {len(records) + len(uncaptioned)} images in {root} have no caption: {_names(uncaptioned, root)}",
            f"write {where} (or remove those images)",
        )
    skipped = []
    if check_images:
        good = []
        for rec in records:
            why = _decode_error(rec.path)
            if why is None:
                good.append(rec)
            else:
                skipped.append((rec.path, why))
        records = good
    if not records:
        raise DatasetError(f"none of the images in {root} could be decoded: {_names([p for p, _ in skipped], root)}", "check the files are valid images")
    return Dataset(root, layout, records, skipped)


def with_trigger(caption: str, trigger: Iterable[str]) -> str:
    """Prepend trigger words kohya-style ("trigger, caption"), skipping those already at the start."""
    words = [t for t in trigger if t and not caption.lower().startswith(t.lower())]
    return ", ".join([*words, caption]) if words else caption


# --- preprocessing --------------------------------------------------------------------------------


def crop_box(size: tuple[int, int], resolution: int, crop: Crop, u: tuple[float, float] = (0.5, 0.5)) -> tuple[int, int, int, int]:
    """Resize-then-crop geometry: the box of the resized image (w, h) to keep; `u` in [0,1]^2 places a random crop."""
    w, h = size
    left = round((w - resolution) * (u[0] if crop == "random" else 0.5))
    top = round((h - resolution) * (u[1] if crop == "random" else 0.5))
    return left, top, left + resolution, top + resolution


def load_image(
    path: Path, resolution: int, crop: Crop = "center", flip: bool = False, u: tuple[float, float] = (0.5, 0.5)
) -> "Image.Image":
    """RGB image with its shorter side resized to `resolution` (bicubic) and cropped square, optionally mirrored."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
    w, h = im.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size != (w, h):
        im = im.resize(size, Image.Resampling.BICUBIC)
    im = im.crop(crop_box(size, resolution, crop, u))
    return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else im


def to_tensor(images: Sequence["Image.Image"]) -> "torch.Tensor":
    """PIL images -> float tensor (B, 3, H, W) in [-1, 1], as the VAE expects."""
    import numpy as np
    import torch

    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])  # (B, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div_(127.5).sub_(1.0).contiguous()
