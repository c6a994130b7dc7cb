"""A batch's `manifest.jsonl`: reading, merging the per-process parts, appending, and what counts as done on --resume."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixdiff_cli.catalog.headers import sha256_file as file_sha256
from mixdiff_cli.core.errors import MixdiffError

if TYPE_CHECKING:
    from mixdiff_cli.sampling.work import Work

MANIFEST = "manifest.jsonl"
PART_GLOB = "manifest.part*.jsonl"
# What an image depends on: a manifest line whose values differ from the item's is not "done".
PARAM_KEYS = ("prompt", "negative", "seed", "steps", "scheduler", "route", "blend")
DEFAULTED_KEYS = ("guidance", "width", "height")  # None in a request: the engine's default, recorded as used


class BatchError(MixdiffError):
    """A batch that cannot start or continue (output folder, manifest)."""


class ManifestError(BatchError):
    """A manifest.jsonl that cannot be read."""


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """The records of one manifest file. A torn last line (a killed writer) is ignored."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    records = []
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                raise ValueError("not a record")
        except ValueError:
            if number == len(lines):  # no newline after it: the write was cut short
                continue
            raise ManifestError(f"{path}:{number} is not a manifest record", "delete that line (its image is regenerated on --resume)") from None
        records.append(record)
    return records


def manifest_records(out_dir: Path) -> dict[str, dict[str, Any]]:
    """id -> latest record over manifest.jsonl and the per-process parts (later lines win)."""
    latest: dict[str, dict[str, Any]] = {}
    for path in [out_dir / MANIFEST, *sorted(out_dir.glob(PART_GLOB))]:
        for record in read_manifest(path):
            latest[record["id"]] = record
    return latest


def merge_manifest(out_dir: str | Path) -> Path:
    """Fold the per-process parts into manifest.jsonl (one line per id, in item order), atomically."""
    from mixdiff_cli.core.fsutil import atomic_write

    out_dir = Path(out_dir)
    parts = sorted(out_dir.glob(PART_GLOB))
    main = out_dir / MANIFEST
    records = manifest_records(out_dir)
    lines = read_manifest(main)
    if parts or len(lines) != len(records) or (main.is_file() and not main.read_bytes().endswith(b"\n")):
        ordered = sorted(records.values(), key=lambda r: (r.get("index", 0), r["id"]))
        atomic_write(main, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
        for part in parts:
            part.unlink(missing_ok=True)
    return main


class Appender:
    """Appends one JSON line per record with flush + fsync, after cutting off a torn last line."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_file():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(path, "r+b") as fh:
                    fh.truncate(data.rfind(b"\n") + 1)
        self.fh = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()


def verified(out_dir: Path, record: dict[str, Any]) -> bool:
    """The record's file exists and its sha256 matches."""
    path = out_dir / str(record.get("path", ""))
    try:
        return path.is_file() and file_sha256(path) == record.get("sha256")
    except OSError:
        return False


def params(w: Work, blend: str | None) -> dict[str, Any]:
    """The values an item's image depends on, as its manifest line records them."""
    r = w.request
    return {
        "prompt": r.prompt, "negative": r.negative, "seed": r.seed, "steps": r.steps, "scheduler": r.scheduler, "route": [m.to_json() for m in w.route.members], "blend": blend,
    }


def _matches(record: dict[str, Any], w: Work, blend: str | None) -> bool:
    want = params(w, blend)
    if any(record.get(k) != want[k] for k in PARAM_KEYS):
        return False
    return all(getattr(w.request, k) is None or record.get(k) == getattr(w.request, k) for k in DEFAULTED_KEYS)


def already_done(out_dir: Path, record: dict[str, Any] | None, w: Work, blend: str | None) -> bool:
    """In the manifest with the same settings, and its file verifies (sha256)."""
    return record is not None and _matches(record, w, blend) and verified(out_dir, record)
