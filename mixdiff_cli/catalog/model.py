"""The typed catalog: `Expert`, `Base`, `Catalog`, expert names and identity hashes. Import-light."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mixdiff_cli.core.errors import ExpertNotFound, InvalidName

CATALOG_NAME = "experts.yaml"
SCHEMA_VERSION = 1
KINDS = ("lora", "model")
FORMATS = ("diffusers", "peft", "kohya", "diffusers-model", "single-file")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # whole names only: fullmatch ("$" lets "name\n" pass)
# What `Catalog.hash` covers; router checkpoints record it (1: the base's source string and [name, sha256]).
IDENTITY_VERSION = 2
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
SAMPLE_WINDOWS, SAMPLE_BYTES = 16, 64 * 1024  # a base fingerprint reads at most 1 MiB per weight file
HEADER = "# mixdiff expert catalog (schema: README.md, 'The catalog'). Edit with `mixdiff` commands or by hand.\n"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidName(
            f"invalid expert name {name!r}",
            "use 1-64 lowercase letters, digits, '-' or '_', starting with a letter or digit (e.g. 'watercolor-v2')",
        )
    return name


def slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-_")
    return slug[:64] or "expert"


@dataclass
class Expert:
    name: str
    kind: str
    source: str  # relative to the catalog file, absolute, or hf://org/repo[/file]@revision
    format: str
    sha256: str | None = None
    rank: int | None = None
    alpha: float | None = None
    arch: str | None = None  # the base architecture it fits: sd1, sd2, sdxl
    description: str = ""
    prompts: list[str] = field(default_factory=list)  # example prompts the router learns from
    trigger: list[str] = field(default_factory=list)  # trigger words that force this expert
    default_weight: float = 1.0
    tags: list[str] = field(default_factory=list)  # the user's (--tag) and the file's (kohya ss_tag_frequency)
    title: str | None = None  # the title the file ships (modelspec.title, kohya ss_output_name)
    preview: str | None = None  # a preview image beside the weights (NAME.preview.png, NAME.png), as `source`
    added: str | None = None  # ISO 8601 timestamp
    band: list[float] | None = None  # [start, end]: the part of the sampling run it takes by default (None: all)

    @property
    def short_hash(self) -> str:
        """AutoV2: the first 10 hex digits of sha256, as model sites show it."""
        return (self.sha256 or "")[:10]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def identity(self) -> dict[str, str | None]:
        """What the expert is, wherever its file lies: name, kind, arch and file hash (without a hash, a hub
        source `hf://org/repo/file@revision` names the content; a local path does not)."""
        hub = self.source if self.sha256 is None and self.source.startswith("hf://") else None
        return {"name": self.name, "kind": self.kind, "arch": self.arch, "sha256": self.sha256, "hub": hub}


@dataclass
class Base:
    source: str  # local diffusers folder, single-file checkpoint, or hf://org/repo@revision
    arch: str | None = None
    sha256: str | None = None
    guidance: float | None = None  # default guidance scale for this base (None: the pipeline's, 7.5 SD / 5.0 SDXL)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass
class Catalog:
    path: Path
    base: Base | None = None
    router: str | None = None  # router checkpoint, relative to the catalog file
    experts: list[Expert] = field(default_factory=list)
    version: int = SCHEMA_VERSION
    _snapshot: Any = field(default=None, init=False, repr=False, compare=False)  # what it was read from

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def expert(self, name: str) -> Expert:
        for exp in self.experts:
            if exp.name == name:
                return exp
        known = ", ".join(self.names) or "none"
        raise ExpertNotFound(
            f"no expert named {name!r} in {self.path}",
            f"known experts: {known}. Run 'mixdiff experts list' to see them",
        )

    def resolve(self, source: str) -> Path:
        """A local source as a path (relative sources are relative to the catalog file)."""
        if source.startswith("hf://"):
            raise ValueError("hub sources are resolved by mixdiff_cli.catalog.sources.resolve")
        path = Path(source).expanduser()
        return path if path.is_absolute() else (self.root / path)

    def relative_source(self, path: Path) -> str:
        """How to write a local path into the catalog: relative when under the catalog folder."""
        path = Path(os.path.abspath(path))
        try:
            return path.relative_to(Path(os.path.abspath(self.root))).as_posix()
        except ValueError:
            return str(path)

    def router_path(self) -> Path | None:
        return None if self.router is None else self.resolve(self.router)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "base": self.base.to_dict() if self.base else None,
            "router": self.router,
            "experts": [e.to_dict() for e in self.experts],
        }

    def base_identity(self) -> dict[str, str | None] | None:
        """What the base is, wherever it lies: its arch and content, the recorded sha256, else the hub source,
        else a fingerprint of the local weights (None when they are not there)."""
        if self.base is None:
            return None
        if self.base.sha256:
            content = f"sha256:{self.base.sha256}"
        elif self.base.source.startswith("hf://"):
            content = self.base.source
        else:
            sample = weights_fingerprint(self.resolve(self.base.source))
            content = sample and f"sample:{sample}"
        return {"arch": self.base.arch, "content": content}

    def hash(self) -> str:
        """Identity of what the router sees: the base's and each expert's identity, in order. No paths: a
        catalog elsewhere that points at the same files hashes the same."""
        return identity_hash(self.base_identity(), [e.identity() for e in self.experts])


def identity_hash(base: dict[str, str | None] | None, experts: list[dict[str, str | None]]) -> str:
    """sha256 of a base identity and expert identities (`Catalog.base_identity`, `Expert.identity`)."""
    ident = {"identity": IDENTITY_VERSION, "base": base, "experts": experts}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def weights_fingerprint(path: Path) -> str | None:
    """A content fingerprint of a model file or folder that reads at most 1 MiB per weight file: each
    file's path inside the folder, its size and 16 evenly spaced 64 KiB windows (the whole file when
    smaller), sampled as imohash does (github.com/kalafut/imohash). None when there are no weights."""
    if path.is_file():
        files = [(path, "")]
    elif path.is_dir():
        found = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
        files = [(p, rel) for rel, p in found if not rel.startswith(".") and "/." not in rel]  # not .cache/ etc.
    else:
        return None
    if not files:
        return None
    h = hashlib.sha256()
    try:
        for file, rel in files:
            size = file.stat().st_size
            h.update(f"{rel}\0{size}\0".encode())
            with open(file, "rb") as fh:
                if size <= SAMPLE_WINDOWS * SAMPLE_BYTES:
                    h.update(fh.read())
                    continue
                for i in range(SAMPLE_WINDOWS):
                    fh.seek(i * (size - SAMPLE_BYTES) // (SAMPLE_WINDOWS - 1))
                    h.update(fh.read(SAMPLE_BYTES))
    except OSError:
        return None
    return h.hexdigest()


