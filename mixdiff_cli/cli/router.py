"""`mixdiff router train|show`: learn the routing gate from the experts' prompts; inspect the checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mixdiff_cli.cli._common import CatalogOpt
from mixdiff_cli.cli._errors import command
from mixdiff_cli.cli._output import out

router_app = typer.Typer(help="Train and inspect the prompt router.", no_args_is_help=True, rich_markup_mode=None)


def train(
    catalog: CatalogOpt = None,
    prompts: Annotated[
        Optional[Path],
        typer.Option("--prompts", help='Extra labelled prompts: .jsonl lines {"prompt": "...", "expert": "NAME"}, or .csv with a prompt,expert header (as evaluate routing reads).'),
    ] = None,
    hidden: Annotated[Optional[int], typer.Option("--hidden", min=0, help="0: linear cosine gate; N: one hidden layer of N units. Default: the current router's, else 0.")] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the training prompts.")] = 300,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 0.01,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the held-out split and initialisation.")] = 0,
    val_split: Annotated[float, typer.Option("--val-split", help="Held-out fraction of each expert's prompts.")] = 0.2,
    balance: Annotated[float, typer.Option("--balance", help="Load-balancing loss weight (keeps one expert from taking all).")] = 0.01,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Also report top-k accuracy.")] = 2,
    encoder: Annotated[Optional[str], typer.Option("--encoder", help="Prompt encoder: base, minilm or words. Default: the current router's, else base.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Checkpoint path (default: router.safetensors beside the catalog).")] = None,
) -> None:
    """Train the router on each expert's prompts and trigger words; save it and point the catalog at it.

    Example: mixdiff router train --prompts labeled.jsonl --hidden 64
    """
    from mixdiff_cli.catalog.discovery import find_catalog
    from mixdiff_cli.routing.train import TrainConfig, train_router

    config = TrainConfig(hidden=hidden, epochs=epochs, lr=lr, seed=seed, val_split=val_split, balance=balance, top_k=top_k, encoder=encoder)
    res = train_router(find_catalog(catalog, for_write=True), prompts_file=prompts, config=config, output=output)
    if out.json:
        out.data(res.to_dict())
        return
    pct = lambda v: "n/a (no held-out prompts)" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    out.info(f"trained on {res.n_train} prompts for {len(res.names)} experts; held out {res.n_val}")
    if res.n_val and not res.confusion:  # too many experts for a matrix: the pairs the router mixes up most
        rows = [{"expert": t, "routed to": r, "prompts": str(n)} for t, r, n in res.confused[:20]]
        out.table(rows, ["expert", "routed to", "prompts"], title=f"most-confused held-out pairs ({len(res.confused)} in all)")
    elif res.n_val:
        rows = [
            {"expert": t, **{p: str(c) for p, c in zip(res.names, row)}, "n": str(sum(row)),
             "acc": pct(row[i] / sum(row)) if sum(row) else ""}
            for i, (t, row) in enumerate(zip(res.names, res.confusion))
        ]
        out.table(rows, ["expert", *res.names, "n", "acc"], title="held-out confusion (rows: true expert, columns: routed to)")
    out.info(f"held-out top-1 {pct(res.top1)}, top-{res.k} {pct(res.topk)}; training top-1 {pct(res.train_top1)}")
    cal = res.calibration
    if "fit_threshold" in cal:
        out.info(f"calibrated: temperature {cal['temperature']:g}; abstains below fit {cal['fit_threshold']:g} (keeps "
                 f"{pct(cal['kept_in_world'])} of held-out prompts, abstains on {pct(cal['abstained_generic'])} of "
                 f"{cal['n_generic']} held-out generic captions)")
    out.result(str(res.checkpoint))


def show(catalog: CatalogOpt = None) -> None:
    """Show the catalog's router: checkpoint, encoder, experts and whether it matches the catalog.

    Example: mixdiff router show
    """
    from mixdiff_cli.catalog.discovery import find_catalog
    from mixdiff_cli.catalog.schema import load_catalog
    from mixdiff_cli.routing.router import router_status

    status = router_status(load_catalog(find_catalog(catalog)))
    out.data(status)


def register(app: typer.Typer) -> None:
    command(router_app, "train")(train)
    command(router_app, "show")(show)
    app.add_typer(router_app, name="router")
