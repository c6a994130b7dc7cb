"""Shell completion scripts generated from the Typer app (`python -m mixdiff_cli.cli.completions DIR`)."""

from __future__ import annotations

import sys
from pathlib import Path

SHELLS = {"bash": "mixdiff.bash", "zsh": "mixdiff.zsh", "fish": "mixdiff.fish"}


def completion_script(shell: str) -> str:
    """The script `mixdiff --show-completion SHELL` prints (expert names complete at run time)."""
    import os

    from typer.testing import CliRunner

    from mixdiff_cli.cli import app

    os.environ["_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION"] = "1"
    result = CliRunner().invoke(app, ["--show-completion", shell], prog_name="mixdiff")
    if result.exit_code != 0:
        raise RuntimeError(f"could not generate the {shell} completion: {result.output}")
    return result.stdout


def write_completions(folder: str | Path) -> list[Path]:
    from mixdiff_cli.core.fsutil import atomic_write

    folder = Path(folder)
    return [atomic_write(folder / name, completion_script(shell)) for shell, name in SHELLS.items()]


if __name__ == "__main__":
    for path in write_completions(sys.argv[1] if len(sys.argv) > 1 else "completions"):
        print(path)
