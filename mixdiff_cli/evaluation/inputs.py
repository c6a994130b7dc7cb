"""Evaluation inputs: `--data NAME=DIR` specs, range checks of numeric options, hints for input files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mixdiff_cli.core.errors import UsageError


def file_example(columns: tuple[str, ...]) -> str:
    """How to write a prompt file (`("prompt",)`) or a labelled prompt file (`("prompt", "expert")`)."""
    if columns == ("prompt",):
        return 'write one prompt per line (.txt), {"prompt": "..."} lines (.jsonl) or a "prompt" column (.csv)'
    return 'write lines like {"prompt": "a red circle", "expert": "shapes"} (.jsonl) or a csv with the header prompt,expert'


def parse_data_specs(specs: Sequence[str]) -> dict[str, Path]:
    """`NAME=DIR` (or a bare DIR, named after its folder) -> {domain: folder}, in the given order."""
    domains: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            name, folder = Path(spec).name, spec
        name = name.strip()
        if not name or not folder.strip():
            raise UsageError(f"bad --data {spec!r}", "write NAME=DIR, e.g. --data stripes=./heldout/stripes")
        if name in domains:
            raise UsageError(f"domain {name!r} given twice in --data", "give each domain one folder")
        domains[name] = Path(folder).expanduser()
    if not domains:
        raise UsageError("no --data folders", "pass --data NAME=DIR once per domain, named after the expert it belongs to")
    return domains


def check_range(flag: str, value: int, lo: int) -> None:
    """`value` of `flag` is at least `lo`."""
    if value < lo:
        raise UsageError(f"{flag} {value} must be at least {lo}", f"pass {flag} {lo} or more")


def check_unit(flag: str, value: float) -> None:
    """`value` of `flag` is in [0, 1]."""
    if not 0 <= value <= 1:
        raise UsageError(f"{flag} {value} must be between 0 and 1", f"pass e.g. {flag} 0.5")
