"""The expert catalog (`experts.yaml`): typed schema, strict loading, discovery and locked atomic writes.

Import-light on purpose: `mixdiff experts list` must not pay for torch.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mixdiff_cli import families
from mixdiff_cli.core.errors import CatalogError, CatalogNotFound, ExpertNotFound, InvalidName, ReadOnlyCatalog

CATALOG_NAME = "experts.yaml"
SCHEMA_VERSION = 1
KINDS = ("lora", "model")
FORMATS = ("diffusers", "peft", "kohya", "diffusers-model", "single-file")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# What `Catalog.hash` covers; router checkpoints record it (1: the base's source string and [name, sha256]).
IDENTITY_VERSION = 2
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
SAMPLE_WINDOWS, SAMPLE_BYTES = 16, 64 * 1024  # a base fingerprint reads at most 1 MiB per weight file
HEADER = "# mixdiff expert catalog (schema: README.md, 'The catalog'). Edit with `mixdiff` commands or by hand.\n"


def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
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
    _snapshot: _Snapshot | None = field(default=None, init=False, repr=False, compare=False)  # what it was read from

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


# --- strict loading -------------------------------------------------------------------------------

_STR, _INT, _NUM, _STRLIST = "a string", "an integer", "a number", "a list of strings"
_BAND = "a band [start, end] with 0 <= start < end <= 1"


def _spec(cls: type) -> dict[str, str | tuple[str, ...]]:
    specs: dict[type, dict[str, str | tuple[str, ...]]] = {
        Expert: {
            "name": _STR, "kind": KINDS, "source": _STR, "format": FORMATS, "sha256": _STR, "rank": _INT,
            "alpha": _NUM, "arch": families.names(), "description": _STR, "prompts": _STRLIST, "trigger": _STRLIST,
            "default_weight": _NUM, "tags": _STRLIST, "title": _STR, "preview": _STR, "added": _STR, "band": _BAND,
        },
        Base: {"source": _STR, "arch": families.names(), "sha256": _STR, "guidance": _NUM},
    }
    return specs[cls]


_REQUIRED = {Expert: ("name", "kind", "source", "format"), Base: ("source",)}


# libyaml's parser when PyYAML was built with it (`yaml.__with_libyaml__`): the same nodes and marks, ~10x faster
_PARSER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _construct(node: yaml.Node) -> Any:
    """A scalar node's value under the safe schema (a plain string without constructing anything)."""
    if node.tag == "tag:yaml.org,2002:str":
        return node.value
    return yaml.constructor.SafeConstructor().construct_object(node, deep=True)


class _Loader:
    def __init__(self, path: Path):
        self.path = path
        self.spans: list[tuple[int, int]] | None = None  # each expert's item in the text (see `_item_spans`)

    def fail(self, node: yaml.Node | None, what: str, hint: str) -> CatalogError:
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        return CatalogError(f"{self.path}{line}: {what}", hint)

    def scalar(self, node: yaml.Node, want: str | tuple[str, ...], key: str) -> Any:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return None
        try:
            value = _construct(node) if isinstance(node, yaml.ScalarNode) else None
        except yaml.YAMLError:  # a tag the safe loader does not know (!!python/..., !custom): never constructed
            raise self.fail(node, f"{key} has the tag {node.tag!r}", "write a plain value: a catalog holds no Python objects") from None
        if want == _STR and isinstance(value, (datetime.date, datetime.datetime)):
            value = value.isoformat()  # an unquoted `added: 2026-11-26` is a date to YAML
        ok = {
            _STR: isinstance(value, str),
            _INT: isinstance(value, int) and not isinstance(value, bool),
            _NUM: isinstance(value, (int, float)) and not isinstance(value, bool),
        }
        if isinstance(want, tuple):
            if value not in want:
                raise self.fail(node, f"{key} is {value!r}", f"use one of: {', '.join(want)}")
            return value
        if want == _BAND:
            bounds = [self.scalar(item, _NUM, f"{key}[{i}]") for i, item in enumerate(node.value)] if isinstance(node, yaml.SequenceNode) else []
            if len(bounds) != 2 or None in bounds or not 0 <= bounds[0] < bounds[1] <= 1:
                raise self.fail(node, f"{key} must be {_BAND}", f"write e.g. {key}: [0.8, 1.0] (the last 20% of the run)")
            return bounds
        if want == _STRLIST:
            if not isinstance(node, yaml.SequenceNode):
                raise self.fail(node, f"{key} must be {_STRLIST}", f"write e.g. {key}: [\"a watercolor painting\"]")
            items = [self.scalar(item, _STR, f"{key}[{i}]") for i, item in enumerate(node.value)]
            return [str(x) for x in items if x is not None]
        if not ok[want]:
            shown = "a mapping" if isinstance(node, yaml.MappingNode) else "a list" if isinstance(node, yaml.SequenceNode) else repr(value)
            raise self.fail(node, f"{key} must be {want}, got {shown}", f"fix the value of '{key}'")
        return float(value) if want == _NUM else value

    def mapping(self, node: yaml.Node, cls: type, where: str) -> Any:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{where} must be a mapping", "see README.md, 'The catalog', for the format")
        spec = _spec(cls)
        values: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key not in spec:
                raise self.fail(key_node, f"unknown key '{key}' in {where}", f"allowed keys: {', '.join(spec)}")
            if key in values:
                raise self.fail(key_node, f"duplicate key '{key}' in {where}", "keep one of them")
            values[key] = self.scalar(value_node, spec[key], key)
        for key in _REQUIRED[cls]:
            if values.get(key) is None:
                raise self.fail(node, f"{where} has no '{key}'", f"add '{key}:' to it")
        return cls(**{k: v for k, v in values.items() if v is not None})

    def catalog(self, text: str) -> Catalog:
        try:
            root = yaml.compose(text, Loader=_PARSER)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise CatalogError(f"{self.path}{line}: YAML syntax error: {problem}", "fix the file (indentation, quotes, colons)") from None
        if root is None:
            return Catalog(path=self.path)
        if not isinstance(root, yaml.MappingNode):
            raise self.fail(root, "the catalog must be a mapping with version, base, router and experts", "see README.md, 'The catalog'")
        cat = Catalog(path=self.path)
        seen: set[str] = set()
        for key_node, value_node in root.value:
            key = key_node.value
            if key in seen:
                raise self.fail(key_node, f"duplicate key '{key}'", "keep one of them")
            seen.add(key)
            if key == "version":
                cat.version = self.scalar(value_node, _INT, "version")
                if cat.version != SCHEMA_VERSION:
                    raise self.fail(value_node, f"catalog version {cat.version} is not supported", f"this mixdiff reads version {SCHEMA_VERSION}; upgrade mixdiff")
            elif key == "base":
                null = isinstance(value_node, yaml.ScalarNode) and value_node.tag.endswith(":null")
                cat.base = None if null else self.mapping(value_node, Base, "base")
            elif key == "router":
                cat.router = self.scalar(value_node, _STR, "router")
            elif key == "experts":
                null = isinstance(value_node, yaml.ScalarNode) and value_node.tag.endswith(":null")
                if not null and not isinstance(value_node, yaml.SequenceNode):
                    raise self.fail(value_node, "experts must be a list", "write 'experts:' followed by '- name: ...' items")
                names: set[str] = set()
                for item in [] if null else value_node.value:
                    exp = self.mapping(item, Expert, "an expert")
                    try:
                        check_name(exp.name)
                    except InvalidName as exc:
                        raise self.fail(item, exc.message, exc.hint or "") from None
                    if exp.name in names:
                        raise self.fail(item, f"expert name '{exp.name}' appears twice", "names must be unique; rename or remove one")
                    names.add(exp.name)
                    cat.experts.append(exp)
                last = root.value[-1][0] is key_node
                self.spans = _item_spans(text, value_node) if last and not null else None
            else:
                raise self.fail(key_node, f"unknown key '{key}'", "allowed keys: version, base, router, experts")
        return cat


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


def _item_spans(text: str, seq: yaml.Node) -> list[tuple[int, int]] | None:
    """Each item of the final `experts:` block list as [start, end) in `text`: from its '- ' line to the next
    item's (comments between them go with the item before), the last to the end of the text. None unless
    every item starts a line with '- ' at column 0, as `save_catalog` writes them."""
    if not isinstance(seq, yaml.SequenceNode) or seq.flow_style:
        return None
    starts = [0] + [m.end() for m in re.finditer("\n", text)]
    lines = [item.start_mark.line for item in seq.value]
    if any(item.start_mark.column != 2 or not text.startswith("- ", starts[line]) for item, line in zip(seq.value, lines)):
        return None
    bounds = [starts[line] for line in lines] + [len(text)]
    if re.search(r"^(---|\.\.\.)", text[bounds[-2] :], re.MULTILINE):  # a document marker after the list: items go before it
        return None
    return list(zip(bounds[:-1], bounds[1:]))


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


# --- discovery ------------------------------------------------------------------------------------


def user_data_dir() -> Path:
    """The platform's per-user data folder for mixdiff ($MIXDIFF_HOME overrides it)."""
    import sys

    if os.environ.get("MIXDIFF_HOME"):
        return Path(os.environ["MIXDIFF_HOME"]).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "mixdiff"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "mixdiff"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "mixdiff"


def user_catalog_path() -> Path:
    return user_data_dir() / CATALOG_NAME


def packaged_data_dir() -> Path:
    """mixdiff's own package data (the embedded demo): read-only to every mixdiff command and function."""
    return Path(__file__).parent.parent / "data"


def packaged_catalog_path() -> Path:
    """The embedded demo catalog shipped as package data."""
    return packaged_data_dir() / "demo" / CATALOG_NAME


def is_packaged(path: str | Path) -> bool:
    """Whether `path` lies inside mixdiff's package data (links and `..` resolved)."""
    return Path(os.path.realpath(Path(path).expanduser())).is_relative_to(os.path.realpath(packaged_data_dir()))


def check_writable(*paths: str | Path | None) -> None:
    """Refuse to write inside the packaged demo: a user's changes go to a catalog of their own."""
    for path in paths:
        if path is not None and is_packaged(path):
            raise ReadOnlyCatalog(
                f"{path} is part of the packaged demo, which mixdiff never modifies",
                "run 'mixdiff init' to create a catalog of your own, or pass --catalog PATH",
            )


def find_catalog(explicit: str | Path | None = None, *, must_exist: bool = True, for_write: bool = False) -> Path:
    """`--catalog`, then $MIXDIFF_CATALOG, then experts.yaml walking up from the cwd, then the user and
    packaged catalogs. With must_exist=False, return where a new catalog would go. With for_write=True
    (commands that change the catalog), never the packaged demo: without a catalog of the user's, fail."""
    path = _find_catalog(explicit, must_exist=must_exist, for_write=for_write)
    if for_write:
        check_writable(path)
    return path


def _find_catalog(explicit: str | Path | None, *, must_exist: bool, for_write: bool) -> Path:
    if explicit is not None:
        path = Path(explicit).expanduser()
        if path.is_dir():
            path = path / CATALOG_NAME
        if must_exist and not path.is_file():
            raise CatalogNotFound(f"catalog {path} does not exist", f"create it with 'mixdiff init --catalog {path}'")
        return path
    env = os.environ.get("MIXDIFF_CATALOG")
    if env:
        path = Path(env).expanduser()
        if must_exist and not path.is_file():
            raise CatalogNotFound(f"catalog {path} (from $MIXDIFF_CATALOG) does not exist", "create it with 'mixdiff init' or unset MIXDIFF_CATALOG")
        return path
    cwd = Path.cwd()
    if not must_exist:
        return cwd / CATALOG_NAME
    for folder in (cwd, *cwd.parents):
        if (folder / CATALOG_NAME).is_file():
            return folder / CATALOG_NAME
    for path in (user_catalog_path(), *([] if for_write else [packaged_catalog_path()])):
        if path.is_file():
            return path
    if for_write:
        raise CatalogNotFound(
            "no catalog here: run 'mixdiff init' to create one",
            "or pass --catalog PATH (the packaged demo catalog is read-only)",
        )
    raise CatalogNotFound(
        "no catalog found (no --catalog, no $MIXDIFF_CATALOG, no experts.yaml here or above, no user catalog)",
        "run 'mixdiff init --base PATH' to create one, or pass --catalog PATH",
    )
