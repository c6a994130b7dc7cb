"""Prompt -> experts. A cosine gate over prompt embeddings picks the top-k experts of a catalog.

Without a trained checkpoint the gate's rows are prototypes (each expert's normalised mean prompt
embedding, cached beside the catalog); `routing.train` learns the rows, a bias and a scale from labelled
prompts; `routing.sync` adds or removes one row without retraining (no forgetting). Decisions are data:

    router = load_router(load_catalog("experts.yaml"))
    route = router.route(["a watercolor fox"], top_k=2)[0]   # or router.decide(vec, prompt)
    route.chosen                                             # [("watercolor", 0.81), ("foxes", 0.19)]

The pieces: `encoders` (prompts -> vectors), `gate` (the cosine classifier and its forward pass),
`checkpoint` (the safetensors file and staleness), `labels` (what the router learns from), `route`
(the decision value and the NAME[:WEIGHT] grammar).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from mixdiff_cli.catalog.formats import sha256_file
from mixdiff_cli.catalog.schema import Catalog, Expert, load_catalog
from mixdiff_cli.routing.checkpoint import FORMAT_VERSION, for_catalog, read_checkpoint, save_checkpoint, stale_reason
from mixdiff_cli.routing.encoders import Encoder, check_encoder, get_encoder
from mixdiff_cli.routing.errors import RouteOptionError, RouterError, StaleRouter
from mixdiff_cli.routing.gate import Gate, forward_features, forward_logits, prototype_gate, row_matrix
from mixdiff_cli.routing.labels import expert_texts
from mixdiff_cli.routing.route import Member, OnStale, Route, check_known, check_routing, explicit_route, parse_members, renormalise

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mixdiff.router")



class Router:
    """A gate over the catalog's experts plus the rules around it: triggers, overrides, top-k, threshold."""

    def __init__(
        self,
        names: list[str],
        gate: Gate,
        encoder: Encoder,
        *,
        kind: Literal["prototypes", "trained"],
        triggers: dict[str, Sequence[str]] | None = None,
        checkpoint: Path | None = None,
        checkpoint_sha256: str | None = None,
        warnings: list[str] | None = None,
    ):
        self.names, self.gate, self.encoder, self.kind = list(names), gate, encoder, kind
        self.checkpoint, self.checkpoint_sha256 = checkpoint, checkpoint_sha256
        self.warnings: list[str] = list(warnings or [])
        # every trigger word of every expert in one pattern; a word may belong to several experts
        self.triggers: dict[str, list[str]] = {}
        for name in self.names:
            for word in (triggers or {}).get(name, ()):
                if word.strip():
                    self.triggers.setdefault(word.strip().lower(), []).append(name)
        words = sorted(self.triggers, key=len, reverse=True)
        self._trigger_re = re.compile(r"(?<!\w)(" + "|".join(map(re.escape, words)) + r")(?!\w)", re.IGNORECASE) if words else None
        # the gate as float32 numpy arrays: one decision is a handful of small ops (bench_router.py)
        arr = lambda t: None if t is None else np.ascontiguousarray(t.detach().float().cpu().numpy())  # noqa: E731
        self._mean, self._bias, self._mlp = arr(gate.mean), arr(gate.bias), tuple(arr(t) for t in (gate.w1, gate.b1, gate.w2))
        self._rows = arr(row_matrix(gate.weight, gate.scale))  # (D, E), scaled and normalised once
        self._info = {
            "kind": kind, "encoder": encoder.id, "checkpoint": str(checkpoint) if checkpoint else None,
            "sha256": checkpoint_sha256, "hidden": gate.hidden,
        }

    @property
    def encoder_id(self) -> str:
        return self.encoder.id

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, D) router vectors of `prompts` with this router's encoder."""
        return self.encoder(list(prompts))

    def _probs(self, vecs: Any, temperature: float) -> Any:
        """(N, D) or (D,) vectors (torch or numpy) -> (N, E) float32 numpy probabilities."""
        x = vecs.detach().cpu().numpy() if hasattr(vecs, "detach") else np.asarray(vecs)
        x = x.reshape(1, -1) if x.ndim == 1 else x
        if x.shape[-1] != self._mean.shape[0]:
            raise RouterError(
                f"the router expects {self._mean.shape[0]}-dim prompt vectors, got {x.shape[-1]}",
                f"encode prompts with the router's encoder ({self.encoder_id}), or retrain with 'mixdiff router train'",
            )
        feats = forward_features(x.astype(np.float32), self._mean, *self._mlp)  # (N, D)
        logits = forward_logits(feats, self._rows, self._bias) / temperature  # (N, E)
        logits -= logits.max(-1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(-1, keepdims=True)

    def probabilities(self, vecs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """(N, D) -> (N, E) softmax(logits / temperature)."""
        import torch

        return torch.from_numpy(self._probs(vecs, temperature)).float()

    def _check(self, top_k: int, temperature: float, threshold: float) -> None:
        check_routing(top_k, temperature, threshold, max(len(self.names), 1))

    def _overrides(self, overrides: Sequence[str | Member | tuple[str, float]]) -> tuple[Member, ...]:
        members = parse_members(overrides)
        check_known(members, self.names)
        return members

    def decide(
        self,
        vec: torch.Tensor | None,
        prompt: str = "",
        top_k: int = 1,
        temperature: float = 1.0,
        threshold: float = 0.0,
        overrides: Sequence[str | Member | tuple[str, float]] | None = None,
    ) -> Route:
        """The route for one prompt. `vec`: its (D,) router vector (may be None when `overrides` decide).

        Order of precedence: overrides (--expert) replace the router; trigger words force their experts
        in; the remaining top-k slots go to the most probable experts with p >= threshold. Weights are
        the chosen experts' probabilities renormalised (a trigger-forced expert counts as p = 1).
        """
        self._check(top_k, temperature, threshold)
        probs = None if vec is None else self._probs(vec, temperature)[0]
        return self._decide(probs, prompt, top_k, temperature, threshold, overrides)

    def decide_many(
        self,
        vecs: torch.Tensor,
        prompts: Sequence[str],
        top_k: int = 1,
        temperature: float = 1.0,
        threshold: float = 0.0,
        overrides: Sequence[str | Member | tuple[str, float]] | None = None,
    ) -> list[Route]:
        """`decide` for N prompts with one (N, E) matrix product."""
        prompts = list(prompts)
        if len(vecs) != len(prompts):
            raise ValueError(f"{len(vecs)} vectors for {len(prompts)} prompts")
        if not prompts:
            return []
        self._check(top_k, temperature, threshold)
        probs = self._probs(vecs, temperature)
        return [self._decide(p, t, top_k, temperature, threshold, overrides) for p, t in zip(probs, prompts)]

    def route(self, prompts: Sequence[str], **options: Any) -> list[Route]:
        """Embed `prompts` with the router's encoder and decide each (options as in `decide`)."""
        prompts = list(prompts)
        return self.decide_many(self.embed(prompts), prompts, **options) if prompts else []

    def _decide(self, probs, prompt, top_k, temperature, threshold, overrides) -> Route:
        p = {} if probs is None else dict(zip(self.names, probs.tolist()))
        options = {"top_k": top_k, "temperature": temperature, "threshold": threshold}
        route = Route(chosen=[], probs=p, prompt=prompt, router=self._info, options=options)
        if overrides:
            fixed = explicit_route(self._overrides(overrides), prompt, self.names)
            route.chosen, route.reasons = fixed.chosen, fixed.reasons
            options["overrides"] = fixed.options["overrides"]
            return route
        if probs is None:
            raise RouterError("no prompt vector and no --expert overrides", "pass the prompt's router vector (router.embed) or overrides")

        picked: dict[str, float] = {}
        why = route.reasons = dict.fromkeys(self.names, f"not in top {top_k}")
        if self._trigger_re is not None and prompt:
            for m in self._trigger_re.finditer(prompt):
                for name in self.triggers[m.group(0).lower()]:
                    if name not in picked:
                        picked[name] = 1.0
                        why[name] = f"trigger {m.group(0)!r}"
        order = np.argsort(-probs, kind="stable")
        for i in order:
            name = self.names[i]
            if name in picked:
                continue
            if len(picked) >= top_k:
                break  # the rest stay "not in top k"
            if p[name] < threshold:
                why[name] = f"below threshold (p={p[name]:.2f} < {threshold:g})"
            else:
                picked[name] = p[name]
                why[name] = f"router p={p[name]:.2f}"
        route.chosen = renormalise(sorted(picked.items(), key=lambda kv: -kv[1])) if picked else []
        for name in picked.keys() - dict(route.chosen).keys():
            why[name] += " (weight rounds to 0, left out)"
        return route



# --- loading --------------------------------------------------------------------------------------


def _triggers(catalog: Catalog) -> dict[str, list[str]]:
    return {e.name: list(e.trigger) for e in catalog.experts}


def _embed_experts(encoder: Encoder, experts: Sequence[Expert]) -> list[torch.Tensor]:
    """One (n_i, D) tensor of embedded texts per expert, from one encoder call."""
    texts = [expert_texts(e) for e in experts]
    flat = [t for ts in texts for t in ts]
    vecs = encoder(flat) if flat else None
    out, i = [], 0
    for ts in texts:
        out.append(vecs[i : i + len(ts)])
        i += len(ts)
    return out


def _cache_path(catalog: Catalog) -> Path:
    return catalog.root / f".{catalog.path.stem}.prototypes.safetensors"


def _cache_key(catalog: Catalog, encoder: str) -> str:
    ident = {
        "v": FORMAT_VERSION,
        "catalog": catalog.hash(),
        "encoder": encoder,
        "texts": [[e.name, expert_texts(e)] for e in catalog.experts],
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def prototype_router(catalog: Catalog, encoder: Encoder) -> Router:
    """Prototype routing, cached beside the catalog (keyed by catalog hash, encoder and expert texts)."""
    key, path = _cache_key(catalog, encoder.id), _cache_path(catalog)
    gate = None
    if path.is_file():
        with contextlib.suppress(RouterError):
            cached = read_checkpoint(path)
            if cached.key == key:
                gate = cached.gate
    if gate is None:
        gate = prototype_gate(_embed_experts(encoder, catalog.experts))
        try:
            save_checkpoint(for_catalog(gate, catalog, encoder.id, kind="prototypes", key=key), path)
        except OSError as exc:  # a read-only catalog folder still routes, just without the cache
            log.debug("prototype cache not written: %s", exc)
    return Router(catalog.names, gate, encoder, kind="prototypes", triggers=_triggers(catalog))


def load_router(
    catalog: Catalog | str | Path,
    encoder: str | None = None,
    *,
    pipe: Any = None,
    device: str | None = None,
    on_stale: OnStale = "error",
) -> Router:
    """The catalog's router: its trained checkpoint when `router:` is set, else prototype routing.

    `encoder`: None = the checkpoint's encoder (else "base"). `pipe`: a loaded base pipeline whose text
    encoder to reuse. `on_stale`: a checkpoint that does not match the catalog raises `StaleRouter`
    ("error") or falls back to prototype routing with a warning in `router.warnings` ("prototypes").
    """
    cat = catalog if isinstance(catalog, Catalog) else load_catalog(catalog)
    if not cat.experts:
        raise RouterError(f"the catalog {cat.path} has no experts to route to", "add one with 'mixdiff add-expert'")
    if encoder is not None:
        check_encoder(encoder)
    if on_stale not in get_args(OnStale):
        raise RouteOptionError(f"unknown on_stale {on_stale!r}", "use error or prototypes")
    path = cat.router_path()
    if path is None:
        return prototype_router(cat, get_encoder(cat, encoder or "base", pipe=pipe, device=device))
    ckpt = read_checkpoint(path)
    problem = stale_reason(ckpt, cat)
    if problem is None and encoder is not None and encoder != ckpt.encoder:
        problem = f"it was trained on the {ckpt.encoder!r} encoder, not {encoder!r}"
    if problem is not None:
        message = f"router checkpoint {cat.router} does not match the catalog: {problem}"
        if on_stale == "error":
            raise StaleRouter(message, "run 'mixdiff router train' (or route with --on-stale prototypes)")
        router = prototype_router(cat, get_encoder(cat, encoder or ckpt.encoder, pipe=pipe, device=device))
        router.warnings.append(f"{message}; using prototype routing. Run 'mixdiff router train' to fix it")
        return router
    enc = get_encoder(cat, ckpt.encoder, pipe=pipe, device=device)
    return Router(
        ckpt.names, ckpt.gate, enc, kind="trained", triggers=_triggers(cat), checkpoint=path, checkpoint_sha256=sha256_file(path)
    )


def router_status(catalog: Catalog) -> dict[str, Any]:
    """What routes this catalog, without loading any encoder: checkpoint, encoder, rows, staleness."""
    path = catalog.router_path()
    if path is None:
        return {"kind": "prototypes", "checkpoint": None, "experts": catalog.names,
                "hint": "prototype routing from each expert's prompts; 'mixdiff router train' learns a gate"}
    ckpt = read_checkpoint(path)
    problem = stale_reason(ckpt, catalog)
    status = {
        "kind": ckpt.kind,
        "checkpoint": str(path),
        "encoder": ckpt.encoder,
        "hidden": ckpt.gate.hidden,
        "input_dim": ckpt.gate.dim,
        "experts": [f"{x['name']} ({x.get('row', 'trained')})" for x in ckpt.experts],
        "matches_catalog": problem is None,
    }
    if problem:
        status["problem"] = f"{problem}; run 'mixdiff router train'"
    status.update({k: v for k, v in ckpt.training.items() if k in ("top1", "top2", "top3", "n_train", "n_val", "epochs")})
    return status
