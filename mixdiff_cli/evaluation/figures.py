"""Report figures drawn with PIL alone (no matplotlib): heatmaps, horizontal bars and contact sheets.

Every figure returns an RGB `PIL.Image` whose `info["layout"]` maps each drawn label to its box
(left, top, right, bottom), so tests can check that text landed where it should. Text uses PIL's
default font (`ImageFont.load_default`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from PIL import Image, ImageDraw, ImageFont

Box = tuple[int, int, int, int]
Colormap = Literal["viridis", "blues", "diverging"]

BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GRID = (200, 200, 200)
MISSING = (235, 235, 235)
PAD = 8
FONT_SIZE = 12

# Anchor colours; values between anchors are interpolated linearly in RGB.
_MAPS: dict[str, list[tuple[int, int, int]]] = {
    # matplotlib's viridis at 0, .25, .5, .75, 1
    "viridis": [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)],
    "blues": [(247, 251, 255), (198, 219, 239), (107, 174, 214), (33, 113, 181), (8, 48, 107)],
    # blue (0: better) - white (0.5: same) - red (1: worse), like RdBu reversed
    "diverging": [(33, 102, 172), (146, 197, 222), (247, 247, 247), (244, 165, 130), (178, 24, 43)],
}


@lru_cache(maxsize=4)
def font(size: int = FONT_SIZE) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def colour(value: float | None, cmap: Colormap = "viridis") -> tuple[int, int, int]:
    """`value` in [0, 1] (clipped) -> RGB on `cmap`; None -> light grey."""
    if value is None or value != value:  # None or NaN
        return MISSING
    anchors = _MAPS[cmap]
    x = min(max(float(value), 0.0), 1.0) * (len(anchors) - 1)
    i = min(int(x), len(anchors) - 2)
    f = x - i
    a, b = anchors[i], anchors[i + 1]
    return tuple(round(a[c] + (b[c] - a[c]) * f) for c in range(3))  # type: ignore[return-value]


def ink_on(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white text, whichever reads better on `rgb` (relative luminance, ITU-R BT.709)."""
    lum = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]
    return INK if lum > 140 else (255, 255, 255)


def text_size(text: str, size: int = FONT_SIZE) -> tuple[int, int]:
    left, top, right, bottom = font(size).getbbox(text or " ")
    return right - min(left, 0), bottom


def fit(text: str, width: int, size: int = FONT_SIZE) -> str:
    """`text`, cut with an ellipsis so that it is at most `width` pixels wide."""
    if text_size(text, size)[0] <= width:
        return text
    while text and text_size(text + "…", size)[0] > width:
        text = text[:-1]
    return text + "…" if text else ""


def wrap(text: str, width: int, size: int = FONT_SIZE, max_lines: int | None = None) -> list[str]:
    """Greedy word wrap to `width` pixels; over-long words are cut; the last kept line gets an ellipsis."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if text_size(trial, size)[0] <= width:
            current = trial
            continue
        if current:
            lines.append(current)
        current = fit(word, width, size)
    if current:
        lines.append(current)
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = fit(lines[-1] + " …", width, size) if not lines[-1].endswith("…") else lines[-1]
    return lines or [""]


def _line_height(size: int = FONT_SIZE) -> int:
    return text_size("Ag|", size)[1] + 3


def _vertical_label(text: str, size: int = FONT_SIZE, max_len: int = 160) -> Image.Image:
    """`text` drawn on a transparent strip rotated 90 degrees (reads bottom to top)."""
    from PIL import Image, ImageDraw

    text = fit(text, max_len, size)
    w, h = text_size(text, size)
    strip = Image.new("RGBA", (w + 2, h + 2), (0, 0, 0, 0))
    ImageDraw.Draw(strip).text((1, 1), text, fill=INK + (255,), font=font(size))
    return strip.rotate(90, expand=True)


def _canvas(width: int, height: int, title: str) -> tuple[Image.Image, ImageDraw.ImageDraw, dict[str, Box]]:
    """A blank figure of at least the title's width, with the title drawn top-left; its layout so far."""
    from PIL import Image, ImageDraw

    width = max(width, PAD + text_size(title)[0] + PAD if title else 0)
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    layout: dict[str, Box] = {}
    if title:
        draw.text((PAD, PAD), title, fill=INK, font=font())
        layout["title"] = (PAD, PAD, PAD + text_size(title)[0], PAD + _line_height())
    return img, draw, layout


@dataclass(frozen=True)
class HeatmapStyle:
    """A heatmap's title, colour map, row and column axis titles, and cell size (None: fitted to the text)."""

    title: str = ""
    cmap: Colormap = "viridis"
    row_title: str = ""
    col_title: str = ""
    cell: tuple[int, int] | None = None


@dataclass(frozen=True)
class _HeatmapLayout:
    """Where a heatmap's parts go: n x m cells of cw x ch pixels from (left, top), row labels row_w wide."""

    n: int
    m: int
    cw: int
    ch: int
    row_w: int
    vertical: bool  # column labels drawn vertically
    left: int
    top: int
    title_h: int


def heatmap(
    values: Sequence[Sequence[float | None]],
    rows: Sequence[str],
    cols: Sequence[str],
    *,
    text: Sequence[Sequence[str]] | None = None,
    shade: Sequence[Sequence[float | None]] | None = None,
    highlight: Sequence[tuple[int, int]] = (),
    style: HeatmapStyle = HeatmapStyle(),
) -> Image.Image:
    """A labelled matrix: one cell per (row, column), coloured by `shade` (in [0, 1]; default: `values`
    min-max scaled) and captioned by `text` (default: `values` to 3 decimals; may hold two lines).
    `highlight` cells get a thick outline. Column labels are vertical when they do not fit across."""
    n, m = len(rows), len(cols)
    if any(len(r) != m for r in values) or len(values) != n:
        raise ValueError(f"values must be {n} rows of {m} columns")
    if text is None:
        text = [["" if v is None else f"{v:.3f}" for v in row] for row in values]
    if shade is None:
        flat = [v for row in values for v in row if v is not None]
        lo, hi = (min(flat), max(flat)) if flat else (0.0, 1.0)
        span = (hi - lo) or 1.0
        shade = [[None if v is None else (v - lo) / span for v in row] for row in values]
    g = _heatmap_layout(text, rows, cols, style)
    img, draw, layout = _canvas(g.left + m * g.cw + PAD, g.top + n * g.ch + PAD, style.title)
    _heatmap_axis_titles(img, draw, layout, g, style)
    _heatmap_col_labels(img, draw, layout, g, cols)
    _heatmap_rows(draw, layout, g, rows, text, shade, style.cmap)
    for i, j in highlight:
        x0, y0 = g.left + j * g.cw, g.top + i * g.ch
        draw.rectangle((x0 + 1, y0 + 1, x0 + g.cw - 2, y0 + g.ch - 2), outline=INK, width=3)
    img.info["layout"] = layout
    return img


def _heatmap_layout(text: Sequence[Sequence[str]], rows: Sequence[str], cols: Sequence[str], style: HeatmapStyle) -> _HeatmapLayout:
    """Cell size from the widest and tallest cell text (unless `style.cell`), label and title space."""
    lh = _line_height()
    max_lines = max((len(t.split("\n")) for row in text for t in row), default=1)
    cw = max([56] + [text_size(line)[0] + 10 for row in text for t in row for line in t.split("\n")])
    ch = max(32, max_lines * lh + 10)
    if style.cell is not None:
        cw, ch = style.cell
    row_w = min(220, max([text_size(r)[0] for r in rows] + [10]))
    vertical = any(text_size(c)[0] > cw - 4 for c in cols)
    col_h = max(_vertical_label(c).height for c in cols) if vertical and cols else lh
    title_h = lh + PAD if style.title else 0
    col_title_h = lh if style.col_title else 0
    row_title_w = lh if style.row_title else 0
    left = PAD + row_title_w + row_w + PAD
    top = PAD + title_h + col_title_h + col_h + 4
    return _HeatmapLayout(len(rows), len(cols), cw, ch, row_w, vertical, left, top, title_h)


def _heatmap_axis_titles(img: Image.Image, draw: ImageDraw.ImageDraw, layout: dict[str, Box], g: _HeatmapLayout, style: HeatmapStyle) -> None:
    """The column axis title above the column labels, the row axis title (vertical) left of the row labels."""
    lh = _line_height()
    if style.col_title:
        y = PAD + g.title_h
        draw.text((g.left, y), fit(style.col_title, g.m * g.cw), fill=INK, font=font())
        layout["col_title"] = (g.left, y, g.left + min(g.m * g.cw, text_size(style.col_title)[0]), y + lh)
    if style.row_title:
        strip = _vertical_label(style.row_title, max_len=max(40, g.n * g.ch))
        y = g.top + max(0, (g.n * g.ch - strip.height) // 2)
        img.paste(strip, (PAD, y), strip)
        layout["row_title"] = (PAD, y, PAD + strip.width, y + strip.height)


def _heatmap_col_labels(img: Image.Image, draw: ImageDraw.ImageDraw, layout: dict[str, Box], g: _HeatmapLayout, cols: Sequence[str]) -> None:
    """Each column's label centred above it, vertical when any label does not fit across."""
    lh = _line_height()
    for j, name in enumerate(cols):
        x0 = g.left + j * g.cw
        if g.vertical:
            strip = _vertical_label(name)
            x = x0 + (g.cw - strip.width) // 2
            y = g.top - 4 - strip.height
            img.paste(strip, (x, y), strip)
            layout[f"col:{j}"] = (x, y, x + strip.width, y + strip.height)
        else:
            tw = text_size(name)[0]
            x = x0 + (g.cw - tw) // 2
            draw.text((x, g.top - 4 - lh), name, fill=INK, font=font())
            layout[f"col:{j}"] = (x, g.top - 4 - lh, x + tw, g.top - 4)


def _heatmap_rows(draw: ImageDraw.ImageDraw, layout: dict[str, Box], g: _HeatmapLayout, rows: Sequence[str],
                  text: Sequence[Sequence[str]], shade: Sequence[Sequence[float | None]], cmap: Colormap) -> None:
    """Each row's label, right-aligned, and its cells: shaded on `cmap`, captioned in contrasting ink."""
    lh, f = _line_height(), font()
    for i, name in enumerate(rows):
        label = fit(name, g.row_w)
        tw = text_size(label)[0]
        y = g.top + i * g.ch + (g.ch - lh) // 2
        x = g.left - PAD - tw
        draw.text((x, y), label, fill=INK, font=f)
        layout[f"row:{i}"] = (x, y, x + tw, y + lh)
        for j in range(g.m):
            x0, y0 = g.left + j * g.cw, g.top + i * g.ch
            bg = colour(shade[i][j], cmap)
            draw.rectangle((x0, y0, x0 + g.cw - 1, y0 + g.ch - 1), fill=bg, outline=GRID)
            lines = text[i][j].split("\n") if text[i][j] else []
            ty = y0 + (g.ch - len(lines) * lh) // 2
            for line in lines:
                line = fit(line, g.cw - 4)
                draw.text((x0 + (g.cw - text_size(line)[0]) // 2, ty), line, fill=ink_on(bg), font=f)
                ty += lh
            layout[f"cell:{i}:{j}"] = (x0, y0, x0 + g.cw, y0 + g.ch)


def bars(
    values: Sequence[float],
    labels: Sequence[str],
    *,
    title: str = "",
    text: Sequence[str] | None = None,
    reference: float | None = None,
    bar_width: int = 240,
) -> Image.Image:
    """Horizontal bars (values in [0, 1]) with labels on the left and `text` on the right; an optional
    dashed `reference` line (e.g. the uniform share 1/k)."""

    if len(values) != len(labels):
        raise ValueError("one label per value")
    text = list(text) if text is not None else [f"{v:.2f}" for v in values]
    lh = _line_height()
    bh = lh + 6
    label_w = min(200, max([text_size(lab)[0] for lab in labels] + [10]))
    text_w = max([text_size(t)[0] for t in text] + [10])
    title_h = lh + PAD if title else 0
    left = PAD + label_w + PAD
    img, draw, layout = _canvas(left + bar_width + PAD + text_w + PAD, PAD + title_h + len(values) * bh + PAD, title)
    f = font()
    top = PAD + title_h
    for i, (v, lab, t) in enumerate(zip(values, labels, text)):
        y = top + i * bh
        label = fit(lab, label_w)
        draw.text((left - PAD - text_size(label)[0], y + 3), label, fill=INK, font=f)
        layout[f"row:{i}"] = (left - PAD - text_size(label)[0], y + 3, left - PAD, y + 3 + lh)
        length = round(min(max(v, 0.0), 1.0) * bar_width)
        draw.rectangle((left, y + 2, left + bar_width, y + bh - 3), fill=MISSING)
        if length:
            draw.rectangle((left, y + 2, left + length, y + bh - 3), fill=colour(0.55, "viridis"))
        draw.text((left + bar_width + PAD, y + 3), t, fill=INK, font=f)
        layout[f"bar:{i}"] = (left, y + 2, left + bar_width, y + bh - 3)
    if reference is not None and 0 <= reference <= 1:
        x = left + round(reference * bar_width)
        for y in range(top, top + len(values) * bh, 6):
            draw.line((x, y, x, y + 3), fill=INK, width=1)
    img.info["layout"] = layout
    return img


def contact_sheet(
    images: Sequence[Sequence[Image.Image | None]],
    rows: Sequence[str],
    cols: Sequence[str],
    *,
    title: str = "",
    captions: Sequence[Sequence[str]] | None = None,
    cell: int | None = None,
    row_label_width: int = 180,
) -> Image.Image:
    """A labelled grid: `images[i][j]` under column header `cols[j]`, beside row label `rows[i]` (word-
    wrapped), with an optional caption line under each image. Images are scaled to `cell` pixels
    (default: their own size, kept between 128 and 256; small ones are enlarged without smoothing)."""
    n, m = len(rows), len(cols)
    if len(images) != n or any(len(r) != m for r in images):
        raise ValueError(f"images must be {n} rows of {m} columns")
    sizes = [max(im.size) for row in images for im in row if im is not None]
    if cell is None:
        cell = min(256, max(128, max(sizes, default=128)))
    lh = _line_height()
    cap_lines = 0
    if captions is not None:
        cap_lines = max((len(c.split("\n")) for row in captions for c in row if c), default=0)
    title_h = lh + PAD if title else 0
    head_h = 2 * lh + 4  # column headers get two lines
    cell_h = cell + cap_lines * lh + PAD
    left = PAD + row_label_width + PAD
    top = PAD + title_h + head_h
    sheet, draw, layout = _canvas(left + m * (cell + PAD), top + n * cell_h + PAD, title)
    f = font()
    for j, name in enumerate(cols):
        x0 = left + j * (cell + PAD)
        lines = wrap(name, cell, max_lines=2)
        y = PAD + title_h + (head_h - len(lines) * lh)
        for k, line in enumerate(lines):
            draw.text((x0 + (cell - text_size(line)[0]) // 2, y + k * lh), line, fill=INK, font=f)
        layout[f"col:{j}"] = (x0, y, x0 + cell, y + len(lines) * lh)
    max_row_lines = max(1, cell // lh)
    for i, name in enumerate(rows):
        y0 = top + i * cell_h
        lines = wrap(name, row_label_width, max_lines=max_row_lines)
        for k, line in enumerate(lines):
            draw.text((PAD, y0 + k * lh), line, fill=INK, font=f)
        layout[f"row:{i}"] = (PAD, y0, PAD + max(text_size(l)[0] for l in lines), y0 + len(lines) * lh)
        for j in range(m):
            x0 = left + j * (cell + PAD)
            _sheet_cell(sheet, draw, images[i][j], (x0, y0), cell)
            layout[f"cell:{i}:{j}"] = (x0, y0, x0 + cell, y0 + cell)
            if captions is not None and captions[i][j]:
                for k, line in enumerate(captions[i][j].split("\n")):
                    line = fit(line, cell)
                    draw.text((x0 + (cell - text_size(line)[0]) // 2, y0 + cell + 2 + k * lh), line, fill=INK, font=f)
                layout[f"caption:{i}:{j}"] = (x0, y0 + cell + 2, x0 + cell, y0 + cell + 2 + cap_lines * lh)
    sheet.info["layout"] = layout
    return sheet


def _sheet_cell(sheet: Image.Image, draw: ImageDraw.ImageDraw, im: Image.Image | None, at: tuple[int, int], cell: int) -> None:
    """`im` scaled to fit a `cell`-pixel square at `at` and centred there (a crossed grey box when None)."""
    from PIL import Image

    x0, y0 = at
    if im is None:
        draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=MISSING, outline=GRID)
        draw.line((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=GRID)
        return
    im = im.convert("RGB")
    scale = cell / max(im.size)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    im = im.resize(size, resample) if size != im.size else im
    sheet.paste(im, (x0 + (cell - im.width) // 2, y0 + (cell - im.height) // 2))
