"""No forgetting: add a row to a trained router for each expert that joins the catalog (a whole library
import in one checkpoint write) or drop the row of one that leaves, without retraining. A new row is imprinted (its expert's normalised mean feature, see `gate.py`); the
other rows are untouched, so old decisions change only where the new expert wins."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mixdiff_cli.catalog.model import Catalog
from mixdiff_cli.catalog.schema import load_catalog
from mixdiff_cli.core.fsutil import file_lock
from mixdiff_cli.routing.checkpoint import Checkpoint, fits, identities, read_checkpoint, recorded, restamp, save_checkpoint, stale_reason
from mixdiff_cli.routing.encoders import get_encoder
from mixdiff_cli.routing.errors import RouterError, StaleRouter
from mixdiff_cli.routing.labels import expert_texts

if TYPE_CHECKING:
    import torch

Change = Literal["added", "removed"]


def _problem_before(ckpt: Checkpoint, cat: Catalog, names: list[str], change: Change) -> str | None:
    """Why `ckpt` did not fit `cat` as it was before `names` were added (or the one was removed); None when it fitted."""
    if change == "added":
        new = set(names)
        before = [x for x in identities(cat) if x["name"] not in new]
        was = dataclasses.replace(ckpt, catalog_hash="")  # compare item by item for the message
        then = Catalog(path=cat.path, base=cat.base, experts=[e for e in cat.experts if e.name not in new])
    else:
        name = names[0]
        at = ckpt.names.index(name)
        before = identities(cat)
        before.insert(at, recorded(ckpt.experts[at]))
        was, then = dataclasses.replace(ckpt, experts=[x for x in ckpt.experts if x["name"] != name], catalog_hash=""), cat
    return None if fits(ckpt, cat, before) else stale_reason(was, then)


def _edit_rows(catalog: Catalog, names: list[str], change: Change, edit: Callable[[Catalog, Checkpoint, list[str]], None]) -> Path | None:
    """Under the checkpoint's lock: re-read catalog and checkpoint, check the checkpoint was current
    before `names` were `change`d, let `edit` change the gate's rows for those not done yet, restamp and
    save. Returns the checkpoint path (None when the catalog has no router)."""
    path = catalog.router_path()
    if path is None:
        return None
    with file_lock(path, what="router checkpoint", error=RouterError):
        cat = load_catalog(catalog.path)
        ckpt = read_checkpoint(path)
        rows = set(ckpt.names)
        todo = [n for n in names if (n in rows) != (change == "added")]
        if change == "added" and todo:  # with any other add whose router write has not come yet (parallel adds)
            todo = [n for n in cat.names if n not in rows]
        if not todo:
            return path  # already done
        problem = _problem_before(ckpt, cat, todo, change)
        if problem is not None:
            shown = ", ".join(map(repr, todo[:3])) + (f" and {len(todo) - 3} more" if len(todo) > 3 else "")
            raise StaleRouter(
                f"router checkpoint {cat.router} was already out of date before {shown} {'was' if len(todo) == 1 else 'were'} {change}: {problem}",
                "run 'mixdiff router train'",
            )
        edit(cat, ckpt, todo)
        restamp(ckpt, cat)
        return save_checkpoint(ckpt, path)


def _in_catalog_order(t: torch.Tensor, new: torch.Tensor, old_names: list[str], new_names: list[str], order: list[str]) -> torch.Tensor:
    """(E_old, ...) rows of `old_names` and (E_new, ...) rows of `new_names` -> (E, ...) rows in `order`."""
    import torch

    at = {n: i for i, n in enumerate([*old_names, *new_names])}
    return torch.cat([t, new]).index_select(0, torch.tensor([at[n] for n in order], dtype=torch.long))


def add_rows(cat: Catalog, ckpt: Checkpoint, names: list[str], pipe: Any = None) -> None:
    """Imprint one row per expert of `names` (in `cat`, not in `ckpt`) into `ckpt`'s gate, in catalog order.

    Row = the normalised mean feature of the expert's prompts; bias chosen so that the row scores its own
    prompts as highly as the trained rows score theirs on average (`Gate.own_cos`; the mean bias for
    checkpoints without it)."""
    import torch

    gate, by_name = ckpt.gate, {e.name: e for e in cat.experts}
    texts = [expert_texts(by_name[n]) for n in names]
    feats = gate.features(get_encoder(cat, ckpt.encoder, pipe=pipe)([t for ts in texts for t in ts]))  # (sum n_i, D)
    rows, own = [], []
    for part in feats.split([len(ts) for ts in texts]):  # (n_i, D) per new expert
        rows.append(torch.nn.functional.normalize(part.mean(0), dim=-1))  # (D,)
        own.append((part @ rows[-1]).mean())
    rows, own = torch.stack(rows), torch.stack(own)  # (M, D), (M,)
    if gate.own_cos is not None and len(gate.bias):
        # calibrate: each new row scores its own prompts as the trained rows score theirs, on average
        bias = (gate.scale * gate.own_cos + gate.bias).mean() - gate.scale * own
    else:
        bias = (gate.bias.mean() if len(gate.bias) else torch.tensor(0.0)).expand(len(names))
    old = ckpt.names
    gate.weight = _in_catalog_order(gate.weight, rows, old, names, cat.names)
    gate.bias = _in_catalog_order(gate.bias, bias, old, names, cat.names)
    if gate.own_cos is not None:
        gate.own_cos = _in_catalog_order(gate.own_cos, own, old, names, cat.names)


def drop_rows(ckpt: Checkpoint, name: str) -> None:
    """Remove `name`'s row from `ckpt`'s gate."""
    import torch

    at = ckpt.names.index(name)
    keep = torch.tensor([i for i in range(len(ckpt.experts)) if i != at], dtype=torch.long)
    gate = ckpt.gate
    gate.weight, gate.bias = gate.weight.index_select(0, keep), gate.bias.index_select(0, keep)
    if gate.own_cos is not None:
        gate.own_cos = gate.own_cos.index_select(0, keep)


def extend_router(catalog: Catalog, expert_name: str | list[str], *, pipe: Any = None) -> Path | None:
    """Add `expert_name` (or several names, already in `catalog`) to its trained router, one row each
    (`add_rows`), without retraining. Returns the checkpoint path (None when the catalog has no router)."""
    names = [expert_name] if isinstance(expert_name, str) else list(expert_name)
    return _edit_rows(catalog, names, "added", lambda cat, ckpt, todo: add_rows(cat, ckpt, todo, pipe))


def drop_router_row(catalog: Catalog, expert_name: str) -> Path | None:
    """Remove `expert_name` (already gone from `catalog`) from its trained router: drop its row.
    Returns the checkpoint path (None when the catalog has no router)."""
    return _edit_rows(catalog, [expert_name], "removed", lambda cat, ckpt, _todo: drop_rows(ckpt, expert_name))


def caught_up(cat: Catalog, ckpt: Checkpoint, *, pipe: Any = None) -> tuple[Checkpoint, Change, list[str]] | None:
    """`ckpt` brought in step with `cat` in memory when the only change since it was written is experts
    added (or one removed): a write of the catalog whose router write never happened (a kill between the
    two, a router the user cannot write). None when it was out of date before that (retrain)."""
    have, want = set(ckpt.names), set(cat.names)
    added, removed = [n for n in cat.names if n not in have], [n for n in ckpt.names if n not in want]
    if added and not removed and _problem_before(ckpt, cat, added, "added") is None:
        add_rows(cat, ckpt, added, pipe)
        change, names = "added", added
    elif len(removed) == 1 and not added and _problem_before(ckpt, cat, removed, "removed") is None:
        drop_rows(ckpt, removed[0])
        change, names = "removed", removed
    else:
        return None
    restamp(ckpt, cat)
    return ckpt, change, names
