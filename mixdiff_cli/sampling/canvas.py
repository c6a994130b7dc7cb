"""A regional canvas as a denoiser (Mixture of Diffusers, Jiménez 2023, arXiv:2302.02412, Algorithm 1):
every region has its own prompt and experts, a canvas larger than the base's native size is cut into
overlapping native-size tiles, and at each step

    eps(x) = sum_j m_j(x) eps_j(x[tile_j]) / sum_j m_j(x)      m_j = tile Gaussian x region map x expert weight

over the terms j = (tile, region, expert) whose weights touch the tile. `CanvasDenoiser` has the base
denoiser's forward signature, so a standard diffusers pipeline samples it unchanged (every scheduler, classifier-free
guidance: weights are the same for both halves, so guidance after the blend equals guidance per term).
Terms that share a step run in ONE batched forward of the base denoiser, each sample with its own adapter
(PEFT's per-sample hook, `mixture.adapter_names_hooks`), in chunks of at most `max_batch` samples.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mixdiff_cli.catalog.model import Catalog
from mixdiff_cli.catalog.schema import load_catalog
from mixdiff_cli.core.errors import MixdiffWarning
from mixdiff_cli.core.fsutil import output_dir
from mixdiff_cli.routing.route import check_known, parse_members
from mixdiff_cli.families.base import Cond, cat
from mixdiff_cli.sampling.engine import Active, Engine, Request, RouteInfo
from mixdiff_cli.sampling.requests import check_finite
from mixdiff_cli.sampling.mixture import BASE, Mixture, adapter_names_hooks
from mixdiff_cli.sampling.options import DEFAULT_SCHEDULER, DEFAULT_STEPS, MAX_SEED, GenerationOptions, check_image
from mixdiff_cli.sampling.regions import (CanvasOptions, Region, RegionError, Tile, box_tiles, check_regions, parse_box, parse_regions,
                                          region_map, tile_weights, tiles)

if TYPE_CHECKING:
    from mixdiff_cli.models.text import Encoded
    from mixdiff_cli.sampling.generate import Generated

MODEL = "model:"  # prefix of a term's denoiser key when the expert is a full model (else: adapter name or BASE)
NEGATIVE = 0  # row of the negative prompt in the text table


@dataclass
class Term:
    """One (tile, region, expert): denoiser `unet` runs on the tile under text row `text`, weighted by `weight`
    ((h, w) over the tile, already divided by the sum of all terms' weights there)."""

    tile: int
    unet: str
    text: int
    weight: torch.Tensor


@dataclass
class CanvasPlan:
    """What the denoiser needs for one run: tiles, terms, the text table and the batch size."""

    tiles: list[Tile]
    terms: list[Term]
    texts: Cond  # the denoiser's text conditioning (T, ...): row 0 the negative, then one row per prompt
    tile_conds: list[Cond]  # each tile's own conditioning (1, ...) (e.g. size micro-conditioning); {} for none
    hooked: bool  # more than one adapter (or the bare base) shares the base denoiser: per-sample hooks
    max_batch: int = 16
    images: int = 1  # B: images sampled together


class CanvasDenoiser(Mixture):
    """A drop-in base denoiser over the whole latent canvas (B or 2B under guidance, C, H, W)."""

    def __init__(self, engine: Engine, plan: CanvasPlan):
        super().__init__(engine.denoiser, engine.family)
        self._experts = engine.mixture.models  # full-model experts by name (the engine's mixture holds them)
        self.plan = plan

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        plan = self.plan
        b = plan.images
        sample, timestep, _, rest = self.family.split(args, kwargs)
        halves = [sample[:b], sample[b:]] if sample.shape[0] == 2 * b else [sample]  # [uncond, cond] under guidance
        t = timestep[0] if isinstance(timestep, torch.Tensor) and timestep.ndim == 1 else timestep
        calls: dict[tuple[int, int, str, int], None] = {}  # (half, tile, denoiser, text row), in order
        for term in plan.terms:
            if len(halves) == 2:
                calls[(0, term.tile, term.unet, NEGATIVE)] = None
            calls[(len(halves) - 1, term.tile, term.unet, term.text)] = None
        eps = self._run(list(calls), halves, t, rest)
        out = [torch.zeros_like(h) for h in halves]
        for term in plan.terms:
            rows, cols = plan.tiles[term.tile].window
            for half in range(len(halves)):
                text = NEGATIVE if half == 0 and len(halves) == 2 else term.text
                out[half][:, :, rows, cols] += term.weight * eps[(half, term.tile, term.unet, text)]
        mixed = torch.cat(out) if len(out) == 2 else out[0]
        return self.family.output(mixed, kwargs.get("return_dict", True))

    def _cond(self, tile: int, text: int) -> Cond:
        """The (B, ...) conditioning of one call: text row `text` on tile `tile`."""
        plan, b = self.plan, self.plan.images
        one = {**{k: v[text : text + 1] for k, v in plan.texts.items()}, **plan.tile_conds[tile]}
        return {k: v.expand(b, *v.shape[1:]) for k, v in one.items()}

    def _run(self, calls: list[tuple[int, int, str, int]], halves: list[torch.Tensor], t: Any,
             rest: dict[str, Any]) -> dict[tuple[int, int, str, int], torch.Tensor]:
        """Each call's (B, C, h, w) noise prediction: base-denoiser calls batched with per-sample adapters,
        full-model calls batched per model, at most `max_batch` samples per forward."""
        plan, b = self.plan, self.plan.images
        groups: dict[str, list[tuple[int, int, str, int]]] = {}
        for call in calls:
            groups.setdefault(call[2] if call[2].startswith(MODEL) else "", []).append(call)
        per = max(1, plan.max_batch // b)  # calls per forward
        eps: dict[tuple[int, int, str, int], torch.Tensor] = {}
        for key, group in groups.items():
            model = self._experts[key.removeprefix(MODEL)] if key else self.base
            for start in range(0, len(group), per):
                chunk = group[start : start + per]
                x = torch.cat([halves[h][:, :, rows, cols] for h, tile, _, _ in chunk for rows, cols in [plan.tiles[tile].window]])
                cond = cat([self._cond(tile, text) for _, tile, _, text in chunk])  # (n*B, ...)
                names = [name for _, _, name, _ in chunk for _ in range(b)]
                hooks = adapter_names_hooks(model, names) if plan.hooked and not key else contextlib.nullcontext()
                with hooks:
                    pred = self.family.run(model, x, t, cond, rest)  # (n*B, C, h, w)
                eps.update(zip(chunk, pred.split(b)))
        return eps


# --- planning ----------------------------------------------------------------------------------------


@dataclass
class _Entry:
    """A prompt of the canvas (the background or a region), its map and its route."""

    name: str
    prompt: str
    members: tuple[Any, ...]  # pinned Members (empty: the router decides)
    region: Region | None  # None: the background
    chosen: list[tuple[str, float]] = field(default_factory=list)
    decision: dict[str, Any] = field(default_factory=dict)


def _native(engine: Engine) -> tuple[int, int]:
    """(native latent size, pixels per latent cell) of the base."""
    f = int(engine.pipe.vae_scale_factor)
    return engine.native_size() // f, f


def _terms(entries: list[_Entry], maps: list[torch.Tensor], grid: list[Tile], own: Callable[[_Entry], list[Tile]] | None,
           unet_key: dict[str, str]) -> tuple[list[Tile], list[tuple[int, str, int, torch.Tensor]], torch.Tensor]:
    """(tiles, raw terms (tile, denoiser key, text row, weight), total weight per cell). A region's prompt runs on
    its own tiles (`own`; None: on the grid, like the background), so that a neighbour's content enters its
    denoiser's view only across the overlap; identical windows are one tile."""
    windows: dict[tuple[int, int, int, int], int] = {}
    raw: list[tuple[int, str, int, torch.Tensor]] = []
    for row, (e, m) in enumerate(zip(entries, maps), start=1):
        for tile in grid if own is None or e.region is None else own(e):
            crop = tile_weights(tile.h, tile.w) * m[tile.window]
            if crop.max() <= 0:
                continue  # this prompt does not touch the tile
            index = windows.setdefault((tile.y0, tile.x0, tile.h, tile.w), len(windows))
            for name, weight in e.chosen or [(BASE, 1.0)]:
                raw.append((index, unet_key.get(name, BASE), row, crop * weight))
    used = [Tile(*key) for key in windows]
    total = torch.zeros(maps[0].shape, dtype=torch.float64)
    for index, _, _, w in raw:
        total[used[index].window] += w
    return used, raw, total


def plan_canvas(engine: Engine, entries: list[_Entry], encoded: Encoded, size: tuple[int, int], canvas: CanvasOptions) -> CanvasPlan:
    """Tiles of the (height, width) px canvas, the weighted terms, the text table, the adapter state."""
    native, f = _native(engine)
    height, width = size[0] // f, size[1] // f
    overlap = (canvas.tile_overlap if canvas.tile_overlap is not None else native * f // 4) // f
    grid = tiles(height, width, native, overlap)
    names = list(dict.fromkeys(n for e in entries for n, _ in e.chosen))
    engine.ensure_loaded(names)
    engine.plan([Active(engine.catalog.expert(n), 1.0) for n in names], "noise")  # every LoRA at its strength
    unet_key = {n: MODEL + n if kind == "model" else adapter for n, (kind, adapter) in engine.slots(names).items()}
    adapted = engine.text_adapted(names)
    if adapted:
        warnings.warn(f"regions use the bare text encoders: the text-encoder part of {', '.join(adapted)} is not applied",
                      MixdiffWarning, stacklevel=2)
    maps = []
    for e in entries:
        full = torch.ones(height, width, dtype=torch.float64)
        maps.append(full * canvas.background_weight if e.region is None else region_map(e.region.box, height, width, canvas.feather))
    bare = (sum(maps) <= 0).double().mean().item()
    if bare > 0:
        raise RegionError(f"the regions leave {bare:.0%} of the canvas uncovered",
                          'pass a background PROMPT (it may be "") or widen the boxes')
    grid, raw, total = _terms(entries, maps, grid, lambda e: box_tiles(e.region.box, height, width, native, overlap), unet_key)
    if bool(((total <= 0) & (sum(maps) > 0)).any()):  # a region's edge beyond its own tiles: every prompt on the grid
        grid, raw, total = _terms(entries, maps, tiles(height, width, native, overlap), None, unet_key)
    dtype, device = engine.denoiser.dtype, engine.device
    terms = [Term(t, u, r, (w / total[grid[t].window]).to(device=device, dtype=dtype)) for t, u, r, w in raw]
    texts = engine.family.denoiser_cond({k: torch.cat([encoded.negatives[k][:1], v]) for k, v in encoded.fields.items()})
    like = next(iter(texts.values()))
    tile_conds = [engine.family.tile_cond((t.y0 * f, t.x0 * f, t.h * f, t.w * f), size, like) for t in grid]
    hooked = len({term.unet for term in terms if not term.unet.startswith(MODEL)}) > 1
    return CanvasPlan(grid, terms, texts, tile_conds, hooked, canvas.max_batch)


# --- generation --------------------------------------------------------------------------------------


def _replayed(record: dict[str, Any]) -> tuple[str | None, tuple[Region, ...], dict[str, Any], CanvasOptions, tuple[Any, ...]]:
    """(background, regions with their recorded experts pinned, request fields, canvas options, background
    experts) from a canvas PNG record."""
    from mixdiff_cli.sampling.pngmeta import MetadataError

    if not record.get("regions"):
        raise MetadataError("the image has no regions", "reproduce it with 'mixdiff generate --from' without --region")
    regions = tuple(
        Region(parse_box(r["box"], f"region {i}"), r["prompt"], parse_members([[e["name"], e["weight"]] for e in r["experts"]]), f"region {i}")
        for i, r in enumerate(record["regions"], start=1)
    )
    settings = record.get("canvas") or {}
    canvas = CanvasOptions(background_weight=settings.get("background_weight", 0.0), feather=settings.get("feather", 0.0),
                           tile_overlap=settings.get("tile_overlap"))
    request = {k: record.get(k) for k in ("negative", "seed", "steps", "guidance", "width", "height", "scheduler")}
    background = record.get("prompt") if settings.get("background") else None
    # the background's own experts; records before 2026-12 kept them (only them) in "experts"
    kept = settings["background_experts"] if "background_experts" in settings else record.get("experts", [])
    return background, regions, request, canvas, parse_members([[e["name"], e["weight"]] for e in kept])


def _route_entries(engine: Engine, entries: list[_Entry], encoded: Encoded, replaying: bool, opts: GenerationOptions) -> None:
    """Each entry's experts: its pinned ones (or the recorded ones), else the router's top-k on its prompt."""
    from mixdiff_cli.sampling.generate import _decide

    for i, e in enumerate(entries):
        route, info = _decide(engine, e.prompt, encoded.take([i]), e.members, replaying and bool(e.members), opts.updated(bands="none"))
        e.chosen = list(route.chosen)
        e.decision = {**(info.decision or {}), "source": (info.decision or {}).get("source", info.source)}


def generate_canvas(
    catalog: Catalog | str | Path | Engine,
    background: str | None,
    regions: Sequence[str | Region] = (),
    options: GenerationOptions | None = None,
    canvas: CanvasOptions | None = None,
    *,
    out_dir: str | Path = "outputs",
    from_image: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Generated:
    """A canvas of regions, each with its own prompt and experts (routed or pinned), over a `background`
    prompt (None: none) at `canvas.background_weight`; `options.num_images` PNGs with metadata in `out_dir`.
    `catalog` may be an engine already loaded. With `from_image`, the recorded regions, routes and settings
    replay (options left None take the record's)."""
    from mixdiff_cli.sampling.generate import Generated
    from mixdiff_cli.sampling.pngmeta import read_record, save_next_png

    engine = catalog if isinstance(catalog, Engine) else None
    cat = engine.catalog if engine is not None else catalog if isinstance(catalog, Catalog) else load_catalog(catalog)
    opts = (options or GenerationOptions()).check(len(cat.experts))
    canvas = (canvas or CanvasOptions()).check()
    check_known(opts.experts, cat.names)
    parsed = parse_regions(regions)
    recorded: dict[str, Any] = {}
    background_members = opts.experts
    if from_image is not None:
        record = read_record(from_image)
        bg, replay_regions, recorded, replay_canvas, bg_members = _replayed(record)
        background = background if background is not None else bg
        parsed = parsed or replay_regions
        canvas = canvas if regions else replay_canvas.check()
        background_members = background_members or bg_members
    if not parsed:
        raise RegionError("no region given", 'pass --region "x0:x1,y0:y1=TEXT" (e.g. "0:0.5,0:1=a snowy landscape")')
    check_regions(parsed, cat.names)

    pick = lambda name: getattr(opts, name) if getattr(opts, name) is not None else recorded.get(name)  # noqa: E731
    steps, guidance, scheduler = pick("steps") or DEFAULT_STEPS, pick("guidance"), pick("scheduler") or DEFAULT_SCHEDULER
    negative, seed = pick("negative"), pick("seed")
    seed = seed if seed is not None else random.randint(0, MAX_SEED)
    engine = engine or Engine.from_options(cat, opts)
    check_image(seed=seed)
    base = canvas_request(engine, Request(background or "", negative, None, steps, guidance, pick("width"), pick("height"), scheduler))
    run = prepare_canvas(engine, background, parsed, base, opts.updated(experts=background_members), canvas, replaying=from_image is not None)
    seeds = [(seed + i) % (MAX_SEED + 1) for i in range(opts.num_images)]
    paths: list[Path] = []
    with output_dir(out_dir) as out_dir, engine.batch_invariant():
        for start in range(0, len(seeds), opts.batch_size):
            chunk = seeds[start : start + opts.batch_size]
            tick = None if progress is None else (lambda done, base=start * steps: progress(base + done, steps * len(seeds)))
            for s, image in zip(chunk, sample_canvas(run, chunk, tick)):
                paths.append(save_next_png(image, out_dir, s, after=paths[-1] if paths else None))
    route = {"regions": [{"name": e.name, "box": _box_text(e.region), "chosen": e.decision.get("chosen")} for e in run.entries if e.region]}
    if any(e.region is None for e in run.entries):
        route["background"] = {"chosen": next(e.decision.get("chosen") for e in run.entries if e.region is None)}
    return Generated(paths=paths, seeds=seeds, route=route, blend="regions")


def canvas_request(engine: Engine, req: Request) -> Request:
    """`req` with the defaults filled in (native size, the base's guidance) and checked."""
    native, f = _native(engine)
    width, height = req.width or native * f, req.height or native * f
    guidance = float(req.guidance if req.guidance is not None else engine.default_guidance())
    check_image(steps=req.steps, guidance=guidance, width=width, height=height, scheduler=req.scheduler)
    if width % f or height % f:
        raise RegionError(f"the canvas {width}x{height} is not a multiple of {f} pixels", f"pass --width/--height in steps of {f}")
    return Request(req.prompt, req.negative, req.seed, req.steps, guidance, width, height, req.scheduler)


@dataclass
class CanvasRun:
    """A canvas ready to sample: its prompts encoded and routed, its tiles and terms planned."""

    engine: Engine
    entries: list[_Entry]
    encoded: Encoded
    plan: CanvasPlan
    request: Request  # the settings every image shares (seed None)
    canvas: CanvasOptions


def prepare_canvas(engine: Engine, background: str | None, regions: Sequence[Region], request: Request, opts: GenerationOptions,
                   canvas: CanvasOptions, replaying: bool = False) -> CanvasRun:
    """Encode the background (None: none) and the regions' prompts in one pass, route each, plan the terms.
    `request`: steps, guidance, size, scheduler and negative, all given."""
    entries = ([_Entry("background", background, opts.experts, None)] if background is not None and canvas.background_weight > 0 else [])
    entries += [_Entry(r.name, r.prompt, r.experts, r) for r in regions]
    encoded = engine.encode([e.prompt for e in entries], [request.negative] * len(entries))
    _route_entries(engine, entries, encoded, replaying, opts)
    plan = plan_canvas(engine, entries, encoded, (request.height, request.width), canvas)
    return CanvasRun(engine, entries, encoded, plan, request, canvas)


def sample_canvas(run: CanvasRun, seeds: Sequence[int], progress: Callable[[int], None] | None = None) -> list[Any]:
    """PIL images of the canvas for `seeds`, in one pipeline call, each with its metadata record in
    `image.info["mixdiff"]` (A1111 text in `image.info["parameters"]`). `progress(step)` after each step."""
    from mixdiff_cli.sampling.pngmeta import a1111_parameters

    engine, req, pipe = run.engine, run.request, run.engine.pipe
    run.plan.images = len(seeds)
    def tick(pipe: Any, i: int, t: Any, tensors: dict) -> dict:
        check_finite(tensors, i + 1, req.steps)
        if progress is not None:
            progress(i + 1)
        return tensors

    pipe.scheduler = engine.scheduler_for(req.scheduler)
    regional = len(run.entries) > 1  # one prompt: the pipeline's own decode
    with engine.installed(CanvasDenoiser(engine, run.plan)):
        images = pipe(**run.encoded.take([0] * len(seeds)).pipeline_kwargs(), num_inference_steps=req.steps, guidance_scale=req.guidance,
                      width=req.width, height=req.height, output_type="latent" if regional else "pil", callback_on_step_end=tick,
                      generator=[torch.Generator(device=engine.device).manual_seed(s) for s in seeds]).images
    if regional:
        with torch.no_grad():
            images = pipe.image_processor.postprocess(decode_regions(run, images), output_type="pil")
    for s, image in zip(seeds, images):
        record = canvas_record(engine, run.entries, Request(req.prompt, req.negative, s, req.steps, req.guidance, req.width, req.height,
                                                            req.scheduler), run.canvas, len(run.plan.tiles))
        image.info["mixdiff"], image.info["parameters"] = record, a1111_parameters(record)
    return list(images)


def decode_regions(run: CanvasRun, latents: torch.Tensor) -> torch.Tensor:
    """The canvas decoded prompt by prompt: each region's latent crop on its own (the background's whole
    canvas), blended with the prompts' maps at pixel resolution; (B, 3, H, W) in [-1, 1].

    One decode of the whole canvas would normalise every region with the others' statistics (the VAE
    decoder's GroupNorm and mid-block attention are global over the image): each region keeps its layout
    but takes on its neighbours' colours."""
    engine = run.engine
    f = int(engine.pipe.vae_scale_factor)
    height, width = latents.shape[-2] * f, latents.shape[-1] * f
    num = torch.zeros((latents.shape[0], 3, height, width), dtype=torch.float64, device=latents.device)
    den = torch.zeros((height, width), dtype=torch.float64, device=latents.device)
    for e in run.entries:
        if e.region is None:
            weight = torch.full((height, width), run.canvas.background_weight, dtype=torch.float64)
        else:
            weight = region_map(e.region.box, height, width, run.canvas.feather)
        rows, cols = torch.nonzero(weight.sum(1) > 0).flatten(), torch.nonzero(weight.sum(0) > 0).flatten()
        if len(rows) == 0 or len(cols) == 0:
            continue
        y0, y1 = int(rows[0]) // f, -(-(int(rows[-1]) + 1) // f)  # the latent cells under the map
        x0, x1 = int(cols[0]) // f, -(-(int(cols[-1]) + 1) // f)
        window = (slice(y0 * f, y1 * f), slice(x0 * f, x1 * f))
        image = engine.family.decode(engine.pipe, latents[:, :, y0:y1, x0:x1]).to(torch.float64)
        weight = weight[window].to(latents.device)
        num[:, :, window[0], window[1]] += weight * image
        den[window] += weight
    if bool((den <= 0).any()):  # pixels between boxes that only cover latent cells' centres: the whole decode
        whole = engine.family.decode(engine.pipe, latents).to(torch.float64)
        num, den = torch.where(den > 0, num, whole), torch.where(den > 0, den, torch.ones_like(den))
    return (num / den).to(latents.dtype)


def _box_text(region: Region | None) -> str:
    x0, x1, y0, y1 = region.box if region is not None else (0.0, 1.0, 0.0, 1.0)
    return f"{x0:g}:{x1:g},{y0:g}:{y1:g}"


def canvas_record(engine: Engine, entries: list[_Entry], req: Request, canvas: CanvasOptions, n_tiles: int) -> dict[str, Any]:
    """The engine's record of the background's route, plus each region's box, prompt and route."""
    bg = next((e for e in entries if e.region is None), None)
    used: dict[str, float] = {}  # every expert the canvas uses, background and regions, at its first weight
    for e in entries:
        for name, weight in e.chosen:
            used.setdefault(name, weight)
    members = [Active(engine.catalog.expert(n), w) for n, w in used.items()]
    record = engine.record(req, members, "regions", RouteInfo(source="explicit", decision=bg.decision if bg else None))
    record["regions"] = [
        {"box": _box_text(e.region), "prompt": e.prompt, "route": e.decision,
         "experts": [{"name": n, "weight": w, "kind": engine.catalog.expert(n).kind, "sha256": engine.catalog.expert(n).sha256} for n, w in e.chosen]}
        for e in entries if e.region is not None
    ]
    record["canvas"] = {"background": bg is not None, "background_weight": canvas.background_weight, "feather": canvas.feather,
                        "tile_overlap": canvas.tile_overlap, "tiles": n_tiles,
                        "background_experts": [{"name": n, "weight": w} for n, w in (bg.chosen if bg else [])]}
    return record
