"""Checkers for the demo's images: read the attributes back from the pixels of any 64x64 RGB image (a
generated one too), compare them with what a caption asked for, and score a batch."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageDraw

from mixdiff_cli.demo.data import (
    ATTRIBUTES,
    BACKGROUNDS,
    BODIES,
    COLOURS,
    GLYPH_PAPER,
    GLYPHS,
    GROUNDS,
    SHAPES,
    SIZE,
    SKIES,
    _check_domain,
    _glyph_mask,
)


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    dist = np.linalg.norm(np.array([palette[k] for k in names], float) - np.asarray(rgb, float), axis=1)
    return names[int(dist.argmin())]


def _labels(px: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> np.ndarray:
    """Index of the nearest palette colour for each pixel; px (..., 3)."""
    pal = np.array(list(palette.values()), float)  # (K, 3)
    return np.linalg.norm(px[..., None, :].astype(float) - pal, axis=-1).argmin(-1)


def _foreground(arr: np.ndarray, bg: tuple[int, int, int], thresh: float = 60.0) -> np.ndarray:
    return np.linalg.norm(arr.astype(float) - np.array(bg, float), axis=-1) > thresh


def _bbox(mask: np.ndarray, min_count: int = 3) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1), x1/y1 exclusive, of rows and columns with >= `min_count` mask pixels."""
    rows, cols = np.nonzero(mask.sum(1) >= min_count)[0], np.nonzero(mask.sum(0) >= min_count)[0]
    if len(rows) < 4 or len(cols) < 4:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _shape_mask(shape: str, box: tuple[int, int, int, int]) -> np.ndarray:
    img = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1
    if shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=255)
    elif shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=255)
    else:
        d.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=255)
    return np.asarray(img) > 127


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _measure_shapes(arr: np.ndarray) -> dict[str, str]:
    border = np.concatenate([arr[:2].reshape(-1, 3), arr[-2:].reshape(-1, 3), arr[:, :2].reshape(-1, 3), arr[:, -2:].reshape(-1, 3)])
    background = _nearest(np.median(border, 0), BACKGROUNDS)
    mask = _foreground(arr, BACKGROUNDS[background])
    box = _bbox(mask)
    if box is None:
        return {"shape": "none", "colour": "none", "background": background}
    shape = max(SHAPES, key=lambda sh: _iou(mask, _shape_mask(sh, box)))
    return {"shape": shape, "colour": _nearest(np.median(arr[mask], 0), COLOURS), "background": background}


def _measure_stripes(arr: np.ndarray) -> dict[str, str]:
    names = list(COLOURS)
    lab = _labels(arr, COLOURS)
    counts = np.bincount(lab.ravel(), minlength=len(names))
    first, second = np.argsort(-counts)[:2]
    on = (lab == first).astype(float)
    rows = np.maximum(on.mean(1), 1 - on.mean(1)).mean()  # 1 when every row is one colour
    cols = np.maximum(on.mean(0), 1 - on.mean(0)).mean()
    if rows > 0.85 and rows > cols + 0.1:
        pattern = "horizontal"
    elif cols > 0.85 and cols > rows + 0.1:
        pattern = "vertical"
    else:
        pattern = "checks"
    a, b = sorted([names[first], names[second]])
    return {"pattern": pattern, "colour_a": a, "colour_b": b}


def _measure_landscapes(arr: np.ndarray) -> dict[str, str]:
    sky_px = arr[:30].reshape(-1, 3)  # the horizon is never above row 34
    palette = {**SKIES, **BODIES}
    lab = _labels(sky_px, palette)
    names = list(palette)
    counts = {k: int((lab == names.index(k)).sum()) for k in BODIES}
    body = max(counts, key=counts.get) if max(counts.values()) >= 15 else "none"
    sky = lab < len(SKIES)
    time = _nearest(np.median(sky_px[sky], 0), SKIES) if sky.any() else "none"
    ground = _nearest(np.median(arr[48:].reshape(-1, 3), 0), GROUNDS)  # the horizon is never below row 44
    return {"time": time, "ground": ground, "body": body}


def _measure_glyphs(arr: np.ndarray) -> dict[str, str]:
    mask = _foreground(arr, GLYPH_PAPER)
    box = _bbox(mask)
    if box is None:
        return {"glyph": "none", "colour": "none"}
    best, best_iou = "none", -1.0
    for glyph in GLYPHS:
        for t in range(5, 11):
            iou = _iou(mask, np.asarray(_glyph_mask(glyph, box, t)) > 127)
            if iou > best_iou:
                best, best_iou = glyph, iou
    return {"glyph": best, "colour": _nearest(np.median(arr[mask], 0), COLOURS)}


_MEASURE = {"shapes": _measure_shapes, "stripes": _measure_stripes, "landscapes": _measure_landscapes, "glyphs": _measure_glyphs}


def measure(domain: str, image: Image.Image) -> dict[str, str]:
    """Read the attributes of `domain` back from `image` (resized to 64x64 if needed)."""
    _check_domain(domain)
    image = image.convert("RGB")
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return _MEASURE[domain](np.asarray(image))


def check(domain: str, image: Image.Image, attrs: dict[str, str]) -> dict[str, bool]:
    """Whether each attribute measured on `image` equals the one in `attrs`."""
    got = measure(domain, image)
    return {k: got.get(k) == v for k, v in attrs.items() if k in ATTRIBUTES[domain]}


def accuracy(domain: str, images: Iterable[Image.Image], attrs: Iterable[dict[str, str]]) -> dict[str, float]:
    """Fraction of images whose measured attribute matches, per attribute, plus "all" (every one)."""
    results = [check(domain, im, a) for im, a in zip(images, attrs)]
    if not results:
        return {}
    out = {k: float(np.mean([r[k] for r in results])) for k in results[0]}
    out["all"] = float(np.mean([all(r.values()) for r in results]))
    return out
