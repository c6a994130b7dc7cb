"""Regions of a canvas as data: `--region BOX=TEXT` parsed, their weight maps, and the tiling of a canvas
larger than the base's native size (Mixture of Diffusers, Jiménez 2023, arXiv:2302.02412).

    BOX   x0:x1,y0:y1 in fractions of the canvas (0 <= x0 < x1 <= 1), e.g. 0:0.5,0:1 is the left half
    TEXT  a prompt with inline --expert NAME[:W] (the prompt-file grammar); without one the router picks

Import-light: torch only inside the functions that build maps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mixdiff_cli.core.errors import ExpertNotFound, UsageError
from mixdiff_cli.routing.route import Member, RouteSpecError, check_known, parse_members

if TYPE_CHECKING:
    import torch

BOX_EXAMPLE = 'write BOX=TEXT with BOX as x0:x1,y0:y1 in fractions of the canvas, e.g. --region "0:0.5,0:1=a snowy landscape"'
TILE_VAR = 0.01  # variance of the Gaussian tile weights, in tile widths squared (Mixture of Diffusers' default)
Box = tuple[float, float, float, float]  # (x0, x1, y0, y1)


class RegionError(UsageError):
    """A `--region` outside its grammar (bad box, bad text) or a canvas the regions cannot cover."""


@dataclass(frozen=True)
class Region:
    """One region: its box, its prompt, and the experts pinned to it (empty: the router decides)."""

    box: Box
    prompt: str
    experts: tuple[Member, ...] = ()
    name: str = "region"  # how errors name it: 'region 2 ("0.5:1,0:1=...")'

    def spec(self) -> str:
        """The region in the `--region` grammar."""
        x0, x1, y0, y1 = self.box
        pinned = "".join(f" --expert {m.spec()}" for m in self.experts)
        return f"{x0:g}:{x1:g},{y0:g}:{y1:g}={self.prompt}{pinned}"


@dataclass
class CanvasOptions:
    """How regions and tiles combine (None: the default)."""

    background_weight: float = 0.1  # the PROMPT's share against a region's 1 where both cover a pixel
    feather: float = 0.05  # width of a region's soft edge, a fraction of the canvas side; 0 = hard edges
    tile_overlap: int | None = None  # pixels tiles share; None: a quarter of the native size
    max_batch: int = 16  # UNet samples per batched forward (bounds memory)
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> CanvasOptions:
        if not (math.isfinite(self.background_weight) and self.background_weight >= 0):
            raise RegionError(f"--background-weight must be a number >= 0, got {self.background_weight}", "e.g. --background-weight 0.1")
        if not (math.isfinite(self.feather) and 0 <= self.feather <= 1):
            raise RegionError(f"--feather must be in 0..1, got {self.feather}", "e.g. --feather 0.05 (0: hard edges)")
        if self.tile_overlap is not None and self.tile_overlap < 0:
            raise RegionError(f"--tile-overlap must be >= 0 pixels, got {self.tile_overlap}", "e.g. --tile-overlap 16")
        if self.max_batch < 1:
            raise RegionError(f"max_batch must be at least 1, got {self.max_batch}", "pass 1 or more")
        return self


def _number(text: str, what: str, shown: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise RegionError(f"{shown}: {what} {text!r} is not a number", BOX_EXAMPLE) from None
    if not math.isfinite(value):
        raise RegionError(f"{shown}: {what} {text!r} is not a number", BOX_EXAMPLE)
    return value


def parse_box(text: str, shown: str) -> Box:
    """"x0:x1,y0:y1" -> (x0, x1, y0, y1), each span inside 0..1 and not empty."""
    spans = text.split(",")
    if len(spans) != 2 or any(s.count(":") != 1 for s in spans):
        raise RegionError(f"{shown}: the box {text!r} is not x0:x1,y0:y1", BOX_EXAMPLE)
    out: list[float] = []
    for axis, span in zip("xy", spans):
        lo, hi = (_number(v.strip(), f"{axis} bound", shown) for v in span.split(":"))
        if not (0 <= lo <= 1 and 0 <= hi <= 1):
            raise RegionError(f"{shown}: {axis} span {lo:g}:{hi:g} lies outside 0..1", BOX_EXAMPLE)
        if not lo < hi:
            raise RegionError(f"{shown}: {axis} span {lo:g}:{hi:g} is empty (its start is not before its end)", BOX_EXAMPLE)
        out += [lo, hi]
    return (out[0], out[1], out[2], out[3])


def parse_region(spec: str | Region, index: int = 1) -> Region:
    """`BOX=TEXT` (TEXT with inline `--expert NAME[:W]`, the prompt-file grammar) -> Region."""
    from mixdiff_cli.sampling.prompts import _Bad, parse_txt_line

    if isinstance(spec, Region):
        return spec
    shown = f"region {index} ({spec!r})"
    box_text, sep, text = str(spec).partition("=")
    if not sep:
        raise RegionError(f"{shown} has no '='", BOX_EXAMPLE)
    box = parse_box(box_text.strip(), shown)
    try:
        record = parse_txt_line(text.strip())
    except _Bad as exc:
        raise RegionError(f"{shown}: {exc.what}", exc.hint) from None
    extra = sorted(set(record) - {"prompt", "experts"})
    if extra:
        raise RegionError(f"{shown}: --{extra[0]} does not apply to one region", "a region's TEXT takes only --expert NAME[:W]")
    try:
        experts = parse_members(record.get("experts") or ())
    except RouteSpecError as exc:
        raise RegionError(f"{shown}: {exc.message}", exc.hint) from None
    if any(m.band is not None for m in experts):
        raise RegionError(f"{shown}: timestep bands (@START:END) are not supported inside a region", "drop the @START:END")
    return Region(box, record["prompt"].strip(), experts, f"region {index}")


def parse_regions(specs: Any) -> tuple[Region, ...]:
    """Several `BOX=TEXT` specs (or Regions), numbered from 1 in errors."""
    return tuple(parse_region(s, i) for i, s in enumerate(specs or (), start=1))


def check_regions(regions: Sequence[Region], names: Sequence[str]) -> None:
    """Every region's pinned experts are in the catalog (`names`); the error names the region."""
    for region in regions:
        try:
            check_known(region.experts, names)
        except ExpertNotFound as exc:
            raise ExpertNotFound(f"{region.name} ({region.spec()!r}): {exc.message}", exc.hint) from None


# --- weight maps ------------------------------------------------------------------------------------


def _ramp(n: int, lo: float, hi: float, feather: float) -> torch.Tensor:
    """(n,) weights along one axis of n cells: 1 inside [lo, hi), a linear ramp `feather` wide centred on
    each edge that is not the canvas border (value 0.5 on the edge), 0 beyond."""
    import torch

    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # cell centres
    if feather <= 0:
        return ((u >= lo) & (u < hi)).double()
    inside_lo = u - lo if lo > 0 else torch.full_like(u, math.inf)
    inside_hi = hi - u if hi < 1 else torch.full_like(u, math.inf)
    return ((torch.minimum(inside_lo, inside_hi) + feather / 2) / feather).clamp(0, 1)


def region_map(box: Box, height: int, width: int, feather: float) -> torch.Tensor:
    """(height, width) float64 weights of a box on a grid of cells (latent pixels)."""
    x0, x1, y0, y1 = box
    return _ramp(height, y0, y1, feather)[:, None] * _ramp(width, x0, x1, feather)[None, :]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of `tile` cells covering `length` cells, neighbours sharing at least `overlap`
    (spread evenly, the last flush with the end)."""
    if length <= tile:
        return [0]
    stride = max(tile - overlap, 1)
    count = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def tile_weights(height: int, width: int) -> torch.Tensor:
    """(height, width) float64 Gaussian weights of one tile, largest in its centre (Mixture of Diffusers)."""
    import torch

    def axis(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float64)
        return torch.exp(-((x - (n - 1) / 2) ** 2) / (n * n) / (2 * TILE_VAR))

    return axis(height)[:, None] * axis(width)[None, :]


@dataclass(frozen=True)
class Tile:
    """A window of the latent canvas: rows y0:y0+h, columns x0:x0+w."""

    y0: int
    x0: int
    h: int
    w: int

    @property
    def window(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y0 + self.h), slice(self.x0, self.x0 + self.w)


def tiles(height: int, width: int, native: int, overlap: int) -> list[Tile]:
    """The tiles of a (height, width) latent canvas, each at most `native` cells a side."""
    th, tw = min(height, native), min(width, native)
    return [Tile(y, x, th, tw) for y in tile_starts(height, th, overlap) for x in tile_starts(width, tw, overlap)]


def _span_starts(lo: float, hi: float, length: int, native: int, overlap: int) -> tuple[list[int], int]:
    """Tile starts and size along one axis for the cells [lo, hi) of a `length`-cell canvas: one native tile
    centred on the span if it fits in one, else tiles over the span (`tile_starts`), all inside the canvas."""
    size = min(length, native)
    a, b = max(0, math.floor(lo)), min(length, math.ceil(hi))
    if b - a <= size:
        centre = (a + b) / 2
        return [min(max(0, round(centre - size / 2)), length - size)], size
    return [a + s for s in tile_starts(b - a, size, overlap)], size


def box_tiles(box: Box, height: int, width: int, native: int, overlap: int) -> list[Tile]:
    """The tiles a region's prompt runs on: native-size windows over its box (centred on a box smaller than
    native), so that a region the size of a tile is sampled on exactly its own cells."""
    x0, x1, y0, y1 = box
    ys, th = _span_starts(y0 * height, y1 * height, height, native, overlap)
    xs, tw = _span_starts(x0 * width, x1 * width, width, native, overlap)
    return [Tile(y, x, th, tw) for y in ys for x in xs]
