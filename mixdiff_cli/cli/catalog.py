"""Catalog commands: `init`, `add-expert` (alias `register`), `experts list|show|remove|verify`."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from mixdiff_cli.cli._common import CatalogOpt, ExpertNameArg
from mixdiff_cli.cli._errors import command
from mixdiff_cli.cli._output import out

if TYPE_CHECKING:
    from mixdiff_cli.experts.manage import ExpertOptions

experts_app = typer.Typer(help="List, inspect, verify and remove the catalog's experts.", no_args_is_help=True, rich_markup_mode=None)


def init(
    catalog: CatalogOpt = None,
    base: Annotated[
        Optional[str],
        typer.Option("--base", help="Base model: a diffusers folder, a .safetensors checkpoint or hf://org/repo@revision."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing catalog.")] = False,
    from_demo: Annotated[bool, typer.Option("--from-demo", help="Start from the embedded demo: its base, experts (prompts, descriptions, guidance) and a copy of its router.")] = False,
) -> None:
    """Create a catalog (default ./experts.yaml).

    Example: mixdiff init --base ./models/sd15
    Example: mixdiff init --from-demo   (then add-expert your own LoRAs to it)
    """
    from mixdiff_cli.experts.manage import init_catalog

    cat = init_catalog(catalog, base, force=force, from_demo=from_demo)
    out.result(str(cat.path), {"catalog": str(cat.path), "base": cat.base.to_dict() if cat.base else None})


def add_expert(
    source: Annotated[
        list[str],
        typer.Argument(
            metavar="SOURCE",
            help="A LoRA .safetensors, a PEFT folder, a diffusers model folder or single-file checkpoint, hf://org/repo/file@rev; "
            "or a folder of LoRAs (an A1111 models/Lora, a ComfyUI models/loras), walked recursively, or several of these.",
            show_default=False,
        ),
    ],
    catalog: CatalogOpt = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Unique slug (default: from the file's title or name). One source only.")] = None,
    kind: Annotated[Optional[str], typer.Option("--kind", help="lora or model (default: detected).")] = None,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", help="Example prompt the router learns from (repeatable). One source only.")] = None,
    trigger: Annotated[Optional[list[str]], typer.Option("--trigger", help="Trigger word that forces this expert (repeatable). One source only.")] = None,
    description: Annotated[Optional[str], typer.Option("--description", help="What the expert is good at. One source only.")] = None,
    weight: Annotated[Optional[float], typer.Option("--weight", help="Default strength (LoRA scale) when this expert is used.")] = None,
    tag: Annotated[Optional[list[str]], typer.Option("--tag", help="Tag (repeatable; for a folder, on every expert it adds).")] = None,
    copy: Annotated[bool, typer.Option("--copy", help="Copy the files into experts/ beside the catalog.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Inspect and hash, show what would be added; write nothing.")] = False,
) -> None:
    """Inspect LoRAs or models and add them to the catalog: one file, or a whole folder in one write.

    Example: mixdiff add-expert my-style.safetensors --prompt "a watercolor harbour" --trigger wtrclr
    Example: mixdiff add-expert ~/stable-diffusion-webui/models/Lora --dry-run
    """
    from mixdiff_cli.catalog.discovery import find_catalog
    from mixdiff_cli.experts.library import is_library

    if kind is not None and kind not in ("lora", "model"):
        raise typer.BadParameter(f"{kind!r} is not lora or model", param_hint="--kind")
    path = find_catalog(catalog, for_write=True)
    if not dry_run and not is_library(source):
        from mixdiff_cli.experts.manage import ExpertOptions, add_expert as add

        options = ExpertOptions(name=name, kind=kind, prompts=prompt, trigger=trigger, description=description, weight=weight, tags=tag)
        exp = add(path, source[0], options, copy=copy)
        arch = f", {exp.arch}" if exp.arch else ""
        out.result(f"added {exp.name} ({exp.kind}, {exp.format}{arch}, rank {exp.rank}, {exp.short_hash}) to {path}", exp.to_dict())
        return
    one_only = [flag for flag, value in (("--name", name), ("--prompt", prompt), ("--trigger", trigger), ("--description", description)) if value]
    if one_only:
        raise typer.BadParameter("applies to one expert; add the file on its own to set it", param_hint=one_only[0])
    from mixdiff_cli.experts.manage import ExpertOptions

    _import(path, source, ExpertOptions(kind=kind, weight=weight, tags=tag), copy=copy, dry_run=dry_run)


def _import(path: Path, sources: list[str], options: ExpertOptions, *, copy: bool, dry_run: bool) -> None:
    """`add-expert` over a library: a progress bar while files are hashed, then the summary table."""
    from rich.markup import escape

    from mixdiff_cli.experts.library import import_library

    with _progress("inspecting and hashing") as advance:
        result = import_library(path, sources, options=options, dry_run=dry_run, copy=copy, progress=advance)
    if out.json:
        out.data(result.to_dict())
    else:
        added, present, refused = (result.count(s) for s in ("added", "present", "refused"))
        few = added + present <= 40  # a big import lists its refusals only; --json lists every file
        root = Path(sources[0]).expanduser() if len(sources) == 1 else None
        shown = lambda src: os.path.relpath(src, root) if root is not None and root.is_dir() else src  # noqa: E731
        status = lambda r: "would add" if dry_run and r.status == "added" else r.status  # noqa: E731 (a dry run adds nothing)
        rows = [{**r.to_dict(), "status": status(r), "file": shown(r.source)} for r in result.rows if few or r.status == "refused"]
        if rows:
            out.table(rows, ["status", "name", "file", "reason"], title=f"{'dry run: nothing written to ' if dry_run else ''}{path}")
        for r in result.rows:  # whole, where the table cuts them at the terminal's width
            if r.status == "refused":
                out.info(f"[red]refused[/red] {escape(shown(r.source))}: {escape(r.reason)}")
        verb = "would add" if dry_run else "added"
        out.info(f"{verb} {added}, already present {present}, refused {refused}; skipped {result.skipped} files that are not weights")
    result.check()


@contextlib.contextmanager
def _progress(what: str):
    """A rich progress bar on stderr (human mode only); yields `advance(done, total)`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True, disable=out.mode != "human")
    task = None

    def advance(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            task = bar.add_task(what, total=total)
        bar.update(task, completed=done)

    with bar:
        yield advance


@experts_app.callback()
def _experts() -> None:
    """List, inspect, verify and remove the catalog's experts."""


def list_experts(
    search: Annotated[
        Optional[str], typer.Argument(help="Only experts whose name, title, description, trigger words, tags, prompts or source contain this.", show_default=False)
    ] = None,
    catalog: CatalogOpt = None,
    tag: Annotated[Optional[list[str]], typer.Option("--tag", help="Only experts with this tag (repeatable: all of them).")] = None,
    arch: Annotated[Optional[str], typer.Option("--arch", help="Only experts for this base: sd1, sd2 or sdxl.")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="Only this format: diffusers, peft, kohya, diffusers-model, single-file.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=0, help="Show at most this many (default 50, --json all; 0: all).")] = None,
    offset: Annotated[int, typer.Option("--offset", min=0, help="Skip this many first (paging).")] = 0,
) -> None:
    """List the catalog's experts, filtered and paged.

    Example: mixdiff experts list --json
    Example: mixdiff experts list watercolor --tag style --arch sdxl --limit 20 --offset 20
    """
    from mixdiff_cli import families
    from mixdiff_cli.catalog.discovery import find_catalog
    from mixdiff_cli.catalog.model import FORMATS
    from mixdiff_cli.catalog.schema import load_catalog
    from mixdiff_cli.experts.manage import ExpertQuery, expert_rows, select_experts

    if arch is not None and arch not in families.names():
        raise typer.BadParameter(f"{arch!r} is not one of {', '.join(families.names())}", param_hint="--arch")
    if fmt is not None and fmt not in FORMATS:
        raise typer.BadParameter(f"{fmt!r} is not one of {', '.join(FORMATS)}", param_hint="--format")
    cat = load_catalog(find_catalog(catalog))
    query = ExpertQuery(search=search, tags=tag, arch=arch, format=fmt)
    found = select_experts(cat, query) if any((search, tag, arch, fmt)) else cat.experts
    limit = (0 if out.json else 50) if limit is None else limit
    shown = found[offset : offset + limit] if limit else found[offset:]
    rows = expert_rows(cat, shown)
    # one line per expert in 80 columns: format, weight, source and the full description are in 'experts show' and --json
    out.table(rows, ["name", "kind", "arch", "rank", "hash", "trigger", "description"], title=str(cat.path))
    if not cat.experts:
        out.hint("no experts yet: add one with 'mixdiff add-expert FILE' (or a folder of them)")
    elif len(shown) < len(found):
        more = f"; --offset {offset + len(shown)} for the next page" if offset + len(shown) < len(found) else ""
        out.hint(f"{offset + 1}-{offset + len(shown)} of {len(found)} experts{more}, --limit 0 for all")
    elif not found:
        out.hint(f"none of the {len(cat.experts)} experts match")


def show(name: ExpertNameArg, catalog: CatalogOpt = None) -> None:
    """Show one expert's catalog entry."""
    from mixdiff_cli.catalog.discovery import find_catalog
    from mixdiff_cli.catalog.schema import load_catalog

    cat = load_catalog(find_catalog(catalog))
    exp = cat.expert(name)
    local = None if exp.source.startswith("hf://") else cat.resolve(exp.source)
    adapter = _adapter(Path(local)) if local is not None and exp.kind == "lora" else None
    out.data({**exp.to_dict(), "autov2": exp.short_hash, "path": str(local) if local is not None else exp.source,
              **({"adapter": adapter} if adapter else {})})


def _adapter(path: Path) -> str | None:
    """What the LoRA file is, from its header: "LoRA rank 4", or "LyCORIS LoHa 4x4 (113 modules), effective rank 16"."""
    from mixdiff_cli.catalog.formats import inspect_source
    from mixdiff_cli.core.errors import MixdiffError

    try:
        info = inspect_source(path, checksum=False)
    except (MixdiffError, OSError):
        return None
    kinds = ", ".join(f"LyCORIS {kind} ({n} modules)" for kind, n in info.lycoris.items())
    return f"{kinds}, effective rank {info.rank}" if kinds else f"LoRA rank {info.rank}"


def remove(name: ExpertNameArg, catalog: CatalogOpt = None) -> None:
    """Remove an expert from the catalog (its files are kept)."""
    from mixdiff_cli.catalog.discovery import find_catalog
    from mixdiff_cli.experts.manage import remove_expert

    path = find_catalog(catalog, for_write=True)
    exp = remove_expert(path, name)
    out.result(f"removed {exp.name} from {path}", {"removed": exp.name})


def verify(
    names: Annotated[Optional[list[str]], typer.Argument(help="Experts to check (default: all).", show_default=False)] = None,
    catalog: CatalogOpt = None,
) -> None:
    """Check that every expert's files exist and match their sha256 (exit 1 on any mismatch)."""
    from mixdiff_cli.catalog.discovery import find_catalog
    from mixdiff_cli.catalog.schema import load_catalog
    from mixdiff_cli.experts.manage import check_verified, verify_experts

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
