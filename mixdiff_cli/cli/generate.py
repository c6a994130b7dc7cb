"""`mixdiff generate` (route a prompt, sample the mixture, write PNGs with metadata) and `mixdiff inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from mixdiff_cli.cli._common import CatalogOpt, DeviceOpt, DtypeOpt, SeedOpt
from mixdiff_cli.cli._errors import command
from mixdiff_cli.cli._output import out
from mixdiff_cli.sampling.options import BandsMode, BlendMode, SchedulerName

SchedulerOpt = Annotated[
    Optional[SchedulerName],
    typer.Option("--scheduler", help="Sampler: ddim, euler, euler-a or dpm++ (DPM++ 2M). Default: ddim."),
]
BlendOpt = Annotated[
    Optional[BlendMode],
    typer.Option("--blend", help="How k > 1 experts combine: noise (sum of weighted noise predictions, default) or merge (LoRA weights combined, one forward)."),
]


def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt.", show_default=False)] = None,
    negative: Annotated[Optional[str], typer.Option("--negative", "-n", help="Negative prompt.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Denoising steps (default 30).")] = None,
    guidance: Annotated[Optional[float], typer.Option("--guidance", "-g", min=0.0, help="Classifier-free guidance scale (default: the catalog base's 'guidance', else the pipeline's: 7.5 SD / 5.0 SDXL).")] = None,
    seed: SeedOpt = None,
    width: Annotated[Optional[int], typer.Option("--width", "-W", help="Width in pixels, a multiple of 8 (default: the base's native size).")] = None,
    height: Annotated[Optional[int], typer.Option("--height", "-H", help="Height in pixels, a multiple of 8.")] = None,
    scheduler: SchedulerOpt = None,
    num_images: Annotated[int, typer.Option("--num-images", "-N", min=1, help="Images for the prompt (seeds SEED, SEED+1, ...).")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images sampled together.")] = 1,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Experts the router picks.")] = 1,
    temperature: Annotated[float, typer.Option("--temperature", help="Router softmax temperature (lower is sharper).")] = 1.0,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Override the router's calibrated abstention: the bare base when no expert has p >= this (0 never abstains).", show_default=False)] = None,
    abstain: Annotated[bool, typer.Option("--abstain/--no-abstain", help="--no-abstain: the router always picks an expert, even for a prompt unlike all of them.")] = True,
    blend: BlendOpt = None,
    bands: Annotated[BandsMode, typer.Option("--bands", help="auto: the router's top-k experts take consecutive parts of the sampling run (ordered by their catalog 'band', as wide as their weights), so k experts cost one. none: each expert's own band (NAME@START:END, else the catalog's), else the whole run.")] = "none",
    expert: Annotated[Optional[list[str]], typer.Option("--expert", "-e", help="NAME[:WEIGHT][@START:END]; repeatable. Overrides the router. @START:END: the fractions of the sampling run it takes (e.g. layout@:0.4 detail@0.4:).")] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("outputs"),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    max_loaded: Annotated[int, typer.Option("--max-loaded", min=1, help="Experts kept loaded (LRU).")] = 4,
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", metavar="SIZE", help="Bytes the loaded experts may take (e.g. 6GB, 512MiB): least recently used ones are unloaded first; a route whose experts alone take more is refused. Device memory on CUDA, process memory on CPU. Beside --max-loaded.")] = None,
    allow_over_memory: Annotated[bool, typer.Option("--allow-over-memory", help="Run a route whose experts alone pass --max-memory instead of refusing it.")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the UNet (LoRA hotswap keeps it compiled).")] = False,
    catalog: CatalogOpt = None,
    from_image: Annotated[Optional[Path], typer.Option("--from", help="Reproduce a PNG made by mixdiff (its recorded prompt, seed, experts, ...); other options override.")] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="Prompt file: .txt (a prompt per line, inline --seed/--steps/--expert overrides), .jsonl, .csv (header row) or .yaml (README: 'Batch prompt files').")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="With --prompts: skip images already in the output's manifest.")] = False,
    keep_going: Annotated[bool, typer.Option("--keep-going", help="With --prompts: skip failing items instead of stopping.")] = False,
    region: Annotated[Optional[list[str]], typer.Option("--region", "-r", metavar="BOX=TEXT", help="A region of the canvas with its own prompt: BOX x0:x1,y0:y1 in fractions of the canvas, TEXT a prompt routed to its own experts or pinned with inline --expert NAME[:W]; repeatable. PROMPT (may be \"\") is then the background.")] = None,
    background_weight: Annotated[float, typer.Option("--background-weight", min=0.0, help="With --region: the background PROMPT's weight against a region's 1.")] = 0.1,
    feather: Annotated[float, typer.Option("--feather", min=0.0, max=1.0, help="With --region: width of a region's soft edge, a fraction of the canvas side (0: hard edges).")] = 0.05,
    tile_overlap: Annotated[Optional[int], typer.Option("--tile-overlap", min=0, help="With --region: pixels neighbouring native-size tiles share on a larger canvas (default: a quarter of the native size).")] = None,
) -> None:
    """Generate images: the router picks the top-k experts for PROMPT, the engine blends them.

    Examples:

      mixdiff generate "a watercolor fox" --seed 1

      mixdiff generate "a fox" --expert watercolor:0.7 --expert ink:0.3 --blend merge

      mixdiff generate "a fox" -e layout@:0.4 -e detail@0.4:    (timestep bands: the cost of one expert)

      mixdiff generate --from outputs/00001-1.png

      mixdiff generate --prompts prompts.txt --out run1 --batch-size 4 --resume

      mixdiff generate "" -W 128 -r "0:0.5,0:1=a landscape" -r "0.5:1,0:1=stripes --expert stripes"    (regions)
    """
    from mixdiff_cli.core.errors import UsageError
    from mixdiff_cli.sampling.batch import BatchSettings
    from mixdiff_cli.sampling.options import GenerationOptions, parse_size

    options = GenerationOptions(
        negative=negative, steps=steps, guidance=guidance, seed=seed, width=width, height=height, scheduler=scheduler,
        num_images=num_images, batch_size=batch_size, experts=tuple(expert or ()), top_k=top_k, temperature=temperature,
        threshold=threshold, abstain=abstain, blend=blend, bands=bands, device=device, dtype=dtype, max_loaded=max_loaded,
        max_memory=None if max_memory is None else parse_size(max_memory), allow_over_memory=allow_over_memory, compile=compile,
    )
    cat_path = _catalog_for(catalog, from_image)
    if prompts is not None:
        if prompt is not None or from_image is not None:
            raise UsageError("--prompts replaces PROMPT and --from", "pass either a prompt file or one prompt")
        if region:
            raise UsageError("--region does not apply to --prompts", "pass the regions with one PROMPT instead of a prompt file")
        _batch(cat_path, prompts, out_dir, options, BatchSettings(resume=resume, keep_going=keep_going))
        return
    if resume or keep_going:
        raise UsageError("--resume and --keep-going apply to --prompts", "add --prompts FILE or drop them")
    if region:  # the boxes and canvas settings, checked before anything heavy is imported
        from mixdiff_cli.sampling.regions import CanvasOptions, parse_regions

        parse_regions(region)
        CanvasOptions(background_weight=background_weight, feather=feather, tile_overlap=tile_overlap).check()
    options.check()
    if region or (from_image is not None and _has_regions(from_image)):
        _canvas(cat_path, prompt, region or (), options, out_dir, from_image, (background_weight, feather, tile_overlap))
        return
    if prompt is None and from_image is None:
        raise UsageError("no prompt given", "pass a PROMPT, --from IMAGE.png or --prompts FILE")

    from mixdiff_cli.core.quiet import quiet_frameworks
    from mixdiff_cli.sampling.generate import generate_images

    with quiet_frameworks(), _progress() as tick:
        result = generate_images(cat_path, prompt, options, out_dir=out_dir, from_image=from_image, progress=tick, warn=out.warn)
    chosen = result.route.get("chosen") or []
    out.info("experts: " + (", ".join(f"{c['expert']} ({c['weight']:.2f})" for c in chosen) or "none (bare base)") + f"; blend: {result.blend}")
    from mixdiff_cli.routing.route import explanations

    for line in explanations(result.route):
        out.info(escape(line))
    out.result("\n".join(str(p) for p in result.paths), result.to_dict())


def _catalog_for(catalog: Path | None, from_image: Path | None) -> Path:
    """--catalog, else $MIXDIFF_CATALOG, else (for --from) the catalog recorded in the image, else discovery."""
    import os

    from mixdiff_cli.catalog.discovery import find_catalog

    if catalog is None and from_image is not None and not os.environ.get("MIXDIFF_CATALOG"):
        from mixdiff_cli.sampling.pngmeta import read_record

        recorded = Path((read_record(from_image).get("catalog") or {}).get("path") or "")
        if recorded.name and recorded.is_file():
            return recorded
    return find_catalog(catalog)


def _has_regions(image: Path) -> bool:
    from mixdiff_cli.sampling.pngmeta import read_record

    return bool(read_record(image).get("regions"))


def _canvas(cat_path: Path, prompt: str | None, regions: Any, options: Any, out_dir: Path, from_image: Path | None,
            settings: tuple[float, float, int | None]) -> None:
    """`--region BOX=TEXT`: mixdiff_cli.sampling.canvas.generate_canvas does the work."""
    from mixdiff_cli.core.quiet import quiet_frameworks
    from mixdiff_cli.sampling.canvas import generate_canvas
    from mixdiff_cli.sampling.regions import CanvasOptions

    canvas = CanvasOptions(background_weight=settings[0], feather=settings[1], tile_overlap=settings[2])
    with quiet_frameworks(), _progress() as tick:
        result = generate_canvas(cat_path, prompt, regions, options, canvas, out_dir=out_dir, from_image=from_image, progress=tick)
    chosen = lambda route: ", ".join(f"{c['expert']} ({c['weight']:.2f})" for c in route["chosen"] or []) or "none (bare base)"  # noqa: E731
    if "background" in result.route:
        out.info(f"background: {chosen(result.route['background'])}")
    for r in result.route["regions"]:
        out.info(f"{r['name']} {r['box']}: {chosen(r)}")
    out.result("\n".join(str(p) for p in result.paths), result.to_dict())


def _batch(cat_path: Path, prompts: Path, out_dir: Path, options: Any, settings: Any) -> None:
    """`--prompts FILE`: mixdiff_cli.sampling.batch.run_batch does the work."""
    from mixdiff_cli.core.quiet import quiet_frameworks
    from mixdiff_cli.sampling.batch import read_inputs, run_batch

    read_inputs(cat_path, prompts, options, settings)  # a bad item fails here, before the frameworks import
    with quiet_frameworks(), _progress("images") as tick:
        on_image = None if tick is None else (lambda record, done, total: tick(done, total))
        result = run_batch(cat_path, prompts, out_dir, options, settings, on_image=on_image)
    for line in result.errors:
        out.warn(line)
    out.result(f"{result.written} written, {result.skipped} skipped, {result.failed} failed -> {result.manifest}", result.to_dict())
    if result.interrupted is not None:
        left = max(0, result.total - result.written - result.skipped - result.failed)
        out.warn(f"interrupted: {left} left; rerun the same command with --resume to finish")
    if result.exit_code:
        raise typer.Exit(result.exit_code)


class _progress:
    """A rich progress bar on stderr in human mode; yields a `tick(done, total)` callable (or None)."""

    def __init__(self, unit: str = "steps") -> None:
        self.unit = unit  # what the bar counts: sampling steps, or images of a batch

    def __enter__(self):
        if out.mode != "human":
            self._bar = None
            return None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        import sys

        self._bar = Progress(TextColumn(f"sampling ({self.unit})"), BarColumn(), MofNCompleteColumn(), TextColumn("left"),
                             TimeRemainingColumn(), console=Console(file=sys.stderr), transient=True)
        self._bar.start()
        self._task = self._bar.add_task("sampling", total=None)

        def tick(done: int, total: int) -> None:
            self._bar.update(self._task, completed=done, total=total)

        return tick

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()


def inspect(
    image: Annotated[Path, typer.Argument(help="A PNG written by mixdiff.", show_default=False)],
) -> None:
    """Show the metadata of a generated PNG: A1111 parameters and the mixdiff route record.

    Example: mixdiff inspect outputs/00001-42.png --json
    """
    from mixdiff_cli.sampling.pngmeta import MetadataError, read_png

    meta = read_png(image)
    if meta.parameters is None and meta.record is None:
        raise MetadataError(f"{image} has no generation metadata", "pass a PNG written by 'mixdiff generate'")
    if out.json:
        out.data(meta.to_dict())
        return
    if meta.parameters:
        out.result(meta.parameters)
    rec = meta.record
    if rec:
        experts = ", ".join(
            f"{e['name']} ({e['weight']:.3g}" + (f" over {e['band'][0]:g}-{e['band'][1]:g} of the run)" if e.get("band") else ")")
            for e in rec.get("experts", [])
        ) or "none (bare base)"
        out.data({
            "experts": experts,
            "blend": rec.get("blend"),
            "route": (rec.get("route") or {}).get("source"),
            "scheduler": rec.get("scheduler"),
            **({"regions": "; ".join(f"{r['box']}={r['prompt']} (" + (", ".join(f"{e['name']} {e['weight']:.3g}" for e in r["experts"]) or "bare base") + ")"
                                     for r in rec["regions"])} if rec.get("regions") else {}),
            "catalog": (rec.get("catalog") or {}).get("hash", "")[:16],
            "base": (rec.get("base") or {}).get("source"),
            "device": f"{rec.get('device')} {rec.get('dtype')}",
            "versions": ", ".join(f"{k} {v}" for k, v in (rec.get("versions") or {}).items()),
        })


def register(app: typer.Typer) -> None:
    command(app, "generate")(generate)
    command(app, "inspect")(inspect)
