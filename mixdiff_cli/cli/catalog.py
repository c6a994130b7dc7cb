"""Catalog commands: `init`, `add-expert` (alias `register`), `experts list|show|remove|verify`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mixdiff_cli.cli._common import CatalogOpt, ExpertNameArg, JsonOpt
from mixdiff_cli.cli._errors import command
from mixdiff_cli.cli._output import out

experts_app = typer.Typer(help="List, inspect, verify and remove the catalog's experts.", no_args_is_help=True)


def init(
    catalog: CatalogOpt = None,
    base: Annotated[
        Optional[str],
        typer.Option("--base", help="Base model: a diffusers folder, a .safetensors checkpoint or hf://org/repo@revision."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing catalog.")] = False,
) -> None:
    """Create a catalog (default ./experts.yaml).

    Example: mixdiff init --base ./models/sd15
    """
    from mixdiff_cli.experts.manage import init_catalog

    cat = init_catalog(catalog, base, force=force)
    out.result(str(cat.path), {"catalog": str(cat.path), "base": cat.base.to_dict() if cat.base else None})


def add_expert(
    source: Annotated[str, typer.Argument(help="A LoRA .safetensors, a PEFT folder, a diffusers model folder or single-file checkpoint, or hf://org/repo[/file]@rev.")],
    catalog: CatalogOpt = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Unique slug (default: from the file's title or name).")] = None,
    kind: Annotated[Optional[str], typer.Option("--kind", help="lora or model (default: detected).")] = None,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", help="Example prompt the router learns from (repeatable).")] = None,
    trigger: Annotated[Optional[list[str]], typer.Option("--trigger", help="Trigger word that forces this expert (repeatable).")] = None,
    description: Annotated[Optional[str], typer.Option("--description", help="What the expert is good at.")] = None,
    weight: Annotated[Optional[float], typer.Option("--weight", help="Default strength (LoRA scale) when this expert is used.")] = None,
    tag: Annotated[Optional[list[str]], typer.Option("--tag", help="Tag (repeatable).")] = None,
    copy: Annotated[bool, typer.Option("--copy", help="Copy the files into experts/ beside the catalog.")] = False,
    json_mode: JsonOpt = False,
) -> None:
    """Inspect a LoRA or model and add it to the catalog.

    Example: mixdiff add-expert my-style.safetensors --prompt "a watercolor harbour" --trigger wtrclr
    """
    from mixdiff_cli.catalog.schema import find_catalog
    from mixdiff_cli.experts.manage import add_expert as add

    if kind is not None and kind not in ("lora", "model"):
        raise typer.BadParameter(f"{kind!r} is not lora or model", param_hint="--kind")
    if json_mode:
        out.configure(json_mode=True)
    path = find_catalog(catalog, for_write=True)
    exp = add(path, source, name=name, kind=kind, prompts=prompt, trigger=trigger, description=description,
              weight=weight, tags=tag, copy=copy)
    arch = f", {exp.arch}" if exp.arch else ""
    out.result(f"added {exp.name} ({exp.kind}, {exp.format}{arch}, rank {exp.rank}, {exp.short_hash}) to {path}", exp.to_dict())


@experts_app.callback()
def _experts() -> None:
    """List, inspect, verify and remove the catalog's experts."""


def list_experts(catalog: CatalogOpt = None, json_mode: JsonOpt = False) -> None:
    """List the catalog's experts.

    Example: mixdiff experts list --json
    """
    from mixdiff_cli.catalog.schema import find_catalog, load_catalog
    from mixdiff_cli.experts.manage import expert_rows

    if json_mode:
        out.configure(json_mode=True)
    cat = load_catalog(find_catalog(catalog))
    rows = expert_rows(cat)
    # one line per expert in 80 columns: format, weight, source and the full description are in 'experts show' and --json
    out.table(rows, ["name", "kind", "arch", "rank", "hash", "trigger", "description"], title=str(cat.path))
    if not rows:
        out.hint("no experts yet: add one with 'mixdiff add-expert FILE'")


def show(name: ExpertNameArg, catalog: CatalogOpt = None, json_mode: JsonOpt = False) -> None:
    """Show one expert's catalog entry."""
    from mixdiff_cli.catalog.schema import find_catalog, load_catalog

    if json_mode:
        out.configure(json_mode=True)
    cat = load_catalog(find_catalog(catalog))
    exp = cat.expert(name)
    out.data({**exp.to_dict(), "autov2": exp.short_hash, "path": str(cat.resolve(exp.source)) if not exp.source.startswith("hf://") else exp.source})


def remove(name: ExpertNameArg, catalog: CatalogOpt = None) -> None:
    """Remove an expert from the catalog (its files are kept)."""
    from mixdiff_cli.catalog.schema import find_catalog
    from mixdiff_cli.experts.manage import remove_expert

    path = find_catalog(catalog, for_write=True)
    exp = remove_expert(path, name)
    out.result(f"removed {exp.name} from {path}", {"removed": exp.name})


def verify(
    names: Annotated[Optional[list[str]], typer.Argument(help="Experts to check (default: all).", show_default=False)] = None,
    catalog: CatalogOpt = None,
    json_mode: JsonOpt = False,
) -> None:
    """Check that every expert's files exist and match their sha256 (exit 1 on any mismatch)."""
    from mixdiff_cli.catalog.schema import find_catalog, load_catalog
    from mixdiff_cli.experts.manage import check_verified, verify_experts

    if json_mode:
        out.configure(json_mode=True)
    results = verify_experts(load_catalog(find_catalog(catalog)), names)
    out.table([r.to_dict() for r in results], ["name", "status", "detail"])
    check_verified(results)


def register(app: typer.Typer) -> None:
    command(app, "init")(init)
    command(app, "add-expert")(add_expert)
    command(app, "register", help="Alias of add-expert.")(add_expert)
    command(experts_app, "list")(list_experts)
    command(experts_app, "show")(show)
    command(experts_app, "remove")(remove)
    command(experts_app, "verify")(verify)
    app.add_typer(experts_app, name="experts")


__all__ = ["register"]
