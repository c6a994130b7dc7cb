"""Option types shared by commands (one definition each)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from mixdiff_cli.cli._output import out

CatalogOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--catalog",
        "-c",
        help="Catalog file. Default: $MIXDIFF_CATALOG, else experts.yaml found walking up from the working "
        "directory, else the user catalog, else (read-only commands) the packaged demo.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only results.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed (default: random, recorded in outputs).")]
StepsOpt = Annotated[int, typer.Option("--steps", min=1, help="Denoising steps.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:N or mps (default: cuda when present).")]
DtypeOpt = Annotated[
    Optional[str], typer.Option("--dtype", help="float32, float16 or bfloat16 (default: float16 on CUDA, float32 on CPU).")
]
OutDirOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]


def complete_expert_names(incomplete: str) -> list[str]:
    """Shell completion: expert names from the discovered catalog (never raises)."""
    try:
        from mixdiff_cli.catalog.discovery import find_catalog
        from mixdiff_cli.catalog.schema import load_catalog

        cat = load_catalog(find_catalog(None))
        return [e.name for e in cat.experts if e.name.startswith(incomplete)]
    except Exception:
        return []


ExpertNameArg = Annotated[str, typer.Argument(help="Expert name.", autocompletion=complete_expert_names)]


def configure_output(json_mode: bool, quiet: bool) -> None:
    """A command's --json / --quiet: set the output sink's mode, over the root's (`mixdiff --json CMD`)."""
    if json_mode or quiet:
        out.configure(json_mode=json_mode or out.json, quiet=quiet)


def with_output_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` as a command that also takes --json and --quiet, so `mixdiff CMD --json` = `mixdiff --json CMD`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, json_mode: bool = False, quiet: bool = False, **kwargs: Any) -> Any:
        configure_output(json_mode, quiet)
        return fn(*args, **kwargs)

    signature = inspect.signature(fn, eval_str=True)  # typer reads a set __signature__ as it is
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=hint)
             for name, hint in (("json_mode", JsonOpt), ("quiet", QuietOpt))]
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**fn.__annotations__, "json_mode": JsonOpt, "quiet": QuietOpt}
    return wrapper
