"""What a user hits in the first hour (issue 20): each test here failed on the main of 2026-12-07 and names
the item it covers."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import typer
from PIL import Image, PngImagePlugin
from typer.testing import CliRunner

from mixdiff_cli.cli import app

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()
ESC = "\x1b"


def _commands(group, path: tuple[str, ...] = ()):
    """Every leaf command of a (typer) click group, with its path of names."""
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def _flat(text: str) -> str:
    """Whitespace as one space; a line broken after a hyphen joined again (click wraps there)."""
    return re.sub(r"\s+", " ", re.sub(r"-\s+", "-", text)).strip()


def test_every_help_text_prints_as_written():
    """`generate --help` showed NAME[:WEIGHT][@START:END] as NAME[:WEIGHT] and ':END:' as an emoji (help
    read as rich markup). Every option's help of every command now appears verbatim."""
    root = typer.main.get_command(app)
    checked = 0
    for path, cmd in _commands(root):
        shown = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert shown.exit_code == 0, (path, shown.output)
        for param in cmd.params:
            if getattr(param, "param_type_name", "") == "option" and param.help and not param.hidden:
                assert _flat(param.help) in _flat(shown.output), (path, param.help)
                checked += 1
    assert checked > 100
    assert "NAME[:WEIGHT][@START:END]" in runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "200"}).output


def test_route_prints_a_prompt_with_markup_and_escapes_as_text():
    """`[/x]` in a prompt crashed `route` (rich markup), `[cat:dog:0.5]` vanished, ESC reached the terminal."""
    prompt = f"[/x] a red circle [cat:dog:0.5] {ESC}]0;owned\x07"
    from mixdiff_cli.catalog.discovery import packaged_catalog_path

    res = runner.invoke(app, ["route", prompt, "--catalog", str(packaged_catalog_path())])
    assert res.exit_code == 0, res.output
    assert "[/x] a red circle [cat:dog:0.5]" in res.stdout and ESC not in res.output and "\x07" not in res.output


def test_inspect_never_passes_terminal_escapes(tmp_path):
    """`inspect` printed a PNG's ESC/OSC sequences to the terminal as they were."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", f"a cat {ESC}]0;owned\x07 [/x] {ESC}[31mred\nSteps: 20, Seed: 1")
    Image.new("RGB", (8, 8)).save(tmp_path / "e.png", pnginfo=info)
    res = runner.invoke(app, ["inspect", str(tmp_path / "e.png")])
    assert res.exit_code == 0, res.output
    assert ESC not in res.output and "\x07" not in res.output
    assert "a cat \\x1b]0;owned\\x07 [/x] \\x1b[31mred" in res.stdout  # shown, escaped


def test_the_catalog_lock_is_ignored_by_git(tmp_path):
    """`.experts.yaml.lock` (the catalog's write lock) showed up in `git status`."""
    res = subprocess.run(["git", "check-ignore", "-q", ".experts.yaml.lock"], cwd=REPO)
    assert res.returncode == 0
