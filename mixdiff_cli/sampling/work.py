"""A batch's work: the prompt file's valid items, each with its request and route, grouped by route."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mixdiff_cli.catalog.model import Catalog
from mixdiff_cli.core.errors import ExpertNotFound, UsageError
from mixdiff_cli.routing.route import catalog_bands, check_known, explicit_route, parse_members, spread_bands
from mixdiff_cli.sampling.options import DEFAULT_SCHEDULER, DEFAULT_STEPS, MAX_SEED, GenerationOptions
from mixdiff_cli.sampling.prompts import PromptFileError, PromptItem
from mixdiff_cli.sampling.regions import check_regions, parse_regions

if TYPE_CHECKING:
    from mixdiff_cli.routing.route import Route
    from mixdiff_cli.routing.router import Router
    from mixdiff_cli.sampling.engine import Engine, Request


@dataclass
class Work:
    """One item ready to run: its request and its route (with what the image metadata records of it)."""

    item: PromptItem
    request: Request
    route: Route
    info: Any  # engine.RouteInfo

    @property
    def key(self) -> tuple:
        """The route; an item with regions runs alone ('~' is outside the expert-name grammar)."""
        return self.route.key + ((("~regions", str(self.item.index)),) if self.item.regions else ())


def valid_items(cat: Catalog, parsed: Any) -> tuple[list[PromptItem], list[PromptFileError]]:
    """The parsed items whose experts exist, and one error per bad item (in line order)."""
    errors: list[PromptFileError] = list(parsed.errors)
    items: list[PromptItem] = []
    for item in parsed.items:
        try:
            check_known(parse_members(item.experts), cat.names)
            check_regions(parse_regions(item.regions), cat.names)
        except (ExpertNotFound, UsageError) as exc:
            errors.append(PromptFileError(f"{parsed.path}:{item.line}: {exc.message}", exc.hint, line=item.line))
        else:
            items.append(item)
    errors.sort(key=lambda e: e.line or 0)
    return items, errors


def plan(items: list[PromptItem], opts: GenerationOptions, seed: int, engine: Engine, router: Router | None) -> list[Work]:
    """Each item's request and route: its --expert overrides, else the router (one encoder pass for all)."""
    from mixdiff_cli.sampling.engine import Request, RouteInfo

    cat = engine.catalog
    routes: dict[int, Any] = {}
    need_router = [it for it in items if not (it.experts or opts.experts or it.regions)]  # a canvas routes its own prompts
    if need_router and cat.experts:
        if router is None:
            from mixdiff_cli.routing.router import load_router

            router = load_router(cat, opts.encoder, pipe=engine.pipe, device=str(engine.device), on_stale=opts.on_stale)
            router.warn()
        vecs = router.embed([it.prompt for it in need_router])
        for it, vec in zip(need_router, vecs):
            route = router.decide(vec, it.prompt, top_k=opts.top_k, temperature=opts.temperature, threshold=opts.threshold, abstain=opts.abstain)
            if opts.bands == "auto":
                route = spread_bands(route, catalog_bands(cat), it.steps or opts.steps or DEFAULT_STEPS)
            routes[it.index] = (route, RouteInfo(source="router", decision=route.to_dict()))
    work = []
    for it in items:
        if it.index not in routes:  # overrides, or a catalog without experts (the bare base)
            route = explicit_route(parse_members(it.experts) or opts.experts, it.prompt)
            routes[it.index] = (route, RouteInfo(source="explicit", decision=route.to_dict()))
        request = Request(
            prompt=it.prompt,
            negative=it.negative if it.negative is not None else opts.negative,
            seed=it.seed if it.seed is not None else (seed + it.index) % (MAX_SEED + 1),
            steps=it.steps or opts.steps or DEFAULT_STEPS,
            guidance=it.guidance if it.guidance is not None else opts.guidance,
            width=it.width or opts.width,
            height=it.height or opts.height,
            scheduler=it.scheduler or opts.scheduler or DEFAULT_SCHEDULER,
        )
        work.append(Work(it, request, *routes[it.index]))
    return work


def groups(work: list[Work]) -> list[list[Work]]:
    """Items under the same route (experts and weights), in item order; groups sharing an expert set
    are adjacent (sorted by expert names), so a set stays loaded across its groups."""
    out: dict[tuple, list[Work]] = {}
    for w in work:
        out.setdefault(w.key, []).append(w)
    return sorted(out.values(), key=lambda g: (sorted(n for n, _ in g[0].route.chosen), g[0].key))
