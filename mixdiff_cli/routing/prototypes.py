"""Prototype rows: each expert's row is the normalised mean of its texts' centred embeddings, computed
a few thousand texts at a time (`prototype_rows`), and the "none of these" row of prototype routing,
from the generic captions (`learn_abstention`). `routing.router.prototype_router` caches them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from mixdiff_cli.routing.gate import forward_features
from mixdiff_cli.routing.labels import expert_texts

if TYPE_CHECKING:
    import torch

    from mixdiff_cli.catalog.model import Catalog
    from mixdiff_cli.routing.encoders import Encoder
    from mixdiff_cli.routing.gate import Gate

KEEP_FLOATS = 64 * 2**20  # text embeddings a cold prototype build keeps in memory (256 MB); the rest it embeds twice


def _chunks(texts: Sequence[Sequence[str]], batch: int = 2048) -> Iterator[tuple[int, int]]:
    """Ranges [i, j) of experts whose texts add up to about `batch` (one encoder call each)."""
    i = 0
    while i < len(texts):
        j, n = i, 0
        while j < len(texts) and (n == 0 or n + len(texts[j]) <= batch):
            n += len(texts[j])
            j += 1
        yield i, j
        i = j


def _embed(encoder: Encoder, texts: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, D) embeddings of the experts' texts, flattened, and the (n,) index of the expert each belongs to."""
    import torch

    owner = torch.repeat_interleave(torch.arange(len(texts)), torch.tensor([len(ts) for ts in texts]))
    return encoder([t for ts in texts for t in ts]), owner


def _per_expert_sum(vecs: torch.Tensor, owner: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(n, D) rows, (n,) owners -> (E, D) sums per expert."""
    import torch

    return torch.zeros(n_experts, vecs.shape[1]).index_add_(0, owner, vecs)


def prototype_rows(encoder: Encoder, texts: Sequence[Sequence[str]], center: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(center (D,), rows (E, D)) of `gate.prototype_gate` over the experts' embedded texts, computed a few
    thousand texts at a time with batched ops. Without `center`, it is the mean of the experts' mean
    embeddings (what did not fit in memory is embedded again for the rows); with it, only these experts
    are embedded and their rows are imprinted against it."""
    import torch
    import torch.nn.functional as F

    chunks = list(_chunks(texts))
    kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if center is None:
        means, budget = [], KEEP_FLOATS
        for c, (i, j) in enumerate(chunks):
            vecs, owner = _embed(encoder, texts[i:j])
            means.append(_per_expert_sum(vecs, owner, j - i) / torch.bincount(owner, minlength=j - i)[:, None])  # (E_c, D)
            if vecs.numel() <= budget:
                kept[c], budget = (vecs, owner), budget - vecs.numel()
        means = torch.cat(means)
        center = means.mean(0) if len(means) >= 2 else torch.zeros(means.shape[1])  # = gate._center
    rows = []
    for c, (i, j) in enumerate(chunks):
        vecs, owner = kept.pop(c) if c in kept else _embed(encoder, texts[i:j])
        # = gate.prototype per expert: the normalised mean of its unit features normalize(x - center)
        rows.append(F.normalize(_per_expert_sum(forward_features(vecs, center), owner, j - i), dim=-1))
    return center, torch.cat(rows) if rows else torch.zeros(0, center.shape[0])


def learn_abstention(gate: Gate, catalog: Catalog, encoder: Encoder, sample: int = 2048) -> dict[str, Any]:
    """Give a prototype `gate` a "none of these" row, the prototype of the generic captions
    (`routing.generic`), and calibrate its fit on up to `sample` of the experts' texts against the
    captions held out from that row. Returns what `calibrate_fit` measured."""
    import random

    import torch
    import torch.nn.functional as F

    from mixdiff_cli.routing.calibrate import calibrate_fit
    from mixdiff_cli.routing.generic import negative_vectors

    pairs = [(i, t) for i, e in enumerate(catalog.experts) for t in expert_texts(e)]
    if len(pairs) > sample:
        pairs = random.Random(0).sample(pairs, sample)
    if not pairs:
        return {}
    vecs = encoder([t for _, t in pairs])
    g_train, g_val = negative_vectors(encoder, vecs, torch.tensor([i for i, _ in pairs], dtype=torch.long))
    if not len(g_train):
        return {}
    gate.none_weight, gate.none_bias = F.normalize(gate.features(g_train).mean(0), dim=-1), 0.0
    return calibrate_fit(gate, vecs, g_val)
