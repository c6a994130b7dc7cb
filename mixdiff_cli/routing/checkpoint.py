"""Router checkpoints: the gate's tensors plus what it was made for (experts, base, encoder), in a
safetensors file (never pickle) written atomically; and why a checkpoint no longer fits a catalog."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mixdiff_cli.catalog.model import Catalog, identity_hash, IDENTITY_VERSION
from mixdiff_cli.routing.errors import RouterError
from mixdiff_cli.routing.gate import Gate

FORMAT = "mixdiff-router"
FORMAT_VERSION = "1"
ROUTER_FILE = "router.safetensors"


@dataclass
class Checkpoint:
    """A router file: the gate's tensors plus what it was made for."""

    gate: Gate
    experts: list[dict[str, str | None]]  # [{**Expert.identity(), "row": "trained" | "prototype"}] in gate row order
    encoder: str
    catalog_hash: str
    base: dict[str, str | None] | None  # Catalog.base_identity()
    kind: Literal["prototypes", "trained"] = "trained"
    training: dict[str, Any] = field(default_factory=dict)
    key: str | None = None  # prototype cache key
    identity: int = IDENTITY_VERSION  # how catalog_hash was computed (catalog.IDENTITY_VERSION)
    path: Path | None = None  # where it was read from (not stored)

    @property
    def names(self) -> list[str]:
        return [str(e["name"]) for e in self.experts]

    def metadata(self) -> dict[str, str]:
        """The safetensors header metadata (strings only)."""
        meta = {
            "format": "pt",
            "mixdiff.format": FORMAT,
            "mixdiff.version": FORMAT_VERSION,
            "mixdiff.kind": self.kind,
            "mixdiff.experts": json.dumps(self.experts),
            "mixdiff.encoder": self.encoder,
            "mixdiff.catalog_hash": self.catalog_hash,
            "mixdiff.identity": str(self.identity),
            "mixdiff.base": json.dumps(self.base),
            "mixdiff.hidden": str(self.gate.hidden),
            "mixdiff.input_dim": str(self.gate.dim),
            "mixdiff.training": json.dumps(self.training),
        }
        if self.key:
            meta["mixdiff.cache_key"] = self.key
        return meta


def identities(catalog: Catalog) -> list[dict[str, str | None]]:
    """The identity of each of the catalog's experts, in catalog order."""
    return [e.identity() for e in catalog.experts]


def for_catalog(gate: Gate, catalog: Catalog, encoder: str, **extra: Any) -> Checkpoint:
    """A checkpoint of `gate` made for `catalog`'s experts (rows "trained", or "prototype" for kind="prototypes")."""
    row = "prototype" if extra.get("kind") == "prototypes" else "trained"
    return Checkpoint(
        gate=gate, experts=[{**x, "row": row} for x in identities(catalog)], encoder=encoder,
        catalog_hash=catalog.hash(), base=catalog.base_identity(), **extra,
    )


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    """Write a router checkpoint atomically (safetensors)."""
    from safetensors.torch import save_file

    from mixdiff_cli.core.fsutil import atomic_path

    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(ckpt.gate.tensors(), str(tmp), metadata=ckpt.metadata())
    return Path(path)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a router checkpoint (safetensors only; never unpickles)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    bad = RouterError(f"{path} is not a mixdiff router checkpoint", "run 'mixdiff router train' to make one")
    try:
        with safe_open(str(path), "pt") as fh:
            meta = dict(fh.metadata() or {})
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise RouterError(f"router checkpoint {path} does not exist", "run 'mixdiff router train', or set 'router: null' in the catalog") from None
    except (SafetensorError, OSError, ValueError):
        raise bad from None
    if meta.get("mixdiff.format") != FORMAT:
        raise bad
    if meta.get("mixdiff.version") != FORMAT_VERSION:
        raise RouterError(f"{path} is router format {meta.get('mixdiff.version')}; this mixdiff reads {FORMAT_VERSION}", "run 'mixdiff router train'")
    try:
        gate = Gate.from_tensors(tensors)
        ckpt = Checkpoint(
            gate=gate,
            experts=json.loads(meta["mixdiff.experts"]),
            encoder=meta["mixdiff.encoder"],
            catalog_hash=meta["mixdiff.catalog_hash"],
            base=json.loads(meta.get("mixdiff.base", "null")),
            kind=meta.get("mixdiff.kind", "trained"),  # type: ignore[arg-type]
            training=json.loads(meta.get("mixdiff.training", "{}")),
            key=meta.get("mixdiff.cache_key"),
            identity=int(meta.get("mixdiff.identity", "1")),
            path=path,
        )
    except (KeyError, ValueError, TypeError):
        raise bad from None
    e, d = len(ckpt.experts), gate.dim
    shapes_ok = gate.weight.shape == (e, d) and gate.bias.shape == (e,) and (gate.own_cos is None or gate.own_cos.shape == (e,)) and (
        gate.w1 is None or (gate.b1 is not None and gate.w2 is not None and gate.w2.shape == (d, gate.hidden) and gate.w1.shape[1] == d)
    )
    if not shapes_ok:
        raise RouterError(f"{path}: tensor shapes do not match its {e} experts", "the file is damaged; run 'mixdiff router train'")
    return ckpt


# --- staleness ------------------------------------------------------------------------------------


def recorded(row: dict[str, str | None]) -> dict[str, str | None]:
    """A checkpoint's expert entry without its row kind: the expert's identity when it was made."""
    return {k: v for k, v in row.items() if k != "row"}


def fits(ckpt: Checkpoint, catalog: Catalog, experts: list[dict[str, str | None]] | None = None) -> bool:
    """Whether `ckpt` was made for `catalog` (with `experts`, identities, in place of its own)."""
    experts = identities(catalog) if experts is None else experts
    return ckpt.identity == IDENTITY_VERSION and ckpt.catalog_hash == identity_hash(catalog.base_identity(), experts)


def _show_base(ident: dict[str, str | None] | None) -> str:
    if not isinstance(ident, dict):
        return repr(ident)
    content = ident.get("content") or "weights not found"
    scheme, sep, digest = content.partition(":")
    if sep and scheme in ("sha256", "sample"):
        content = f"{scheme} {digest[:10]}"
    return f"{ident.get('arch') or 'arch unknown'}, {content}"


def stale_reason(ckpt: Checkpoint, catalog: Catalog) -> str | None:
    """Why `ckpt` does not fit `catalog` (None when it fits)."""
    if fits(ckpt, catalog):
        return None
    if ckpt.identity != IDENTITY_VERSION:
        return f"it records catalog identity {ckpt.identity}; this mixdiff writes identity {IDENTITY_VERSION}"
    if ckpt.base != (base := catalog.base_identity()):
        return f"it was made for another base ({_show_base(ckpt.base)}), the catalog's base is {_show_base(base)}"
    have, want = ckpt.names, catalog.names
    if have != want:
        missing, extra = [n for n in want if n not in have], [n for n in have if n not in want]
        parts = ([f"it lacks {', '.join(missing)}"] if missing else []) + ([f"it has {', '.join(extra)} no longer in the catalog"] if extra else [])
        return "; ".join(parts) or "its experts are in another order"
    changed = [e.name for e, c in zip(catalog.experts, ckpt.experts) if e.sha256 != c.get("sha256")]
    if changed:
        return f"the files of {', '.join(changed)} changed"
    changed = [e.name for e, c in zip(catalog.experts, ckpt.experts) if e.identity() != recorded(c)]
    return f"the kind, arch or source of {', '.join(changed)} changed" if changed else "the catalog changed"


def restamp(ckpt: Checkpoint, catalog: Catalog) -> None:
    """Record `catalog` (whose experts are the gate's rows, in order) as what `ckpt` was made for, in the
    current identity; each expert keeps its row kind, new ones are prototypes."""
    rows = {x["name"]: x.get("row", "trained") for x in ckpt.experts}
    ckpt.experts = [{**x, "row": rows.get(x["name"], "prototype")} for x in identities(catalog)]
    ckpt.catalog_hash, ckpt.base, ckpt.identity = catalog.hash(), catalog.base_identity(), IDENTITY_VERSION
