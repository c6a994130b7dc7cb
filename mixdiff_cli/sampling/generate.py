"""One prompt to PNG files: route it (or replay a PNG's record), sample it with the engine, write each
image with its metadata. `mixdiff generate PROMPT` is this function."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixdiff_cli.catalog.model import Catalog
from mixdiff_cli.catalog.schema import load_catalog
from mixdiff_cli.core.errors import UsageError
from mixdiff_cli.routing.route import Member, Route, catalog_bands, check_known, explicit_route, parse_members, spread_bands
from mixdiff_cli.sampling.engine import Engine, Request, RouteInfo
from mixdiff_cli.sampling.options import DEFAULT_SCHEDULER, DEFAULT_STEPS, MAX_SEED, GenerationOptions
from mixdiff_cli.core.fsutil import output_dir

if TYPE_CHECKING:
    from mixdiff_cli.models.text import Encoded



@dataclass
class Generated:
    """What `generate_images` wrote."""

    paths: list[Path]
    seeds: list[int]
    route: dict[str, Any]  # the decision (Route.to_dict() or the explicit experts)
    blend: str

    def to_dict(self) -> dict[str, Any]:
        return {"images": [{"path": str(p), "seed": s} for p, s in zip(self.paths, self.seeds)], "route": self.route, "blend": self.blend}


def generate_images(
    catalog: Catalog | str | Path,
    prompt: str | None = None,
    options: GenerationOptions | None = None,
    *,
    out_dir: str | Path = "outputs",
    from_image: str | Path | None = None,
    engine: Engine | None = None,
    progress: Callable[[int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Generated:
    """Route one prompt (or replay `from_image`'s record), generate `options.num_images` (seeds seed,
    seed+1, ...) in batches of `options.batch_size` and write each as a PNG with metadata into `out_dir`.

    With `from_image`, every option left None takes the recorded value and the recorded experts and
    weights replace the router, so the image is reproduced (bit-exactly on the same CPU stack).
    """
    from mixdiff_cli.sampling.pngmeta import save_next_png

    cat = catalog if isinstance(catalog, Catalog) else load_catalog(catalog)
    opts = (options or GenerationOptions()).check(len(cat.experts))
    check_known(opts.experts, cat.names)  # unknown names fail before anything loads
    members, blend, recorded = _replayed(cat, opts, from_image, warn)
    prompt = prompt if prompt is not None else recorded.get("prompt")
    if not prompt:
        raise UsageError("no prompt given", "pass a PROMPT, --from IMAGE.png or --prompts FILE")
    requests = _requests(prompt, opts, recorded)
    seeds, steps = [r.seed for r in requests], requests[0].steps
    with output_dir(out_dir) as out_dir:  # made before the models load; gone again if nothing could be written
        engine = engine or Engine.from_options(cat, opts)
        encoded = engine.encode([prompt], [requests[0].negative])  # the router reads this pass; generation reuses it
        route, info = _decide(engine, prompt, encoded, members, bool(recorded), opts)

        paths: list[Path] = []
        total = steps * opts.num_images
        with engine.batch_invariant():  # on CPU: --batch-size never changes an image, --from reproduces it bit-exactly
            for start in range(0, opts.num_images, opts.batch_size):
                chunk = requests[start : start + opts.batch_size]
                tick = None if progress is None else (lambda done, _t, base=start * steps: progress(base + done, total))
                images = engine.generate(chunk, route, blend, encoded=encoded.take([0] * len(chunk)), route_info=info, progress=tick)
                for req, image in zip(chunk, images):  # numbered when written: another run may share the folder
                    paths.append(save_next_png(image, out_dir, req.seed, after=paths[-1] if paths else None))
    label = images[0].info["mixdiff"]["blend"]
    return Generated(paths=paths, seeds=seeds, route=info.decision or {}, blend=label)


def _replayed(cat: Catalog, opts: GenerationOptions, from_image: str | Path | None,
              warn: Callable[[str], None] | None) -> tuple[tuple[Member, ...], str | None, dict[str, Any]]:
    """The experts, blend and recorded values to use: the options', else those `from_image` records."""
    from mixdiff_cli.sampling.pngmeta import read_record, replay

    members, blend = opts.experts, opts.blend
    if from_image is None:
        return members, blend, {}
    record = read_record(from_image)
    recorded, chosen, recorded_blend = replay(record)
    _check_replay(cat, record, warn)
    if not members:
        members = parse_members(chosen)
        blend = blend or recorded_blend
        if not members:
            recorded["abstain"] = True
    return members, blend, recorded


def _requests(prompt: str, opts: GenerationOptions, recorded: dict[str, Any]) -> list[Request]:
    """One request per image (seeds seed, seed+1, ...): each option, else the recorded value, else the default."""
    negative = opts.negative if opts.negative is not None else recorded.get("negative")
    steps = opts.steps or recorded.get("steps") or DEFAULT_STEPS
    guidance = opts.guidance if opts.guidance is not None else recorded.get("guidance")
    seed = opts.seed if opts.seed is not None else recorded.get("seed")
    width, height = opts.width or recorded.get("width"), opts.height or recorded.get("height")
    scheduler = opts.scheduler or recorded.get("scheduler") or DEFAULT_SCHEDULER
    if seed is None:
        seed = random.randint(0, MAX_SEED)
    seeds = [(seed + i) % (MAX_SEED + 1) for i in range(opts.num_images)]
    return [Request(prompt, negative, s, steps, guidance, width, height, scheduler) for s in seeds]  # type: ignore[arg-type]


def _decide(engine: Engine, prompt: str, encoded: Encoded, members: tuple[Member, ...], replaying: bool,
            opts: GenerationOptions) -> tuple[Route, RouteInfo]:
    """The route: explicit experts (or a replayed record), else the catalog's router on this prompt."""
    cat = engine.catalog
    if members or replaying or not cat.experts:
        route = explicit_route(members, prompt, cat.names)
        decision = {**route.to_dict(), "source": "replay" if replaying else "explicit"}
        return route, RouteInfo(source="explicit", decision=decision)
    from mixdiff_cli.routing.router import load_router

    router = load_router(cat, opts.encoder, pipe=engine.pipe, device=str(engine.device), on_stale=opts.on_stale)
    router.warn()
    # the base text encoder's pooled vector from the pass generation reuses; other encoders embed themselves
    vec = encoded.router[0] if router.encoder_id == "base" else router.embed([prompt])[0]
    route = router.decide(vec, prompt, top_k=opts.top_k, temperature=opts.temperature, threshold=opts.threshold, abstain=opts.abstain)
    if opts.bands == "auto":
        route = spread_bands(route, catalog_bands(cat), opts.steps or DEFAULT_STEPS)
    return route, RouteInfo(source="router", decision=route.to_dict())


def _check_replay(cat: Catalog, record: dict[str, Any], warn: Callable[[str], None] | None) -> None:
    """Replaying in another catalog is allowed; say what may make the image differ."""
    notes = []
    for item in record.get("experts", []):
        expert = cat.expert(item["name"])  # a missing expert is an error
        if item.get("sha256") and expert.sha256 and item["sha256"] != expert.sha256:
            notes.append(f"expert {expert.name} changed since the image was made (sha256 {expert.sha256[:10]} != {item['sha256'][:10]})")
    base = record.get("base") or {}
    if cat.base and base.get("sha256") and cat.base.sha256 and base["sha256"] != cat.base.sha256:
        notes.append("the base model differs from the one recorded")
    if warn is not None:
        for note in notes:
            warn(f"{note}; the image may not be reproduced exactly")
