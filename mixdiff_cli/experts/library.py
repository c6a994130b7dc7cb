"""Whole LoRA libraries in one command: an A1111/Forge `models/Lora` or ComfyUI `models/loras` folder.

    result = import_library("experts.yaml", ["~/sd/models/Lora"], progress=lambda done, total: ...)
    [(r.status, r.name, r.reason) for r in result.rows]     # added | present | refused

Every weights file under the folders is inspected as `add-expert FILE` inspects one (headers, sidecar,
preview, fit with the base) and hashed, in parallel threads (hashlib and file reads release the GIL).
Names come from the file names, slugified; a name already taken gets -2, -3, ... in path order, so the
same folder always gets the same names. A file whose sha256 the catalog already holds is "present", not
added twice. What is left is appended in one locked, atomic catalog write; files that cannot be used
are "refused" with the reason, and the good ones still land.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from mixdiff_cli.catalog import sources
from mixdiff_cli.catalog.discovery import check_writable
from mixdiff_cli.catalog.model import Catalog, slugify
from mixdiff_cli.catalog.schema import catalog_lock, load_catalog, save_catalog
from mixdiff_cli.core.errors import MixdiffError
from mixdiff_cli.experts.manage import ExpertOptions, Inspected, copy_into, inspect_candidate, router_after_change

Status = Literal["added", "present", "refused"]
# What a library folder may hold that is a model: safetensors, and pickles (refused by name, never opened).
WEIGHT_SUFFIXES = frozenset({".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
# A folder holding one of these is one model or adapter, not a library to walk.
MODEL_MARKERS = ("adapter_config.json", "model_index.json", "unet/config.json", "config.json", "pytorch_lora_weights.safetensors")


class EmptyLibrary(MixdiffError):
    """The folders given hold no weights file."""


class FilesRefused(MixdiffError):
    """Some files of an import could not be added (the others were)."""


@dataclass
class ImportRow:
    """What became of one file: added as `name`, already present as `name`, or refused for `reason`."""

    source: str
    status: Status
    name: str | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "status": self.status, "name": self.name, "reason": self.reason}


@dataclass
class ImportResult:
    catalog: Path
    rows: list[ImportRow] = field(default_factory=list)
    skipped: int = 0  # files that are not weights (sidecars, previews, notes)
    dry_run: bool = False

    def count(self, status: Status) -> int:
        return sum(1 for r in self.rows if r.status == status)

    def to_dict(self) -> dict[str, Any]:
        counts = {s: self.count(s) for s in ("added", "present", "refused")}
        return {"catalog": str(self.catalog), "dry_run": self.dry_run, **counts, "skipped": self.skipped, "rows": [r.to_dict() for r in self.rows]}

    def check(self) -> None:
        """Raise `FilesRefused` naming the refused files (exit 1), after the good ones landed."""
        refused = [r for r in self.rows if r.status == "refused"]
        if refused:
            names = ", ".join(Path(r.source).name for r in refused[:5]) + (f" and {len(refused) - 5} more" if len(refused) > 5 else "")
            done = "would be added" if self.dry_run else "were added"
            raise FilesRefused(f"{len(refused)} file(s) refused: {names}", f"the reasons are in the table above; the other files {done}")


def is_model_folder(path: Path) -> bool:
    """Whether a folder is one model or adapter (PEFT, diffusers) rather than a library of files."""
    return any((path / marker).is_file() for marker in MODEL_MARKERS)


def find_weights(paths: Sequence[str | Path]) -> tuple[list[str], int]:
    """(sources to inspect, number of other files skipped): files and hub sources as given; folders walked
    recursively (hidden entries skipped; linked folders followed, each real folder once), a model folder
    counting as one. Each folder's finds are in path order."""
    found: list[str] = []
    skipped = 0
    for given in map(str, paths):
        path = Path(given).expanduser()
        if sources.is_hub(given) or not path.is_dir() or is_model_folder(path):
            found.append(given)  # inspection says what is wrong with a missing path or a file that is not weights
            continue
        mine: list[Path] = []
        seen: set[str] = set()
        for folder, dirs, files in os.walk(path, followlinks=True):
            here = Path(folder)
            if os.path.realpath(here) in seen:  # a link back up the tree, or a second link to one folder
                dirs[:] = []
                continue
            seen.add(os.path.realpath(here))
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for d in [d for d in dirs if is_model_folder(here / d)]:
                mine.append(here / d)
                dirs.remove(d)
            for name in files:
                if not name.startswith(".") and Path(name).suffix.lower() in WEIGHT_SUFFIXES and (here / name).is_file():
                    mine.append(here / name)
                else:
                    skipped += 1
        found += [str(p) for p in sorted(mine, key=lambda p: p.relative_to(path).as_posix())]
    return list(dict.fromkeys(found)), skipped


def is_library(paths: Sequence[str | Path]) -> bool:
    """Whether `paths` call for a library import (several sources, or a folder that is not one model and
    does not hold exactly one weights file directly) rather than `add_expert` of one source."""
    if len(paths) != 1:
        return True
    path = Path(str(paths[0])).expanduser()
    if sources.is_hub(str(paths[0])) or not path.is_dir() or is_model_folder(path):
        return False
    found, _ = find_weights([path])
    return not (len(found) == 1 and Path(found[0]).parent == path and found[0].endswith(".safetensors"))


def _stem(source: str) -> str:
    """The file or folder name a source's expert is named after (hub: the file's, without @revision)."""
    if sources.is_hub(source):
        return Path(source.split("@", 1)[0].rstrip("/")).stem
    path = Path(source).expanduser()
    return path.name if path.is_dir() else path.stem


def unique_name(stem: str, taken: set[str]) -> str:
    """`stem` slugified, with -2, -3, ... when the name is taken (kept within the 64-character limit)."""
    base = slugify(stem)
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base[: 64 - len(str(n)) - 1].rstrip('-_')}-{n}"
    return name


def _inspect_all(
    cat: Catalog, found: list[str], options: ExpertOptions, workers: int | None, progress: Callable[[int, int], None] | None
) -> list[Inspected | MixdiffError | OSError]:
    """Each source's `Inspected` or the error that refused it, inspected and hashed in parallel threads."""
    probe = Catalog(path=cat.path, base=cat.base)  # no experts: the name is chosen later, across the whole import
    opts = replace(options, name=None)

    def one(source: str) -> Inspected | MixdiffError | OSError:
        try:
            return inspect_candidate(probe, source, opts)
        except (MixdiffError, OSError) as exc:
            return exc

    results: dict[int, Inspected | MixdiffError | OSError] = {}
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        futures = {pool.submit(one, source): i for i, source in enumerate(found)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            if progress:
                progress(len(results), len(found))
    return [results[i] for i in range(len(found))]


def _plan(cat: Catalog, found: list[str], inspected: list[Inspected | MixdiffError | OSError], rows: list[ImportRow]) -> list[Inspected]:
    """Decide each file in order: refused (its error), present (its sha256 is in the catalog or came
    earlier in this import) or added under a unique name. Returns the experts to add."""
    held = {e.sha256: e.name for e in cat.experts if e.sha256}
    taken = set(cat.names)
    new: list[Inspected] = []
    for source, got in zip(found, inspected):
        if not isinstance(got, Inspected):
            reason = got.message if isinstance(got, MixdiffError) else f"{got.strerror or got}: {got.filename or source}"
            rows.append(ImportRow(source, "refused", reason=reason))
            continue
        sha = got.expert.sha256
        if sha and sha in held:
            rows.append(ImportRow(source, "present", held[sha], f"same file as {held[sha]} (sha256 {sha[:10]})"))
            continue
        got.expert.name = unique_name(_stem(source), taken)
        taken.add(got.expert.name)
        if sha:
            held[sha] = got.expert.name
        rows.append(ImportRow(source, "added", got.expert.name))
        new.append(got)
    return new


def import_library(
    catalog_path: str | Path,
    paths: Sequence[str | Path],
    *,
    options: ExpertOptions | None = None,
    dry_run: bool = False,
    copy: bool = False,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ImportResult:
    """Add every weights file under `paths` (folders walked recursively, files and hub sources as given)
    to the catalog in one write. `options` apply to every file (tags, weight, kind; not a name).
    `progress(done, total)` is called as files are inspected. Refusals are rows, not exceptions:
    call `ImportResult.check()` to raise on them."""
    catalog_path = Path(catalog_path)
    check_writable(catalog_path)  # before hashing anything: the packaged demo is read-only
    found, skipped = find_weights(paths)
    if not found:
        shown = ", ".join(map(str, paths))
        raise EmptyLibrary(f"{shown} holds no weights files (.safetensors)", "point at a LoRA folder such as models/Lora, or at the files")
    result = ImportResult(catalog=catalog_path, skipped=skipped, dry_run=dry_run)
    inspected = _inspect_all(load_catalog(catalog_path), found, options or ExpertOptions(), workers, progress)
    if dry_run:
        _plan(load_catalog(catalog_path), found, inspected, result.rows)
        return result
    with catalog_lock(catalog_path):  # decided under the lock, against the catalog as it is now; one write
        live = load_catalog(catalog_path)
        new = _plan(live, found, inspected, result.rows)
        for got in new:
            if copy and not sources.is_hub(got.expert.source):
                got.expert.source = live.relative_source(copy_into(live, got.local_path, got.expert.name))
        if new:
            live.experts.extend(got.expert for got in new)
            save_catalog(live)
    if new:
        router_after_change(live, added=[got.expert.name for got in new])
    return result

