"""Fast reads and writes of big catalogs: an index cached by content hash, and rewriting only the experts that changed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from mixdiff_cli.catalog.discovery import user_data_dir
from mixdiff_cli.catalog.model import HEADER, Base, Catalog, Expert
from mixdiff_cli.catalog.yamlload import _DUMPER

# --- fast reads and writes ------------------------------------------------------------------------
# Parsing YAML costs about a millisecond per expert even with libyaml: 10,000 experts would take seconds
# per command. A read of a catalog over 64 KiB hashes the file and, when an index of that exact content is cached (JSON in the
# user's data folder, one per catalog path), builds the catalog from it; otherwise it parses strictly
# (file:line errors) and writes the index. A write dumps only the experts that changed and copies the
# others' items from the text it read, so adding one expert costs a copy of the file, not a dump.

INDEX_FORMAT = "mixdiff-catalog-index/1"
INDEX_MIN_BYTES = 64 * 1024  # smaller catalogs (~150 experts) parse in milliseconds: no index
_EXPERT_FIELDS = tuple(f.name for f in fields(Expert))  # "name" first
_LIST_AT = tuple(i for i, f in enumerate(fields(Expert)) if "list[" in str(f.type))  # prompts, trigger, tags, ...
_MEMO: dict[str, tuple[str, dict[str, Any]]] = {}  # catalog path -> (sha256, index) of this process's last read or write


@dataclass
class _Snapshot:
    """The text a catalog was read from (or written as) and what each expert was in it."""

    text: str
    spans: list[tuple[int, int]] | None  # each expert's item in `text`; None: items we cannot cut out
    rows: list[list[Any]]  # each expert's values in `_EXPERT_FIELDS` order, as read


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while tens of thousands of objects are made: its full passes over
    them would cost more than the work (and vary run to run). Nothing made here is cyclic."""
    import gc

    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _row(exp: Expert) -> list[Any]:
    """The expert's values in `_EXPERT_FIELDS` order (lists copied: a later edit of the expert must show)."""
    row = list(map(exp.__dict__.get, _EXPERT_FIELDS))
    for i in _LIST_AT:
        if row[i] is not None:
            row[i] = list(row[i])
    return row


def _dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_DUMPER, sort_keys=False, allow_unicode=True, width=100)


def _render(cat: Catalog) -> tuple[str, list[tuple[int, int]], list[list[Any]], list[str]]:
    """(text, each expert's span in it, each expert's row, the items dumped anew) of `cat`. Unchanged
    experts that were neighbours in the text read are copied as one piece."""
    snap = cat._snapshot
    kept = {row[0]: (row, span) for row, span in zip(snap.rows, snap.spans)} if snap and snap.spans is not None else {}
    head = {"version": cat.version, "base": cat.base.to_dict() if cat.base else None, "router": cat.router}
    parts = [HEADER + _dump(head) + ("experts:\n" if cat.experts else "experts: []\n")]
    at, spans, rows, changed = len(parts[0]), [], [], []
    run: list[int] = []  # [start, end) in the text read of the unchanged items being copied together

    def copy_run() -> None:
        if run:
            piece = snap.text[run[0] : run[1]]
            parts.append(piece if piece.endswith("\n") else piece + "\n")  # only the text's last item may lack it
            run.clear()

    for exp in cat.experts:
        old, values = kept.get(exp.name), exp.__dict__
        # unchanged: its values in field order (as every Expert keeps them) equal the row read
        if old is not None and len(values) == len(_EXPERT_FIELDS) and list(values.values()) == old[0]:
            (a, b), row = old[1], old[0]
            if run and run[1] == a:
                run[1] = b
            else:
                copy_run()
                run[:] = [a, b]
            size = b - a + (b == len(snap.text) and not snap.text.endswith("\n"))
        else:
            copy_run()
            row, item = _row(exp), _dump([exp.to_dict()])
            parts.append(item)
            changed.append(item)
            size = len(item)
        spans.append((at, at + size))
        rows.append(row)
        at += size
    copy_run()
    return "".join(parts), spans, rows, changed


def _index_path(path: Path) -> Path:
    """The cached index of the catalog at `path` (in the user's data folder: never beside a catalog)."""
    key = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:32]
    return user_data_dir() / "cache" / "catalogs" / f"{key}.json"


def _read_index(path: Path, sha: str) -> dict[str, Any] | None:
    """The index of `path` if it describes the content whose sha256 is `sha`, else None."""
    memo = _MEMO.get(os.path.abspath(path))
    if memo is not None and memo[0] == sha:
        return memo[1]
    try:
        data = json.loads(_index_path(path).read_bytes())
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("format") == INDEX_FORMAT and data.get("sha256") == sha
    if not ok or data.get("fields") != list(_EXPERT_FIELDS):
        return None
    _remember(path, sha, data)
    return data


def _remember(path: Path, sha: str, data: dict[str, Any]) -> None:
    if len(_MEMO) > 8:
        _MEMO.clear()
    _MEMO[os.path.abspath(path)] = (sha, data)


def _write_index(cat: Catalog, sha: str) -> None:
    """Cache `cat` (just read or written, content hash `sha`) as its file's index; best effort."""
    snap = cat._snapshot
    data = {
        "format": INDEX_FORMAT, "sha256": sha, "fields": list(_EXPERT_FIELDS), "version": cat.version,
        "base": cat.base.to_dict() if cat.base else None, "router": cat.router,
        "experts": snap.rows if snap else [_row(e) for e in cat.experts], "spans": snap.spans if snap else None,
    }
    text = json.dumps(data, separators=(",", ":"))
    _remember(cat.path, sha, data)  # its rows are copies (`_row`): later changes to the catalog do not reach them
    with contextlib.suppress(OSError):  # a cache: written whole or not at all (rename), no fsync; unwritable costs speed only
        path = _index_path(cat.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


def _from_index(path: Path, data: dict[str, Any], text: str) -> Catalog:
    """The catalog an index describes (fresh objects: callers may change them)."""
    base = data["base"]
    cat = Catalog(path=path, base=Base(**base) if base else None, router=data["router"], version=data["version"])
    for row in data["experts"]:
        exp = object.__new__(Expert)  # the index holds validated values: skip __init__ (10,000 experts in ~20 ms)
        exp.__dict__.update(zip(_EXPERT_FIELDS, row))
        for i in _LIST_AT:  # the index's rows stay as read (they are the snapshot)
            if row[i] is not None:
                exp.__dict__[_EXPERT_FIELDS[i]] = list(row[i])
        cat.experts.append(exp)
    spans = data["spans"]
    cat._snapshot = _Snapshot(text, [tuple(s) for s in spans] if spans is not None else None, data["experts"])
    return cat


