"""Catalog operations: init, add (register), remove, verify. Inspect everything before writing anything."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mixdiff_cli.catalog import sources
from mixdiff_cli.catalog.geometry import Geometry, read_geometry
from mixdiff_cli.catalog.discovery import check_writable
from mixdiff_cli.catalog.model import Base, Catalog, CATALOG_NAME, check_name, Expert, slugify
from mixdiff_cli.catalog.schema import catalog_lock, edit_catalog, load_catalog, save_catalog
from mixdiff_cli.core.errors import CatalogError, DuplicateExpert, MixdiffError, MixdiffWarning, UsageError, VerifyFailed


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def base_arch(source_path: Path) -> str | None:
    """Architecture of a base model on disk (diffusers folder or single file), from configs/headers only."""
    from mixdiff_cli import families
    from mixdiff_cli.catalog.formats import inspect_source

    if (source_path / "model_index.json").is_file() and (family := families.of_folder(source_path)) is not None:
        return family.name
    return inspect_source(source_path, checksum=False).arch


def base_geometry(cat: Catalog) -> Geometry | None:
    """The base's UNet, text-encoder and scheduler configs, when the base is a local diffusers folder (or
    already cached); None otherwise."""
    if cat.base is None:
        return None
    try:
        path = sources.resolve(cat, cat.base.source)
    except MixdiffError:
        return None
    return read_geometry(path) if path.is_dir() else None


def init_catalog(path: str | Path | None = None, base: str | None = None, *, force: bool = False, from_demo: bool = False) -> Catalog:
    """Create a catalog file (refuses to overwrite one unless `force`). An existing catalog that has no base
    yet takes `base`. `from_demo`: a catalog of the user's holding the packaged demo's base, experts (their
    prompts, descriptions, guidance) and a copy of its router, to add experts to."""
    from mixdiff_cli.catalog.discovery import find_catalog

    path = find_catalog(path, must_exist=False)
    if path.is_dir():
        path = path / CATALOG_NAME
    if path.exists() and not force:
        if base is not None and not from_demo and load_catalog(path).base is None and not load_catalog(path).experts:
            with edit_catalog(path) as live:  # `init` first, `init --base` next: the base is the one thing to add
                live.base = make_base(live, base)
            return live
        raise CatalogError(f"catalog {path} already exists", "edit it with 'mixdiff add-expert', or pass --force to replace it")
    cat = _from_demo(path) if from_demo else Catalog(path=path)
    if base is not None:
        cat.base = make_base(cat, base)
    path.parent.mkdir(parents=True, exist_ok=True)
    with catalog_lock(path):
        save_catalog(cat)
    return cat


def _from_demo(path: Path) -> Catalog:
    """The packaged demo as a catalog at `path`: every source pointing at the packaged files, the router copied."""
    import dataclasses
    import shutil

    from mixdiff_cli.catalog.discovery import packaged_catalog_path
    from mixdiff_cli.core.fsutil import atomic_path
    from mixdiff_cli.routing.checkpoint import ROUTER_FILE

    demo = load_catalog(packaged_catalog_path())
    cat = Catalog(path=path)
    cat.base = dataclasses.replace(demo.base, source=cat.relative_source(demo.resolve(demo.base.source)))
    cat.experts = [dataclasses.replace(e, source=cat.relative_source(demo.resolve(e.source))) for e in demo.experts]
    if demo.router_path() is not None:
        with atomic_path(path.parent / ROUTER_FILE) as tmp:
            shutil.copyfile(demo.router_path(), tmp)
        cat.router = ROUTER_FILE
    return cat


def make_base(cat: Catalog, source: str) -> Base:
    """A Base entry for `source`; local paths must exist and are stored relative to the catalog."""
    if sources.is_hub(source):
        sources.parse_hub(source)
        return Base(source=source)
    path = Path(source).expanduser()
    if not path.exists():
        raise UsageError(f"base model {source} does not exist", "pass a diffusers folder, a .safetensors checkpoint or hf://org/repo@revision")
    return Base(source=cat.relative_source(path), arch=base_arch(path), guidance=_known_guidance(path))


def _known_guidance(path: Path) -> float | None:
    """The guidance the packaged demo's catalog gives this base, when it is the demo's base (else None)."""
    from mixdiff_cli.catalog.discovery import packaged_catalog_path

    demo = load_catalog(packaged_catalog_path())
    same = demo.base is not None and Path(os.path.realpath(demo.resolve(demo.base.source))) == Path(os.path.realpath(path))
    return demo.base.guidance if same else None


@dataclass
class Inspected:
    """What `add-expert` learned about a source before touching the catalog."""

    expert: Expert
    local_path: Path
    file: Path | None  # the weights file hashed (None for folders hashed as a whole)


@dataclass
class ExpertOptions:
    """What the user says about an expert being added; None: what its files say, else the default."""

    name: str | None = None  # default: a slug of the file's title or name
    kind: str | None = None  # the kind the source must be (lora, model)
    prompts: list[str] | None = None  # what the router learns from
    trigger: list[str] | None = None
    description: str | None = None
    weight: float | None = None  # default weight in a blend
    tags: list[str] | None = None


def inspect_candidate(cat: Catalog, source: str, options: ExpertOptions | None = None) -> Inspected:
    """Read headers, detect format/architecture, hash, check fit with the base. Writes nothing."""
    from mixdiff_cli import families
    from mixdiff_cli.catalog.fit import ArchitectureMismatch, fits_base
    from mixdiff_cli.catalog.formats import inspect_source

    if sources.is_hub(source):
        local = sources.fetch(source)
        stored = sources.pin(source, local)  # hf://...@<commit>: the catalog names exactly what was hashed
    else:
        local = Path(source).expanduser()
        stored = cat.relative_source(local)
    info = inspect_source(local)
    opts = options or ExpertOptions()
    if opts.kind is not None and opts.kind != info.kind:
        raise UsageError(f"{source} is a {info.kind}, not a {opts.kind}", f"drop --kind or pass --kind {info.kind}")

    base = base_geometry(cat)
    if base is not None:
        reason = fits_base(info, base)
        if reason:
            raise ArchitectureMismatch(reason, "add it to a catalog whose base has the same architecture")
    elif cat.base is not None and cat.base.arch and info.arch and info.arch != cat.base.arch:
        raise ArchitectureMismatch(
            f"{info.kind} for {families.label(info.arch)}, base is {families.label(cat.base.arch)}",
            "add it to a catalog whose base has the same architecture",
        )

    stem = local.stem if local.is_file() else local.name
    expert_name = check_name(opts.name) if opts.name is not None else slugify(info.title or stem)
    preview = preview_image(local) if local.is_file() else None
    if expert_name in cat.names:
        raise DuplicateExpert(f"an expert named {expert_name!r} already exists in {cat.path}", "pass --name with another name, or remove the old one first")
    expert = Expert(
        name=expert_name,
        kind=info.kind,
        source=stored,
        format=info.format,
        sha256=info.sha256,
        rank=info.rank,
        alpha=info.alpha,
        arch=info.arch or (cat.base.arch if cat.base else None),
        description=opts.description if opts.description is not None else (info.description or ""),
        prompts=list(opts.prompts or []),
        trigger=list(opts.trigger) if opts.trigger else list(info.trigger or []),
        default_weight=opts.weight if opts.weight is not None else float(info.preferred_weight or 1.0),
        tags=list(dict.fromkeys([*(opts.tags or []), *shipped_tags(info.metadata)])),
        title=info.title,
        preview=cat.relative_source(preview) if preview else None,
        added=_now(),
    )
    return Inspected(expert=expert, local_path=local, file=info.file)


def shipped_tags(metadata: dict[str, str], limit: int = 16) -> list[str]:
    """The `limit` most frequent of kohya's training-caption tags (`ss_tag_frequency`: {dataset: {tag: count}})."""
    counts: dict[str, int] = {}
    try:
        for tags in json.loads(metadata.get("ss_tag_frequency") or "{}").values():
            for tag, n in tags.items():
                if tag := str(tag).strip():
                    counts[tag] = counts.get(tag, 0) + int(n)
    except (ValueError, AttributeError, TypeError):
        return []
    return [t for t, _ in sorted(counts.items(), key=lambda tc: (-tc[1], tc[0]))[:limit]]


PREVIEW_SUFFIXES = (".preview.png", ".png", ".preview.jpg", ".jpg", ".preview.jpeg", ".jpeg", ".preview.webp", ".webp")


def preview_image(weights: Path) -> Path | None:
    """The preview A1111 / ComfyUI show for a weights file: NAME.preview.png, NAME.png (or .jpg, .webp) beside it."""
    for suffix in PREVIEW_SUFFIXES:
        path = weights.with_name(weights.stem + suffix)
        if path.is_file():
            return path
    return None


def add_expert(
    catalog_path: str | Path,
    source: str,
    options: ExpertOptions | None = None,
    *,
    copy: bool = False,
    **fields: Any,
) -> Expert:
    """Inspect `source`, then append it to the catalog under the lock (optionally copying it beside the catalog).

    `fields`: ExpertOptions fields given one by one (name=..., prompts=...), over `options`."""
    catalog_path = Path(catalog_path)
    check_writable(catalog_path)  # before hashing anything: the packaged demo is read-only
    options = replace(options or ExpertOptions(), **fields)
    read = load_catalog(catalog_path)
    found = inspect_candidate(read, source, options)
    expert = found.expert
    with edit_catalog(catalog_path, reuse=read) as cat:
        if expert.name in cat.names:  # another process added it since we looked
            raise DuplicateExpert(f"an expert named {expert.name!r} already exists in {cat.path}", "pass --name with another name")
        if copy and not sources.is_hub(source):
            expert.source = cat.relative_source(copy_into(cat, found.local_path, expert.name))
        cat.experts.append(expert)
    router_after_change(cat, added=expert.name)
    return expert


def copy_into(cat: Catalog, local: Path, name: str) -> Path:
    """Copy an expert's files into `experts/` beside the catalog (atomically: copy, then rename)."""
    from mixdiff_cli.core.fsutil import atomic_folder, atomic_path

    dest_dir = cat.root / "experts"
    peft_file = local.is_file() and (local.parent / "adapter_config.json").is_file()
    if peft_file:  # a PEFT adapter's weights: its folder goes whole, its config with it (never one shared config)
        if (dest_dir / name).exists():
            raise DuplicateExpert(f"{dest_dir / name} already exists", "remove it or pass another --name")
        with atomic_folder(dest_dir / name) as tmp:
            shutil.copyfile(local, tmp / local.name)
            shutil.copyfile(local.parent / "adapter_config.json", tmp / "adapter_config.json")
        return dest_dir / name / local.name
    dest = dest_dir / (f"{name}{local.suffix}" if local.is_file() else name)
    if dest.exists():
        raise DuplicateExpert(f"{dest} already exists", "remove it or pass another --name")
    if local.is_file():
        with atomic_path(dest) as tmp:
            shutil.copyfile(local, tmp)
        sidecar = local.with_suffix(".json")  # kohya / Civitai metadata beside the file
        if sidecar.is_file():
            shutil.copyfile(sidecar, dest_dir / (dest.stem + ".json"))
    else:
        with atomic_folder(dest) as tmp:
            shutil.copytree(local, tmp, dirs_exist_ok=True)
    return dest


def remove_expert(catalog_path: str | Path, name: str) -> Expert:
    """Drop an expert from the catalog (its files stay where they are)."""
    with edit_catalog(catalog_path) as cat:
        expert = cat.expert(name)
        cat.experts.remove(expert)
    router_after_change(cat, removed=name)
    return expert


def router_after_change(cat: Catalog, *, added: str | list[str] | None = None, removed: str | None = None) -> None:
    """Keep a trained router in step with the catalog without retraining (no forgetting); `added`: one
    name or all the names one write added."""
    if cat.router is None:
        return
    from mixdiff_cli.routing.sync import drop_router_row, extend_router

    try:
        check_writable(cat.router_path())  # e.g. a catalog whose router is the packaged demo's
        if added:
            extend_router(load_catalog(cat.path), added)
        if removed:
            drop_router_row(load_catalog(cat.path), removed)
    except MixdiffError as exc:
        change = f"added {added if isinstance(added, str) else ', '.join(added)}" if added else f"removed {removed}"
        hint = exc.hint or "run 'mixdiff router train' to write it"  # one hint: the cause's own, else the retrain
        warnings.warn(f"{change}, but the router checkpoint was not updated ({exc.message}); routing takes the change in "
                      f"from the catalog. {hint[:1].upper()}{hint[1:]}", MixdiffWarning, stacklevel=2)


@dataclass
class VerifyResult:
    name: str
    status: str  # ok, missing, mismatch, remote
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail}


def expert_file(cat: Catalog, expert: Expert) -> Path:
    """The file whose sha256 the catalog records (the weights file inside a folder source)."""
    from mixdiff_cli.catalog.formats import inspect_source

    path = sources.resolve(cat, expert.source)
    return path if path.is_file() else inspect_source(path, checksum=False).file


def verify_experts(cat: Catalog, names: list[str] | None = None) -> list[VerifyResult]:
    """Check every expert's files exist and their sha256 matches the catalog."""
    from mixdiff_cli.catalog.headers import sha256_file

    results = []
    for expert in [cat.expert(n) for n in names] if names else cat.experts:
        if sources.is_hub(expert.source):
            try:
                path = sources.fetch(expert.source)
            except MixdiffError as exc:
                results.append(VerifyResult(expert.name, "missing", exc.message))
                continue
        else:
            path = cat.resolve(expert.source)
        if not path.exists():
            results.append(VerifyResult(expert.name, "missing", f"{path} not found"))
            continue
        if not expert.sha256:
            results.append(VerifyResult(expert.name, "ok", "no hash recorded"))
            continue
        try:
            digest = sha256_file(path if path.is_file() else expert_file(cat, expert))
        except MixdiffError as exc:
            results.append(VerifyResult(expert.name, "missing", exc.message))
            continue
        if digest != expert.sha256:
            results.append(VerifyResult(expert.name, "mismatch", f"sha256 {digest[:10]} != catalog {expert.sha256[:10]}"))
        else:
            results.append(VerifyResult(expert.name, "ok", expert.sha256[:10]))
    return results


def check_verified(results: list[VerifyResult]) -> None:
    bad = [r for r in results if r.status != "ok"]
    if bad:
        names = ", ".join(f"{r.name} ({r.status})" for r in bad)
        raise VerifyFailed(f"{len(bad)} expert(s) failed verification: {names}", "re-add moved files with 'mixdiff add-expert' or fix the paths in the catalog")


def expert_rows(cat: Catalog, experts: list[Expert] | None = None) -> list[dict]:
    """Table rows for `experts list` (of `experts`, default all the catalog's)."""
    return [
        {
            "name": e.name, "kind": e.kind, "format": e.format, "arch": e.arch, "rank": e.rank,
            "weight": e.default_weight, "hash": e.short_hash, "trigger": ", ".join(e.trigger),
            "tags": ", ".join(e.tags), "source": e.source, "description": e.description,
        }
        for e in (cat.experts if experts is None else experts)
    ]


@dataclass
class ExpertQuery:
    """Which experts `experts list` shows: those with every tag of `tags` (case-insensitive), this `arch`
    and `format`, and `search` in their name, title, description, trigger words, tags, prompts or source."""

    search: str | None = None
    tags: list[str] | None = None
    arch: str | None = None
    format: str | None = None


def select_experts(cat: Catalog, query: ExpertQuery) -> list[Expert]:
    """The catalog's experts that match `query`, in catalog order."""
    want_tags = {t.strip().lower() for t in query.tags or []}
    term = (query.search or "").strip().lower()

    def matches(e: Expert) -> bool:
        if (query.arch and e.arch != query.arch) or (query.format and e.format != query.format):
            return False
        if want_tags and not want_tags <= {t.lower() for t in e.tags}:
            return False
        texts = [e.name, e.title or "", e.description, e.source, *e.trigger, *e.tags, *e.prompts]
        return not term or any(term in t.lower() for t in texts)

    return [e for e in cat.experts if matches(e)]
