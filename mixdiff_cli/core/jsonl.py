"""JSON-lines files: one object per line, blank lines skipped, every bad line named FILE:LINE."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mixdiff_cli.core.errors import MixdiffError

OBJECT_PER_LINE = "write one JSON object per line"


class JsonLinesError(MixdiffError):
    """A JSON-lines file that cannot be read: not UTF-8, or a line that is not a JSON object."""


def read_utf8(path: Path, error: type[MixdiffError] = JsonLinesError) -> str:
    """The text of `path` (UTF-8, a leading BOM dropped); undecodable bytes raise `error`."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise error(f"{path} is not UTF-8 text", "save the file as UTF-8") from None


def iter_jsonl(
    path: str | Path, *, hint: str = OBJECT_PER_LINE, error: type[MixdiffError] = JsonLinesError
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of `path`; a bad line raises `error` naming FILE:LINE."""
    path = Path(path)
    for lineno, line in enumerate(read_utf8(path, error).split("\n"), 1):  # line feeds only: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{lineno}: not valid JSON ({exc.msg})", OBJECT_PER_LINE) from None
        if not isinstance(row, dict):
            raise error(f"{path}:{lineno}: expected a JSON object", hint)
        yield lineno, row
