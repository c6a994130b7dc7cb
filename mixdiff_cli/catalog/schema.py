"""The expert catalog (`experts.yaml`): loading and saving, locked atomic edits, and discovery.

Import-light on purpose: `mixdiff experts list` must not pay for torch.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

import yaml

from mixdiff_cli.catalog.discovery import check_writable
from mixdiff_cli.catalog.index import (
    INDEX_MIN_BYTES,
    _from_index,
    _gc_paused,
    _read_index,
    _render,
    _row,
    _Snapshot,
    _write_index,
)
from mixdiff_cli.catalog.model import CATALOG_NAME, HEADER, Catalog
from mixdiff_cli.catalog.yamlload import _Loader
from mixdiff_cli.core.errors import CatalogError, CatalogNotFound


def load_catalog(path: str | Path) -> Catalog:
    """Read and validate a catalog file (safe YAML only); from its index when the file has not changed."""
    with _gc_paused():
        return _load(Path(path))


def _load(path: Path) -> Catalog:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CatalogNotFound(f"catalog {path} does not exist", "run 'mixdiff init' to create it, or pass --catalog PATH") from None
    except IsADirectoryError:
        raise CatalogNotFound(f"catalog {path} is a folder", f"pass the file, e.g. {path / CATALOG_NAME}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CatalogError(f"{path}: not a UTF-8 text file", "pass the experts.yaml catalog") from None
    sha = hashlib.sha256(raw).hexdigest() if len(raw) >= INDEX_MIN_BYTES else None
    index = _read_index(path, sha) if sha else None
    if index is not None:
        return _from_index(path, index, text)
    loader = _Loader(path)
    cat = loader.catalog(text)
    cat._snapshot = _Snapshot(text, loader.spans, [_row(e) for e in cat.experts])
    if sha:
        _write_index(cat, sha)
    return cat


def dump_catalog(cat: Catalog) -> str:
    return HEADER + yaml.safe_dump(cat.to_dict(), sort_keys=False, allow_unicode=True, width=100)


def save_catalog(cat: Catalog) -> None:
    """Write atomically (temporary file, fsync, rename), dumping only the experts that changed since the
    catalog was read (the others keep their text). Callers hold the lock (see `edit_catalog`)."""
    from mixdiff_cli.core.fsutil import atomic_write

    check_writable(cat.path)
    with _gc_paused():
        text, spans, rows, changed = _render(cat)
    head = text[: spans[0][0]] if spans else text
    _Loader(cat.path).catalog(head + "".join(changed))  # never write what we could not read back
    if len(set(cat.names)) != len(cat.experts):
        twice = sorted({n for n in cat.names if cat.names.count(n) > 1})
        raise CatalogError(f"expert name {twice[0]!r} appears twice in {cat.path}", "names must be unique; rename or remove one")
    data = text.encode("utf-8")
    atomic_write(cat.path, data)
    cat._snapshot = _Snapshot(text, spans, rows)
    if len(data) >= INDEX_MIN_BYTES:
        _write_index(cat, hashlib.sha256(data).hexdigest())


@contextlib.contextmanager
def catalog_lock(path: str | Path, timeout: float = 120.0) -> Iterator[None]:
    """Hold the catalog's lock file (`.NAME.lock` beside it) for one read-change-write."""
    from mixdiff_cli.core.fsutil import file_lock

    check_writable(path)  # before the lock file: nothing is written next to the packaged demo
    with file_lock(path, timeout, what="catalog", error=CatalogError):
        yield


@contextlib.contextmanager
def edit_catalog(path: str | Path, reuse: Catalog | None = None) -> Iterator[Catalog]:
    """Lock, re-read, let the caller change the catalog, then write it atomically (not on error).
    `reuse`: the catalog as the caller read it, unchanged; taken instead of re-reading when the file
    still holds the text it was read from (10,000 experts are not built twice)."""
    path = Path(path)
    with catalog_lock(path):
        snap = reuse._snapshot if reuse is not None and reuse.path == path else None
        cat = reuse if snap is not None and path.read_bytes().decode("utf-8", "replace") == snap.text else load_catalog(path)
        yield cat
        save_catalog(cat)
