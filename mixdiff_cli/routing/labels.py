"""Labelled prompts, what the router learns from and is measured on: each expert's own texts from the
catalog, and a labelled-prompts file (`router train --prompts`, `evaluate routing --prompts`):

    labels.jsonl   {"prompt": "a red circle", "expert": "shapes"}     one object per line
    labels.csv     prompt,expert                                      a header, then one row per prompt

`label` may stand for `expert`; whitespace in values is collapsed; blank lines are skipped. Every error
names FILE:LINE.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from mixdiff_cli.core.errors import MixdiffError
from mixdiff_cli.core.jsonl import iter_jsonl, read_utf8

if TYPE_CHECKING:
    from mixdiff_cli.catalog.model import Expert

COLUMNS = ("prompt", "expert")
TEXTS_VERSION = 2  # what `expert_texts` returns for the same fields; a change invalidates cached prototypes
EXAMPLE = 'write lines like {"prompt": "a red circle", "expert": "shapes"} (.jsonl) or a csv with the header prompt,expert'


class LabelsError(MixdiffError):
    """A labelled-prompts file that cannot be used (a bad line, an unknown expert, no prompts)."""


class LabelsFileMissing(LabelsError):
    """The labelled-prompts path does not exist or is a folder (a usage error, exit 2)."""

    exit_code = 2


@dataclass(frozen=True)
class Labeled:
    """A prompt and the expert that should serve it; `where` is FILE:LINE for error messages."""

    prompt: str
    expert: str
    where: str = ""


def expert_texts(expert: Expert) -> list[str]:
    """What the router learns an expert from: every text it ships with, each once: its example prompts,
    trigger words, tags (kohya's training-caption tags among them), title, description, file name and name."""
    pieces = [*expert.prompts, *expert.trigger, *expert.tags, expert.title or "", expert.description, file_words(expert.source),
              re.sub(r"[-_]+", " ", expert.name)]
    seen: set[str] = set()
    return [t for t in (p.strip() for p in pieces) if t and not (t.lower() in seen or seen.add(t.lower()))]


def texts_key(expert: Expert) -> str:
    """A digest of every field `expert_texts` reads: while it is unchanged, so are the expert's texts
    (and its cached prototype row). Cheap: no texts are built."""
    fields = [expert.name, expert.title or "", expert.description, expert.source, *expert.prompts, "", *expert.trigger, "", *expert.tags]
    return hashlib.blake2b("\x1f".join(fields).encode(), digest_size=12).hexdigest()


def file_words(source: str) -> str:
    """The words of a source's file name: `loras/Pixel_Art-v2.safetensors` -> "Pixel Art v2"."""
    name = source.split("@", 1)[0].rstrip("/") if source.startswith("hf://") else source
    stem = PurePath(name).name
    stem = stem[: -len(".safetensors")] if stem.lower().endswith(".safetensors") else stem
    return " ".join(re.sub(r"[-_.]+", " ", stem).split())


def _csv_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(FILE:LINE, row) of a .csv (.tsv) file whose header names the columns (case-insensitive)."""
    reader = csv.DictReader(read_utf8(path, LabelsError).splitlines(), dialect="excel-tab" if path.suffix.lower() == ".tsv" else "excel")
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    missing = [c for c in COLUMNS if c not in header and not (c == "expert" and "label" in header)]
    if header and missing:
        raise LabelsError(f"{path}: no column {missing[0]!r} in the header {header}", f"start the file with the header line '{','.join(COLUMNS)}'")
    return [(f"{path}:{reader.line_num}", row) for row in reader if any((v or "").strip() for v in row.values() if isinstance(v, str))]


def _rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(FILE:LINE, row) of a .jsonl or .csv file."""
    if not path.exists():
        raise LabelsFileMissing(f"prompt file {path} does not exist", "pass an existing .jsonl or .csv file")
    if path.is_dir():
        raise LabelsFileMissing(f"prompt file {path} is a folder", "pass a .jsonl or .csv file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = [(f"{path}:{no}", row) for no, row in iter_jsonl(path, hint=EXAMPLE, error=LabelsError)]
    elif suffix in (".csv", ".tsv"):
        rows = _csv_rows(path)
    else:
        raise LabelsError(f"{path}: unknown labelled-prompt file type {path.suffix or '(none)'!r}", f"use .jsonl or .csv; {EXAMPLE}")
    if not rows:
        raise LabelsError(f"no prompts in {path}", EXAMPLE)
    return rows


def _field(row: Mapping[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if value is None and key == "expert":
        value = row.get("label")
    if not isinstance(value, str) or not value.strip():
        raise LabelsError(f"{where}: no {key!r}", EXAMPLE)
    return " ".join(value.split())


def read_labeled(path: str | Path) -> list[Labeled]:
    """Labelled prompts from a .jsonl ({"prompt", "expert"}) or .csv (header prompt,expert) file."""
    return [Labeled(_field(row, "prompt", where), _field(row, "expert", where), where) for where, row in _rows(Path(path))]


def read_prompt_rows(path: str | Path) -> list[str]:
    """The "prompt" of each row of a .jsonl file (any "expert" is ignored)."""
    return [_field(row, "prompt", where) for where, row in _rows(Path(path))]


def check_labels(items: Sequence[Labeled], experts: Sequence[str], catalog_path: Any = None) -> None:
    """Every label must name an expert of the catalog."""
    known = set(experts)
    for item in items:
        if item.expert not in known:
            where = f"{item.where}: " if item.where else ""
            raise LabelsError(
                f"{where}unknown expert {item.expert!r} in the labels" + (f" (catalog {catalog_path})" if catalog_path else ""),
                f"known experts: {', '.join(experts) or 'none'}; fix the label or add the expert with 'mixdiff add-expert'",
            )
