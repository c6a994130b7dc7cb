"""Option types shared by commands (one definition each)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

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
