"""`evaluate_samples`: each prompt rendered with the routed mixture, the bare base and each single expert
(or a swept boundary between two experts) at fixed seeds, as a contact sheet, optionally CLIP-scored."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixdiff_cli.core.errors import UsageError
from mixdiff_cli.evaluation.inputs import file_example
from mixdiff_cli.evaluation.markdown import route_label, samples_markdown
from mixdiff_cli.evaluation.metrics import BASE_LABEL
from mixdiff_cli.evaluation.report import EvaluateError, Report, report_header

if TYPE_CHECKING:
    from PIL import Image

    from mixdiff_cli.catalog.model import Catalog
    from mixdiff_cli.sampling.options import GenerationOptions


def clip_scores(clip_dir: str | Path, images: Sequence[Image.Image], prompts: Sequence[str], device: str | None = None) -> list[float]:
    """CLIPScore of each (image, prompt): 100 * max(cos(image embedding, text embedding), 0), as
    torchmetrics' `CLIPScore` (Hessel et al. 2021, with w = 100). The model folder is read locally only."""
    import torch

    model, tokenizer, processor, dev = _load_clip(Path(clip_dir).expanduser(), device)
    max_len = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
    scores: list[float] = []
    with torch.no_grad():
        for i in range(0, len(images), 16):
            ims = [im.convert("RGB") for im in images[i : i + 16]]
            pixels = processor(images=ims, return_tensors="pt")["pixel_values"].to(dev)
            tokens = tokenizer(list(prompts[i : i + 16]), padding=True, truncation=True, max_length=max_len, return_tensors="pt").to(dev)
            img = model.get_image_features(pixel_values=pixels)
            txt = model.get_text_features(**tokens)
            img = getattr(img, "pooler_output", img)
            txt = getattr(txt, "pooler_output", txt)
            cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)  # (B,)
            scores.extend((100 * cos.clamp(min=0)).tolist())
    return scores


def _load_clip(folder: Path, device: str | None) -> tuple[Any, Any, Any, Any]:
    """The CLIP model (eval mode), tokenizer and image processor saved in `folder`, and the device it is on."""
    from mixdiff_cli.core.runtime import pick_device

    if not folder.is_dir():
        raise EvaluateError(f"CLIP model folder {folder} does not exist", "pass --clip with a local CLIPModel folder (config.json, weights, tokenizer, preprocessor_config.json)")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise EvaluateError(f"{folder} has no readable config.json", "pass a folder written by CLIPModel.save_pretrained") from None
    if config.get("model_type") != "clip":
        raise EvaluateError(f"{folder} holds a {config.get('model_type')!r} model, not CLIP", "pass a CLIPModel folder, e.g. openai/clip-vit-base-patch32 downloaded once")
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    dev = pick_device(device)
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).to(dev).eval()
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise EvaluateError(f"could not load the CLIP model in {folder}: {str(exc).splitlines()[0]}",
                            "it needs config.json, model.safetensors, vocab.json, merges.txt and preprocessor_config.json") from None
    return model, tokenizer, processor, dev


def _diff(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute pixel difference in [0, 1]."""
    import numpy as np

    x = np.asarray(a.convert("RGB"), dtype=np.float32)
    y = np.asarray(b.convert("RGB"), dtype=np.float32)
    return float(np.abs(x - y).mean() / 255.0) if x.shape == y.shape else float("nan")


@dataclass(frozen=True)
class Sweep:
    """A boundary swept between two experts: `first` takes the run before each boundary, `second` after."""

    first: str
    second: str
    boundaries: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)

    def routes(self) -> dict[str, list[str]]:
        """Column label -> route (`NAME@START:END` members); 0 and 1 are the second and first alone."""
        out: dict[str, list[str]] = {}
        for b in self.boundaries:
            if not 0.0 <= b <= 1.0:
                raise UsageError(f"sweep boundary {b:g} is outside 0..1", "pass boundaries such as 0,0.2,0.4,0.6,0.8,1")
            route = [self.second] if b == 0 else [self.first] if b == 1 else [f"{self.first}@:{b:g}", f"{self.second}@{b:g}:"]
            out[f"{self.first} -> {self.second} at {b:g}"] = route
        return out


@dataclass
class _Grid:
    """What was rendered: column labels in order, column -> one image per prompt, and the router's routes."""

    columns: list[str]
    images: dict[str, list[Any]]
    routes: list[Any]


def evaluate_samples(
    catalog: Catalog | str | Path,
    prompts: str | Path | Sequence[str],
    options: GenerationOptions | None = None,
    *,
    routed: bool = True,
    clip: str | Path | None = None,
    sweep: Sweep | None = None,
) -> Report:
    """Render each prompt with the routed mixture, the bare base and each single expert (the same seed
    in every column: the file's, else `seed + index`) into a contact sheet; CLIP scores when `clip`
    is a local CLIP model folder. `prompts`: a prompt file (as `mixdiff generate --prompts` reads; its
    per-line expert overrides are ignored, since each column fixes its experts) or a list of prompts.
    `options`: steps (default 20), seed (default 0), top-k (default 2), blend and the rest; its experts,
    when given, are the single-expert columns (default: every expert). `sweep`: instead of the routed and
    single-expert columns, one column per boundary b: `first` over the run before b, `second` after it."""
    from mixdiff_cli.catalog.schema import load_catalog
    from mixdiff_cli.sampling.engine import Engine
    from mixdiff_cli.sampling.options import GenerationOptions

    cat = catalog if not isinstance(catalog, (str, Path)) else load_catalog(catalog)
    opts = options or GenerationOptions(top_k=2)
    seed, steps, scheduler = opts.seed if opts.seed is not None else 0, opts.steps or 20, opts.scheduler or "ddim"
    opts.check()
    items = _prompt_items(prompts)
    names = [m.expert for m in opts.experts] or cat.names
    for name in names:
        cat.expert(name)
    if clip is not None and not Path(clip).expanduser().is_dir():
        raise EvaluateError(f"CLIP model folder {clip} does not exist", "pass --clip with a local CLIPModel folder, or leave it out")
    routed = routed and bool(cat.experts)
    engine = Engine(cat, device=opts.device, dtype=opts.dtype)
    guidance = engine.default_guidance() if opts.guidance is None else opts.guidance
    requests = _requests(items, opts, seed, steps, scheduler, guidance)
    grid = _render(engine, requests, opts, routed, sweep, names)
    texts, n = [r.prompt for r in requests], len(requests)
    scores: dict[str, list[float]] | None = None
    if clip is not None:
        flat = [grid.images[c][i] for c in grid.columns for i in range(n)]
        values = clip_scores(clip, flat, [texts[i] for _ in grid.columns for i in range(n)], device=opts.device)
        scores = {c: values[k * n : (k + 1) * n] for k, c in enumerate(grid.columns)}
    rows, images = _sample_rows(requests, grid, scores)
    first = grid.images[BASE_LABEL][0]
    settings = {"prompts": str(prompts) if isinstance(prompts, (str, Path)) else None, "steps": steps, "guidance": guidance,
                "scheduler": scheduler, "width": first.width, "height": first.height, "experts": names,
                "routed": routed, "top_k": opts.top_k if routed else None, "threshold": opts.threshold if routed else None,
                "temperature": opts.temperature if routed else None, "blend": opts.blend or "noise",
                "clip": str(clip) if clip else None, "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
                "sweep": None if sweep is None else {"first": sweep.first, "second": sweep.second, "boundaries": list(sweep.boundaries)}}
    data = report_header("samples", cat, settings, {"base_seed": seed, "per_prompt": [r["seed"] for r in rows]})
    data["samples"] = rows
    data["summary"] = _summary(rows, grid.columns, scores)
    data["gates"] = []
    title = f"Samples: {steps} steps, guidance {guidance:g}, {scheduler}" + (f"; CLIP score from {Path(clip).name}" if clip else "")
    return Report("samples", data, samples_markdown(data), {"contact_sheet.png": _sheet(grid, rows, title)}, images)


def _prompt_items(prompts: str | Path | Sequence[str]) -> list[Any]:
    """The prompt file's items, or one item per given prompt."""
    from mixdiff_cli.sampling.prompts import PromptItem, load_prompts

    if isinstance(prompts, (str, Path)):
        items = load_prompts(prompts)
    else:
        items = [PromptItem(index=i, line=i + 1, prompt=p) for i, p in enumerate(prompts)]
    if not items:
        raise EvaluateError("no prompts", file_example(("prompt",)))
    return items


def _requests(items: Sequence[Any], opts: GenerationOptions, seed: int, steps: int, scheduler: str, guidance: float) -> list[Any]:
    """One engine request per prompt item: the item's own settings, else the options' (seed: `seed + index`)."""
    from mixdiff_cli.sampling.engine import Request

    return [
        Request(it.prompt, negative=it.negative, seed=it.seed if it.seed is not None else seed + it.index,
                steps=it.steps or steps, guidance=guidance if it.guidance is None else it.guidance,
                width=it.width or opts.width, height=it.height or opts.height, scheduler=it.scheduler or scheduler)  # type: ignore[arg-type]
        for it in items
    ]


def _render(engine: Any, requests: Sequence[Any], opts: GenerationOptions, routed: bool, sweep: Sweep | None, names: Sequence[str]) -> _Grid:
    """The routed column (when `routed`), the base column, then one column per sweep boundary, else per expert in `names`."""
    from mixdiff_cli.sampling.engine import RouteInfo

    cat, n, blend = engine.catalog, len(requests), opts.blend
    texts = [r.prompt for r in requests]
    encoded = engine.encode(texts, [r.negative for r in requests])
    grid = _Grid([], {}, [])
    if routed:
        from mixdiff_cli.routing.router import load_router

        router = load_router(cat, pipe=engine.pipe, device=opts.device)
        grid.routes = router.route(texts, top_k=min(opts.top_k, len(cat.names)), temperature=opts.temperature, threshold=opts.threshold, abstain=opts.abstain)
        grid.columns.append("routed")
        grid.images["routed"] = [None] * n
        groups: dict[tuple, list[int]] = {}
        for i, route in enumerate(grid.routes):
            # the router rounds weights to 4 digits: a tiny second expert can come back as 0.0, which
            # the engine refuses; it contributes nothing, so leave it out
            groups.setdefault(tuple((e, w) for e, w in route.key if w > 0), []).append(i)
        for key, idx in groups.items():
            images = engine.generate([requests[i] for i in idx], list(key), blend, encoded=encoded.take(idx),  # type: ignore[arg-type]
                                     route_info=RouteInfo("router", grid.routes[idx[0]].to_dict()))
            for i, image in zip(idx, images):
                grid.images["routed"][i] = image
    grid.columns.append(BASE_LABEL)
    grid.images[BASE_LABEL] = engine.generate(requests, [], blend, encoded=encoded)  # type: ignore[arg-type]
    fixed = sweep.routes() if sweep is not None else {name: [name] for name in names}
    for label, route in fixed.items():
        grid.columns.append(label)
        grid.images[label] = engine.generate(requests, route, blend, encoded=encoded)  # type: ignore[arg-type]
    return grid


def _sample_rows(requests: Sequence[Any], grid: _Grid, scores: Mapping[str, list[float]] | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """report.json's row per prompt (seed, route, image paths, change from the base, CLIP scores), and
    relative path -> image."""
    rows: list[dict[str, Any]] = []
    images: dict[str, Any] = {}
    base = grid.images[BASE_LABEL]
    for i, req in enumerate(requests):
        row: dict[str, Any] = {"prompt": req.prompt, "negative": req.negative, "seed": base[i].info["mixdiff"]["seed"],
                               "images": {}, "delta_from_base": {}}
        if grid.routes:
            route = grid.routes[i]
            row["route"] = {"chosen": [[e, w] for e, w in route.chosen], "probs": route.probs, "reasons": route.reasons}
        for c in grid.columns:
            rel = f"samples/{i:03d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', c)}.png"
            images[rel] = grid.images[c][i]
            row["images"][c] = rel
            if c != BASE_LABEL:
                row["delta_from_base"][c] = _diff(grid.images[c][i], base[i])
        if scores is not None:
            row["clip_score"] = {c: scores[c][i] for c in grid.columns}
        rows.append(row)
    return rows, images


def _summary(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], scores: Mapping[str, list[float]] | None) -> dict[str, Any]:
    """Columns, each column's mean change from the base, and its mean CLIP score and the best column."""
    n = len(rows)
    summary: dict[str, Any] = {
        "columns": columns,
        "delta_from_base": {c: math.fsum(r["delta_from_base"][c] for r in rows) / n for c in columns if c != BASE_LABEL},
    }
    if scores is not None:
        summary["clip_score"] = {c: math.fsum(scores[c]) / n for c in columns}
        summary["clip_best"] = max(columns, key=lambda c: summary["clip_score"][c])
    return summary


def _sheet(grid: _Grid, rows: Sequence[Mapping[str, Any]], title: str) -> Image.Image:
    """The contact sheet: one row per prompt, one column per rendering, route and CLIP captions."""
    from mixdiff_cli.evaluation.figures import contact_sheet

    columns = grid.columns
    return contact_sheet(
        [[grid.images[c][i] for c in columns] for i in range(len(rows))],
        [f"{i}. {r['prompt']} (seed {r['seed']})" for i, r in enumerate(rows)],
        columns, captions=[[_sample_caption(c, r) for c in columns] for r in rows], title=title,
    )


def _sample_caption(column: str, row: Mapping[str, Any]) -> str:
    lines = []
    if column == "routed" and "route" in row:
        lines.append(route_label([(n, float(w)) for n, w in row["route"]["chosen"]]))
    if "clip_score" in row:
        lines.append(f"CLIP {row['clip_score'][column]:.1f}")
    return "\n".join(lines)
