"""`mixdiff evaluate routing|experts|samples`: reports (report.json, report.md, PNG figures) on a catalog."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from mixdiff_cli.cli._common import CatalogOpt, DeviceOpt, DtypeOpt, StepsOpt
from mixdiff_cli.cli._errors import command
from mixdiff_cli.cli._output import out
from rich.markup import escape
from mixdiff_cli.sampling.options import BlendMode

if TYPE_CHECKING:
    from mixdiff_cli.evaluation.report import Report

evaluate_app = typer.Typer(
    rich_markup_mode=None,
    help="Measure the router, the experts' specialisation and the mixture's samples. Each command writes "
    "report.json, report.md and PNG figures into --out and exits 1 when a --min-accuracy / --max-loss-ratio gate fails.",
    no_args_is_help=True,
)

ExpertsOpt = Annotated[Optional[list[str]], typer.Option("--expert", "-e", help="Only this expert (repeatable; default: all).")]
TopKOpt = Annotated[int, typer.Option("--top-k", "-k", help="Experts per prompt.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", help="Softmax temperature of the router (lower is sharper).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Report folder: report.json, report.md and figures.")]


def _finish(report: Report, out_dir: Path, rows: list[dict[str, Any]], columns: list[str], title: str, lines: list[str]) -> None:
    """Write the report, render its summary (or the JSON report), then enforce its gates."""
    from mixdiff_cli.evaluation.report import write_report

    written = write_report(report, out_dir)
    if out.json:
        out.data(report.data)
    elif out.mode == "quiet":
        out.result(str(written["report.md"]))
    else:
        out.table(rows, columns, title=title)
        for line in lines:
            out.info(line)
        for gate in report.data.get("gates", []):
            out.info(f"gate {gate['name']}: {'[green]pass[/green]' if gate['passed'] else '[red]FAIL[/red]'} ({gate['detail']})")
        figures = ", ".join(sorted(report.figures))
        out.info(f"wrote {escape(str(out_dir))}/: report.md, report.json, {figures}" + (f" and {len(report.images)} samples" if report.images else ""))
    report.check()


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _abstention_line(ab: dict) -> str:
    inside = ab["in_world"]
    line = (f"abstention (fit threshold {ab['fit_threshold']:g}): " if ab["fit_threshold"] is not None else "abstention: ")
    line += f"{inside['abstained']} of {inside['n']} labelled prompts went to the bare base ({_pct(inside['rate'])})"
    if "outside" in ab:
        o = ab["outside"]
        line += (f"; --outside: {o['abstained']} of {o['n']} abstained (recall {_pct(o['recall'])}), "
                 f"precision {_pct(ab['precision']) if ab['precision'] is not None else '-'}")
    return line


def routing(
    prompts: Annotated[Path, typer.Option("--prompts", "-p", help='Labelled prompts: .jsonl lines {"prompt": ..., "expert": ...} or .csv with the header prompt,expert.', show_default=False)],
    catalog: CatalogOpt = None,
    out_dir: OutOpt = Path("eval/routing"),
    top_k: TopKOpt = 2,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Override the router's calibrated abstention, as generate --threshold (experts below it are not chosen), and the calibration's confidence split (else 0.5).", show_default=False)] = None,
    abstain: Annotated[bool, typer.Option("--abstain/--no-abstain", help="--no-abstain: route every prompt to an expert, as generate --no-abstain.")] = True,
    outside: Annotated[Optional[Path], typer.Option("--outside", help="Prompts no expert is for (.txt, one per line, or .jsonl with 'prompt'): reports how many abstain (recall) and how many abstentions they are (precision).", show_default=False)] = None,
    temperature: TemperatureOpt = 1.0,
    encoder: Annotated[Optional[str], typer.Option("--encoder", help="Prompt encoder: base, minilm or words (default: the router checkpoint's).")] = None,
    bins: Annotated[int, typer.Option("--bins", min=1, help="Confidence bins of the reliability table.")] = 5,
    min_accuracy: Annotated[Optional[float], typer.Option("--min-accuracy", help="Exit 1 when top-1 accuracy is below this (0-1).")] = None,
    device: DeviceOpt = None,
) -> None:
    """Routing accuracy on labelled prompts: top-1/top-k, precision/recall, confusion, usage, calibration.

    Example: mixdiff evaluate routing --prompts heldout.jsonl --min-accuracy 0.8 -o eval/routing
    """
    from mixdiff_cli.catalog.discovery import find_catalog
    from mixdiff_cli.catalog.schema import load_catalog
    from mixdiff_cli.evaluation.routing import RoutingSettings, evaluate_routing
    from mixdiff_cli.core.quiet import quiet_frameworks

    with quiet_frameworks():
        report = evaluate_routing(
            load_catalog(find_catalog(catalog)), prompts,
            RoutingSettings(top_k=top_k, threshold=threshold, abstain=abstain, temperature=temperature, encoder=encoder, bins=bins,
                            device=device, min_accuracy=min_accuracy),
            outside=outside,
        )
    m = report.data["metrics"]
    head = m["headline"]
    shown = list(m["per_expert"].items())
    if len(shown) > 30:  # a library: the experts routed worst (report.md and report.json have the rest)
        shown = sorted(((e, p) for e, p in shown if p["support"]), key=lambda ep: (ep[1]["recall"], -ep[1]["support"]))[:20]
    rows = [
        {"expert": e, "support": p["support"], "routed": p["predicted"], "precision": _num(p["precision"]),
         "recall": _num(p["recall"]), "f1": _num(p["f1"]), "top-1 share": _pct(m["usage"]["top1"][e])}
        for e, p in shown
    ]
    cal = m["calibration"]
    lines = [
        f"[bold]top-1 {_pct(head['top1_accuracy'])}[/bold], top-{m['top_k']} {_pct(head['topk_accuracy'])} on {m['n']} prompts over "
        f"{len(m['experts'])} experts (the route generate would use; the gate alone: top-1 {_pct(m['top1_accuracy'])}, "
        f"top-{m['top_k']} {_pct(m['topk_accuracy'])}); balance {m['usage']['balance']:.2f} (1 = even use)",
        f"calibration: {cal['confident']['n']} prompts with p >= {cal['threshold']:g} ({_pct(cal['confident']['accuracy'])} right), "
        f"{cal['below_threshold']} below ({_pct(cal['unconfident']['accuracy'])} right); ECE {cal['ece']:.3f}",
        _abstention_line(m["abstention"]),
    ]
    title = "routing" if len(shown) == len(m["per_expert"]) else f"routing: the {len(shown)} experts routed worst of {len(m['per_expert'])}"
    _finish(report, out_dir, rows, ["expert", "support", "routed", "precision", "recall", "f1", "top-1 share"], title, lines)


def experts(
    data: Annotated[list[str], typer.Option("--data", "-d", help="NAME=DIR: a held-out captioned image folder (repeatable). Name it after the expert it belongs to.", show_default=False)],
    catalog: CatalogOpt = None,
    expert: ExpertsOpt = None,
    out_dir: OutOpt = Path("eval/experts"),
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="UNet batch (does not change the numbers).")] = 16,
    evals: Annotated[Optional[int], typer.Option("--evals", min=1, help="(image, timestep) pairs per domain (default 64, as fine-tune's validation).")] = None,
    max_images: Annotated[Optional[int], typer.Option("--max-images", min=1, help="Use at most this many images per domain.")] = None,
    max_loss_ratio: Annotated[Optional[float], typer.Option("--max-loss-ratio", help="Exit 1 unless every expert's loss on its own domain is at most this times the base's.")] = None,
    device: DeviceOpt = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32, float16 or bfloat16.")] = "float32",
) -> None:
    """Held-out denoising loss of the base and each expert on each domain: does each expert specialise?

    The noise and timesteps are fine-tune's fixed validation draws, so the matrix is the same run to run.

    Example: mixdiff evaluate experts --data stripes=heldout/stripes --data shapes=heldout/shapes --max-loss-ratio 0.95
    """
    from mixdiff_cli.catalog.discovery import find_catalog
    from mixdiff_cli.catalog.schema import load_catalog
    from mixdiff_cli.evaluation.experts import ExpertsSettings, evaluate_experts
    from mixdiff_cli.evaluation.inputs import parse_data_specs
    from mixdiff_cli.evaluation.metrics import BASE_LABEL
    from mixdiff_cli.core.quiet import quiet_frameworks

    domains = parse_data_specs(data)
    with quiet_frameworks():
        report = evaluate_experts(
            load_catalog(find_catalog(catalog)), domains,
            ExpertsSettings(experts=expert, batch_size=batch_size, evals=evals, max_images=max_images, device=device, dtype=dtype,
                            max_loss_ratio=max_loss_ratio),
        )
    base, losses = report.data["losses"][BASE_LABEL], report.data["losses"]["experts"]
    m = report.data["metrics"]
    rows = [{"model": BASE_LABEL, **{d: f"{base[d]:.4f}" for d in domains}, "best domain": "", "specialised": ""}]
    for e, row in losses.items():
        p = m["per_expert"][e]
        rows.append({"model": e, **{d: f"{row[d]:.4f} (x{m['ratios'][e][d]:.3f})" for d in domains}, "best domain": p["best_domain"],
                     "specialised": "-" if p["specialised"] is None else ("yes" if p["specialised"] else "no")})
    s = m["summary"]
    lines = [f"{s['specialised']}/{s['with_own_domain']} experts do best (relative to the base) on their own domain, "
             f"{s['own_best_on_domain']}/{s['with_own_domain']} beat every other expert there; worst own-domain loss ratio "
             f"{_num(s['worst_own_ratio'])}"]
    _finish(report, out_dir, rows, ["model", *domains, "best domain", "specialised"], "held-out denoising loss (x ratio to base)", lines)


def _sweep(spec: str | None, boundaries: str) -> Any:
    """--sweep FIRST:SECOND --boundaries 0,0.5,1 -> a Sweep (None without --sweep)."""
    if spec is None:
        return None
    from mixdiff_cli.core.errors import UsageError
    from mixdiff_cli.evaluation.samples import Sweep

    first, sep, second = spec.partition(":")
    try:
        bounds = tuple(float(b) for b in boundaries.split(",") if b.strip())
    except ValueError:
        bounds = ()
    if not (sep and first and second) or not bounds:
        raise UsageError(f"bad --sweep {spec!r} / --boundaries {boundaries!r}", "write e.g. --sweep layout:detail --boundaries 0,0.2,0.4,0.6,0.8,1")
    return Sweep(first, second, bounds)


def samples(
    prompts: Annotated[Path, typer.Option("--prompts", "-p", help="Prompt file (.txt, .jsonl, .csv, .yaml, as for generate).", show_default=False)],
    catalog: CatalogOpt = None,
    expert: ExpertsOpt = None,
    out_dir: OutOpt = Path("eval/samples"),
    seed: Annotated[int, typer.Option("--seed", help="Prompt i uses seed SEED+i in every column (unless the file sets one).")] = 0,
    steps: StepsOpt = 20,
    guidance: Annotated[Optional[float], typer.Option("--guidance", "-g", help="Classifier-free guidance scale (default: the catalog base's 'guidance', else the pipeline's).")] = None,
    scheduler: Annotated[str, typer.Option("--scheduler", help="ddim, euler, euler-a or dpm++.")] = "ddim",
    width: Annotated[Optional[int], typer.Option("--width", "-W", help="Image width (default: the base's).")] = None,
    height: Annotated[Optional[int], typer.Option("--height", "-H", help="Image height (default: the base's).")] = None,
    routed: Annotated[bool, typer.Option("--routed/--no-routed", help="Include the routed-mixture column.")] = True,
    top_k: TopKOpt = 2,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Router threshold for the routed column (default: the router's calibrated abstention).", show_default=False)] = None,
    temperature: TemperatureOpt = 1.0,
    blend: Annotated[Optional[BlendMode], typer.Option("--blend", help="How the routed experts mix: noise or merge.")] = None,
    clip: Annotated[Optional[Path], typer.Option("--clip", help="A local CLIP model folder: adds CLIP scores (never downloads).")] = None,
    sweep: Annotated[Optional[str], typer.Option("--sweep", help="FIRST:SECOND: sweep a timestep-band boundary between two experts (FIRST before it, SECOND after), one column per --boundaries value, instead of the routed and single-expert columns.")] = None,
    boundaries: Annotated[str, typer.Option("--boundaries", help="With --sweep: the boundaries, fractions of the run.")] = "0,0.2,0.4,0.6,0.8,1",
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Contact sheet: each prompt with the routed mixture, the base and each single expert, at fixed seeds.

    With --sweep FIRST:SECOND, one column per boundary b instead: FIRST over the run before b, SECOND after
    (b = 0: SECOND alone; b = 1: FIRST alone).

    Optional CLIP score with a local CLIP model folder (--clip).

    Example: mixdiff evaluate samples --prompts prompts.txt --steps 25 --clip ./models/clip-vit-b32
    """
    from mixdiff_cli.catalog.discovery import find_catalog
    from mixdiff_cli.catalog.schema import load_catalog
    from mixdiff_cli.evaluation.samples import evaluate_samples
    from mixdiff_cli.sampling.options import GenerationOptions
    from mixdiff_cli.core.quiet import quiet_frameworks

    with quiet_frameworks():
        options = GenerationOptions(seed=seed, steps=steps, guidance=guidance, scheduler=scheduler, width=width, height=height,  # type: ignore[arg-type]
                                    experts=tuple(expert or ()), top_k=top_k, temperature=temperature, threshold=threshold,
                                    blend=blend, device=device, dtype=dtype)
        report = evaluate_samples(load_catalog(find_catalog(catalog)), prompts, options, routed=routed and sweep is None, clip=clip,
                                  sweep=_sweep(sweep, boundaries))
    summary = report.data["summary"]
    rows = []
    for c in summary["columns"]:
        row = {"column": c, "changed vs base": "-" if c not in summary["delta_from_base"] else f"{summary['delta_from_base'][c]:.3f}"}
        if "clip_score" in summary:
            row["CLIP score"] = f"{summary['clip_score'][c]:.2f}"
        rows.append(row)
    columns = ["column", "changed vs base"] + (["CLIP score"] if "clip_score" in summary else [])
    n = len(report.data["samples"])
    _finish(report, out_dir, rows, columns, f"{n} prompts x {len(summary['columns'])} columns", [])


def register(app: typer.Typer) -> None:
    command(evaluate_app, "routing")(routing)
    command(evaluate_app, "experts")(experts)
    command(evaluate_app, "samples")(samples)
    app.add_typer(evaluate_app, name="evaluate")


__all__ = ["register"]
