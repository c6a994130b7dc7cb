"""The `mixdiff` Typer app: wiring only; each command group lives in its own module."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from mixdiff_cli import __version__
from mixdiff_cli.cli import catalog, evaluate, finetune, generate, route, router
from mixdiff_cli.cli._common import JsonOpt, QuietOpt
from mixdiff_cli.cli._output import out

app = typer.Typer(
    name="mixdiff",
    help="Mixture of Diffusers: route each prompt to the top-k experts of a catalog and blend them while sampling.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help is plain text: "NAME[:WEIGHT][@START:END]" is not markup, ":END:" no emoji
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mixdiff {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Mixture of Diffusers."""
    out.configure(json_mode=json_mode, quiet=quiet)
    if sys.stdout is None or sys.stdout.closed:  # Python's view of a closed file descriptor 1 (`>&-`)
        out.error("stdout is closed, so this command's output would be lost. Redirect it instead: > FILE, or > /dev/null to drop it")
        raise typer.Exit(1)


for _module in (catalog, route, generate, router, finetune, evaluate):
    _module.register(app)


def main() -> None:
    app(prog_name="mixdiff")
