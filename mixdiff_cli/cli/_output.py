"""One output sink: data on stdout, messages on stderr; modes human (rich), json and quiet."""

from __future__ import annotations

import json
import sys
from typing import Any, Literal

Mode = Literal["human", "json", "quiet"]
LONG = 100  # JSON lists longer than this print compact (one line)


def clean(text: object) -> str:
    """`text` safe for a terminal: control characters (ESC, OSC, BEL, C1, ...) other than newline and tab
    shown as escapes, so that a prompt, a LoRA's metadata or a PNG's text cannot drive the terminal."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else ascii(c)[1:-1] for c in text)


def _jsonable(value: Any) -> Any:
    from pathlib import PurePath

    if isinstance(value, PurePath):
        return str(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class Output:
    def __init__(self) -> None:
        self.mode: Mode = "human"

    def configure(self, *, json_mode: bool = False, quiet: bool = False) -> None:
        self.mode = "json" if json_mode else "quiet" if quiet else "human"

    @property
    def json(self) -> bool:
        return self.mode == "json"

    def _console(self, stderr: bool):
        from rich.console import Console

        return Console(file=sys.stderr if stderr else sys.stdout, highlight=False, soft_wrap=True)

    def data(self, value: Any) -> None:
        """Machine-readable result: JSON in json mode, else pretty-printed mapping/list."""
        if self.mode == "json" and isinstance(value, list) and len(value) > LONG:
            # compact: json's indenting encoder is pure Python, 4x slower than the C one on 10,000 catalog rows
            sys.stdout.write(json.dumps(value, default=_jsonable) + "\n")
        elif self.mode == "json":
            sys.stdout.write(json.dumps(value, default=_jsonable, indent=2) + "\n")
        elif self.mode == "human":  # values are data, never markup: a prompt's "[/x]" prints as it is
            from rich.text import Text

            if isinstance(value, dict):
                width = max((len(str(k)) for k in value), default=0)
                for key, val in value.items():
                    shown = ", ".join(map(str, val)) if isinstance(val, (list, tuple)) else val
                    self._console(False).print(Text.assemble((f"{clean(key):<{width}}", "bold"), "  ", clean(shown)))
            else:
                self._console(False).print(Text(clean(value)))

    def table(self, rows: list[dict[str, Any]], columns: list[str], title: str | None = None) -> None:
        """Rows as a rich table (human) or a JSON list (json); quiet prints the first column only.

        Human: one line per row at any terminal width; cells too long for it end in an ellipsis (rich
        shrinks the widest columns first), the whole value is in --json and the `show` commands."""
        if self.mode == "json":
            self.data(rows)
            return
        if self.mode == "quiet":
            for row in rows:
                sys.stdout.write(f"{clean(row[columns[0]])}\n")
            return
        from rich.table import Table
        from rich.text import Text

        table = Table(title=None if title is None else Text(clean(title)))
        for col in columns:
            table.add_column(col, overflow="ellipsis")
        for row in rows:
            # a Text's own no_wrap beats the column's, so columns stay shrinkable but cells never wrap
            table.add_row(*(Text("" if row.get(c) is None else clean(row.get(c)), no_wrap=True, overflow="ellipsis") for c in columns))
        self._console(False).print(table)

    def result(self, text: str, value: Any = None) -> None:
        """The command's primary result: `text` for people, `value` (default text) for --json."""
        if self.mode == "json":
            self.data(value if value is not None else text)
        else:
            sys.stdout.write(f"{clean(text)}\n")

    def info(self, text: str) -> None:
        """A message in rich markup: callers escape what they did not write (`rich.markup.escape`)."""
        if self.mode == "human":
            self._console(True).print(clean(text), emoji=False)

    def hint(self, text: str) -> None:
        if self.mode == "human":
            from rich.text import Text

            self._console(True).print(Text(f"hint: {clean(text)}", style="dim"))

    def warn(self, text: str) -> None:
        if self.mode != "quiet":
            sys.stderr.write(f"warning: {clean(text)}\n")

    def error(self, text: str) -> None:
        sys.stderr.write(f"error: {clean(text)}\n")


out = Output()
