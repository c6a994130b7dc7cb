"""`mixdiff route PROMPT...`: show the router's decision (probabilities, chosen experts, why). No UNet loads."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

import typer
from rich.markup import escape

from mixdiff_cli.cli._common import CatalogOpt, DeviceOpt
from mixdiff_cli.cli._errors import command
from mixdiff_cli.cli._output import out

TopKOpt = Annotated[int, typer.Option("--top-k", "-k", help="How many experts to blend (1 = the single best).")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", help="Softmax temperature over the router's logits (lower is sharper).")]
ThresholdOpt = Annotated[
    Optional[float],
    typer.Option("--threshold", help="Override the calibrated abstention: drop experts with probability below this; none left = the bare base (0 never abstains).", show_default=False),
]
AbstainOpt = Annotated[
    bool,
    typer.Option("--abstain/--no-abstain", help="--no-abstain: always pick an expert, even for a prompt unlike all of them (default: such a prompt gets the bare base)."),
]
ExpertOpt = Annotated[
    Optional[list[str]],
    typer.Option("--expert", "-e", help="NAME[:WEIGHT]: use these experts instead of the router (repeatable; weights are renormalised)."),
]
EncoderOpt = Annotated[
    Optional[str],
    typer.Option("--encoder", help="Prompt encoder: base (the base's text encoder), minilm or words. Default: the checkpoint's, else base."),
]
SHOWN = 10  # experts in the table of a decision (the chosen ones and the most probable others)
OnStaleOpt = Annotated[
    Literal["error", "prototypes"],
    typer.Option("--on-stale", help="When the router checkpoint does not match the catalog: error, or fall back to prototype routing."),
]


def route(
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts.", show_default=False)],
    catalog: CatalogOpt = None,
    top_k: TopKOpt = 1,
    temperature: TemperatureOpt = 1.0,
    threshold: ThresholdOpt = None,
    abstain: AbstainOpt = True,
    expert: ExpertOpt = None,
    encoder: EncoderOpt = None,
    on_stale: OnStaleOpt = "error",
    device: DeviceOpt = None,
) -> None:
    """Show which experts the router picks for each prompt, with every expert's probability and why.

    Example: mixdiff route "a watercolor fox" --top-k 2
    Example: mixdiff route "a red circle" --expert shapes:0.7 --expert stripes:0.3 --json
    """
    from mixdiff_cli.catalog.discovery import find_catalog
    from mixdiff_cli.catalog.schema import load_catalog
    from mixdiff_cli.routing.route import explanations
    from mixdiff_cli.routing.router import load_router

    cat = load_catalog(find_catalog(catalog))
    router = load_router(cat, encoder, device=device, on_stale=on_stale)
    router.warn()
    routes = router.route(prompts, top_k=top_k, temperature=temperature, threshold=threshold, overrides=expert or None, abstain=abstain)
    if out.json:
        out.data([r.to_dict() for r in routes])
        return
    if out.mode == "quiet":  # one line per prompt: NAME:WEIGHT ... ("-" = the bare base)
        for r in routes:
            typer.echo(" ".join(f"{n}:{w:g}" for n, w in r.chosen) or "-")
        return
    strength = {e.name: e.default_weight for e in cat.experts}  # the engine applies each chosen LoRA at this scale
    for r in routes:
        weights = dict(r.chosen)
        rows = [
            {"expert": n, "p": f"{r.probs[n]:.3f}" if n in r.probs else "", "weight": f"{weights[n]:.3f}" if n in weights else "",
             "strength": f"{strength[n]:g}" if n in weights else "", "why": r.reasons.get(n, "")}
            for n in sorted(router.names, key=lambda n: (n not in weights, -r.probs.get(n, 0.0)))[: max(SHOWN, len(weights))]
        ]
        out.table(rows, ["expert", "p", "weight", "strength", "why"], title=r.prompt)
        if len(router.names) > len(rows):
            out.info(f"[dim]... and {len(router.names) - len(rows)} less probable experts (--json lists them all)[/dim]")
        chosen = ", ".join(f"{n} ({w:.2f})" for n, w in r.chosen) or "none: the bare base"
        out.info(f"[bold]-> {escape(chosen)}[/bold]  [dim]({router.kind} router, {router.encoder_id} encoder)[/dim]")
        for line in explanations(r.to_dict()):
            out.info(escape(line))


def register(app: typer.Typer) -> None:
    command(app, "route")(route)
