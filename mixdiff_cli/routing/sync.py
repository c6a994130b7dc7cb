"""No forgetting: add or drop one row of a trained router when an expert joins or leaves the catalog,
without retraining. A new row is imprinted (its expert's normalised mean feature, see `gate.py`); the
other rows are untouched, so old decisions change only where the new expert wins."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mixdiff_cli.catalog.schema import Catalog, load_catalog
from mixdiff_cli.core.fsutil import file_lock
from mixdiff_cli.routing.checkpoint import Checkpoint, fits, identities, read_checkpoint, recorded, restamp, save_checkpoint, stale_reason
from mixdiff_cli.routing.encoders import get_encoder
from mixdiff_cli.routing.errors import RouterError, StaleRouter
from mixdiff_cli.routing.labels import expert_texts

if TYPE_CHECKING:
    import torch

Change = Literal["added", "removed"]


def _problem_before(ckpt: Checkpoint, cat: Catalog, name: str, change: Change) -> str | None:
    """Why `ckpt` did not fit `cat` as it was before `name` was added or removed (None when it fitted)."""
    if change == "added":
        before = [x for x in identities(cat) if x["name"] != name]
        was = dataclasses.replace(ckpt, catalog_hash="")  # compare item by item for the message
        then = Catalog(path=cat.path, base=cat.base, experts=[e for e in cat.experts if e.name != name])
    else:
        at = ckpt.names.index(name)
        before = identities(cat)
        before.insert(at, recorded(ckpt.experts[at]))
        was, then = dataclasses.replace(ckpt, experts=[x for x in ckpt.experts if x["name"] != name], catalog_hash=""), cat
    return None if fits(ckpt, cat, before) else stale_reason(was, then)


def _edit_rows(catalog: Catalog, name: str, change: Change, edit: Callable[[Catalog, Checkpoint], None]) -> Path | None:
    """Under the checkpoint's lock: re-read catalog and checkpoint, check the checkpoint was current
    before `name` was `change`d, let `edit` change the gate's rows, restamp and save. Returns the
    checkpoint path (None when the catalog has no router)."""
    path = catalog.router_path()
    if path is None:
        return None
    with file_lock(path, what="router checkpoint", error=RouterError):
        cat = load_catalog(catalog.path)
        ckpt = read_checkpoint(path)
        if (name in ckpt.names) == (change == "added"):
            return path  # already done
        problem = _problem_before(ckpt, cat, name, change)
        if problem is not None:
            raise StaleRouter(
                f"router checkpoint {cat.router} was already out of date before {name!r} was {change}: {problem}",
                "run 'mixdiff router train'",
            )
        edit(cat, ckpt)
        restamp(ckpt, cat)
        return save_checkpoint(ckpt, path)


def _insert(t: torch.Tensor, at: int, row: torch.Tensor) -> torch.Tensor:
    """(E, ...) -> (E + 1, ...) with `row` at index `at`."""
    import torch

    return torch.cat([t[:at], row[None], t[at:]])


def extend_router(catalog: Catalog, expert_name: str, *, pipe: Any = None) -> Path | None:
    """Add `expert_name` (already in `catalog`) to its trained router as one row, without retraining.

    Row = the normalised mean feature of the expert's prompts (imprinting); bias chosen so that the row
    scores its own prompts as highly as the trained rows score theirs on average (`Gate.own_cos`; the
    mean bias for checkpoints without it). Returns the checkpoint path (None when the catalog has no router)."""

    def add_row(cat: Catalog, ckpt: Checkpoint) -> None:
        import torch

        gate = ckpt.gate
        feats = gate.features(get_encoder(cat, ckpt.encoder, pipe=pipe)(expert_texts(cat.expert(expert_name))))  # (n, D)
        row = torch.nn.functional.normalize(feats.mean(0), dim=-1)  # (D,)
        own = (feats @ row).mean()
        if gate.own_cos is not None and len(gate.bias):
            # calibrate: the new row scores its own prompts as the trained rows score theirs, on average
            bias = (gate.scale * gate.own_cos + gate.bias).mean() - gate.scale * own
        else:
            bias = gate.bias.mean() if len(gate.bias) else torch.tensor(0.0)
        at = cat.names.index(expert_name)
        gate.weight, gate.bias = _insert(gate.weight, at, row), _insert(gate.bias, at, bias)
        if gate.own_cos is not None:
            gate.own_cos = _insert(gate.own_cos, at, own)

    return _edit_rows(catalog, expert_name, "added", add_row)


def drop_router_row(catalog: Catalog, expert_name: str) -> Path | None:
    """Remove `expert_name` (already gone from `catalog`) from its trained router: drop its row.
    Returns the checkpoint path (None when the catalog has no router)."""

    def drop_row(cat: Catalog, ckpt: Checkpoint) -> None:
        import torch

        at = ckpt.names.index(expert_name)
        keep = torch.tensor([i for i in range(len(ckpt.experts)) if i != at], dtype=torch.long)
        gate = ckpt.gate
        gate.weight, gate.bias = gate.weight.index_select(0, keep), gate.bias.index_select(0, keep)
        if gate.own_cos is not None:
            gate.own_cos = gate.own_cos.index_select(0, keep)

    return _edit_rows(catalog, expert_name, "removed", drop_row)
