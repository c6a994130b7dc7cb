"""Maps exceptions to one-line messages and exit codes; tracebacks only with MIXDIFF_DEBUG=1."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

import typer

from mixdiff_cli.core.errors import MixdiffError, MixdiffWarning
from mixdiff_cli.cli._common import with_output_options
from mixdiff_cli.cli._output import out


def debug() -> bool:
    return os.environ.get("MIXDIFF_DEBUG", "") not in ("", "0", "false")


def handled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command body; turn library errors into `error: ...` on stderr and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        caught: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", MixdiffWarning)
                return _run(fn, *args, **kwargs)
        finally:
            # replayed after the block: inside it, showwarning appends to `caught` (an endless loop)
            for warning in caught:
                if issubclass(warning.category, MixdiffWarning):
                    out.warn(str(warning.message))
                else:
                    warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)

    return wrapper


def _run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a command body, mapping exceptions to one-line errors and exit codes."""
    try:
        return fn(*args, **kwargs)
    except (typer.Exit, typer.Abort, typer.BadParameter):
        raise
    except MixdiffError as exc:
        if debug():
            raise
        out.error(str(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        out.error("interrupted")
        raise typer.Exit(130) from None
    except OSError as exc:
        if debug():
            raise
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        out.error(f"{exc.strerror or exc}{where}. Check the path and its permissions")
        raise typer.Exit(1) from None
    except Exception as exc:
        if debug() or type(exc).__module__.startswith("click"):
            raise
        out.error(f"unexpected {type(exc).__name__}: {exc}. Re-run with MIXDIFF_DEBUG=1 for the traceback and report it")
        raise typer.Exit(1) from None


def command(app: typer.Typer, name: str | None = None, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`@command(app, "name")`: register a Typer command that takes --json / --quiet and whose errors go through `handled`."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        app.command(name, **kwargs)(with_output_options(handled(fn)))
        return fn

    return decorate
