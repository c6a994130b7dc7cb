"""Prompt -> experts. A cosine gate over prompt embeddings picks the top-k experts of a catalog.

Without a trained checkpoint the gate's rows are prototypes (each expert's normalised mean embedding of
every text it ships with, cached beside the catalog and updated expert by expert); `routing.train`
learns the rows, a bias and a scale from labelled prompts; `routing.sync` adds or removes rows without
retraining (no forgetting). Decisions are data:

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
import os
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from mixdiff_cli.catalog.headers import sha256_file
from mixdiff_cli.catalog.discovery import is_packaged, user_data_dir
from mixdiff_cli.catalog.model import Catalog
from mixdiff_cli.catalog.schema import load_catalog
from mixdiff_cli.core.errors import MixdiffError, OutputError
from mixdiff_cli.routing.checkpoint import FORMAT_VERSION, for_catalog, read_checkpoint, save_checkpoint, stale_reason
from mixdiff_cli.routing.encoders import Encoder, check_encoder, get_encoder
from mixdiff_cli.routing.errors import RouteOptionError, RouterError, StaleRouter
from mixdiff_cli.routing.gate import PROTOTYPE_SCALE, Gate, fit_margin, fit_score, forward_features, none_logit
from mixdiff_cli.routing.labels import TEXTS_VERSION, expert_texts, texts_key
from mixdiff_cli.routing.prototypes import learn_abstention, prototype_rows
from mixdiff_cli.routing.route import Member, OnStale, Route, check_known, check_routing, explicit_route, parse_members, renormalise

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mixdiff.router")
FLOOR = 0.05  # a routed member under this fraction of the top member's weight is left out (k is an upper bound)
MAX_TRIGGER_EXPERTS = 8  # a trigger word claimed by more experts than this is too generic to force any
# English function words: a trigger made only of these ("a, the, on" in a LoRA's trigger_phrase) would force
# its expert into nearly every prompt, so it forces none
STOP_WORDS = frozenset("""a an the and or but nor of in on at to by for from with without into onto over under
    as is are was were be been it its this that these those there here his her their our your my""".split())
_WORD = re.compile(r"\w+")



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
        # trigger word -> the experts it forces; a word may belong to a few experts, one that more than
        # MAX_TRIGGER_EXPERTS claim (kohya's most frequent tags are often "1girl", "solo") forces none
        claims: dict[str, list[str]] = {}
        for name in self.names:
            for word in dict.fromkeys(w.strip().lower() for w in (triggers or {}).get(name, ())):
                if word:
                    claims.setdefault(word, []).append(name)
        self.triggers = {w: ns for w, ns in claims.items() if len(ns) <= MAX_TRIGGER_EXPERTS and not set(_WORD.findall(w)) <= STOP_WORDS}
        self.generic_triggers = sorted(claims.keys() - self.triggers.keys())
        # triggers by their first word: a prompt is matched only against those whose first word it holds
        self._by_word: dict[str, list[str]] = {}
        for word in self.triggers:
            first = _WORD.search(word)
            self._by_word.setdefault(first.group(0) if first else "", []).append(word)
        # the gate as float32 numpy arrays: one decision is a handful of small ops (bench_router.py)
        arr = lambda t: None if t is None else np.ascontiguousarray(t.detach().float().cpu().numpy())  # noqa: E731
        self._mean, self._bias, self._mlp = arr(gate.mean), arr(gate.bias), tuple(arr(t) for t in (gate.w1, gate.b1, gate.w2))
        # row_matrix(W, s) = s * normalize(W).T, applied as (x @ W.T) * (s / |W_e|): the (E, D) rows of
        # 10,000 experts (160 MB with the words encoder) are read once for their norms, never copied
        weight = arr(gate.weight)  # (E, D)
        self._rows = weight.T  # (D, E) view
        self._col_scale = np.float32(gate.scale) / np.maximum(np.sqrt(np.einsum("ed,ed->e", weight, weight)), 1e-12)  # (E,)
        self._none = None if gate.none_weight is None else arr(gate.none_weight)
        self.temperature = round(float(gate.temperature), 4)
        self.fit_threshold = None if gate.fit_threshold is None else round(float(gate.fit_threshold), 4)
        self._info = {
            "kind": kind, "encoder": encoder.id, "checkpoint": str(checkpoint) if checkpoint else None,
            "sha256": checkpoint_sha256, "hidden": gate.hidden, "temperature": self.temperature, "fit_threshold": self.fit_threshold,
        }

    @property
    def encoder_id(self) -> str:
        return self.encoder.id

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def warn(self) -> None:
        """Raise this router's warnings (a checkpoint one write behind, a fallback) as `MixdiffWarning`s."""
        import warnings

        from mixdiff_cli.core.errors import MixdiffWarning

        for message in self.warnings:
            warnings.warn(message, MixdiffWarning, stacklevel=2)

    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, D) router vectors of `prompts` with this router's encoder."""
        return self.encoder(list(prompts))

    def _scores(self, vecs: Any, temperature: float) -> tuple[Any, Any]:
        """(N, D) or (D,) vectors (torch or numpy) -> ((N, E) float32 expert probabilities at the calibrated
        temperature times `temperature`, (N,) fit = P(some expert), ones without a "none" row)."""
        x = vecs.detach().cpu().numpy() if hasattr(vecs, "detach") else np.asarray(vecs)
        x = x.reshape(1, -1) if x.ndim == 1 else x
        if x.shape[-1] != self._mean.shape[0]:
            raise RouterError(
                f"the router expects {self._mean.shape[0]}-dim prompt vectors, got {x.shape[-1]}",
                f"encode prompts with the router's encoder ({self.encoder_id}), or retrain with 'mixdiff router train'",
            )
        feats = forward_features(x.astype(np.float32), self._mean, *self._mlp)  # (N, D)
        logits = (feats @ self._rows) * self._col_scale + self._bias  # (N, E): gate.forward_logits, rows scaled after
        fit = np.ones(len(x), np.float32)
        if self._none is not None:
            none = none_logit(feats, self._none, np.float32(self.gate.scale), np.float32(self.gate.none_bias))
            fit = fit_score(fit_margin(logits, none), self.gate.fit_platt)
        logits = logits / np.float32(self.temperature * temperature)
        logits -= logits.max(-1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(-1, keepdims=True), fit

    def probabilities(self, vecs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """(N, D) -> (N, E) softmax(logits / (calibrated temperature * temperature))."""
        import torch

        return torch.from_numpy(self._scores(vecs, temperature)[0]).float()

    def fit(self, vecs: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N,) P(some expert fits): the score abstention compares with `fit_threshold`."""
        import torch

        return torch.from_numpy(self._scores(vecs, 1.0)[1]).float()

    def _check(self, top_k: int, temperature: float, threshold: float | None) -> None:
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
        threshold: float | None = None,
        overrides: Sequence[str | Member | tuple[str, float]] | None = None,
        abstain: bool = True,
    ) -> Route:
        """The route for one prompt. `vec`: its (D,) router vector (may be None when `overrides` decide).

        Order of precedence: overrides (--expert) replace the router; trigger words force their experts
        in; else, with `threshold` None and `abstain`, a prompt whose fit (P(some expert), from the "none
        of these" row) is under the calibrated `fit_threshold` goes to the bare base; the remaining top-k
        slots go to the most probable experts (with p >= `threshold` when one is given: an explicit
        threshold replaces the calibrated abstention). Weights are the chosen experts' probabilities
        renormalised (a trigger-forced expert counts as p = 1); a member under FLOOR of the top member's
        weight is left out, so k is an upper bound.
        """
        self._check(top_k, temperature, threshold)
        probs, fit = (None, None) if vec is None else (a[0] for a in self._scores(vec, temperature))
        return self._decide(probs, fit, prompt, top_k, temperature, threshold, overrides, abstain)

    def decide_many(
        self,
        vecs: torch.Tensor,
        prompts: Sequence[str],
        top_k: int = 1,
        temperature: float = 1.0,
        threshold: float | None = None,
        overrides: Sequence[str | Member | tuple[str, float]] | None = None,
        abstain: bool = True,
    ) -> list[Route]:
        """`decide` for N prompts with one (N, E) matrix product."""
        prompts = list(prompts)
        if len(vecs) != len(prompts):
            raise ValueError(f"{len(vecs)} vectors for {len(prompts)} prompts")
        if not prompts:
            return []
        self._check(top_k, temperature, threshold)
        probs, fits = self._scores(vecs, temperature)
        return [self._decide(p, f, t, top_k, temperature, threshold, overrides, abstain) for p, f, t in zip(probs, fits, prompts)]

    def route(self, prompts: Sequence[str], **options: Any) -> list[Route]:
        """Embed `prompts` with the router's encoder and decide each (options as in `decide`)."""
        prompts = list(prompts)
        return self.decide_many(self.embed(prompts), prompts, **options) if prompts else []

    def _decide(self, probs, fit, prompt, top_k, temperature, threshold, overrides, abstain) -> Route:
        p = {} if probs is None else dict(zip(self.names, probs.tolist()))
        options = {"top_k": top_k, "temperature": temperature, "threshold": threshold}
        if not abstain:
            options["abstain"] = False
        route = Route(chosen=[], probs=p, prompt=prompt, router=self._info, options=options)
        if overrides:
            fixed = explicit_route(self._overrides(overrides), prompt, self.names)
            route.chosen, route.reasons, route.bands = fixed.chosen, fixed.reasons, fixed.bands
            options["overrides"] = fixed.options["overrides"]
            return route
        if probs is None:
            raise RouterError("no prompt vector and no --expert overrides", "pass the prompt's router vector (router.embed) or overrides")

        picked: dict[str, float] = {}
        why = route.reasons = dict.fromkeys(self.names, f"not in top {top_k}")
        for found, word in self._trigger_matches(prompt):
            for name in self.triggers[word]:
                if name not in picked:
                    picked[name] = 1.0
                    why[name] = f"trigger {found!r}"
        order = np.argsort(-probs, kind="stable")
        calibrated = threshold is None and abstain and self.fit_threshold is not None
        if calibrated:
            route.abstention = self._abstention(float(fit), self.names[order[0]], bool(picked))
            if route.abstention["abstained"]:
                for name in self.names:
                    why[name] = "bare base: fits no expert"
                why[self.names[order[0]]] = f"nearest, but fit {fit:.2f} < {self.fit_threshold:.2f}: bare base"
                return route
        floor_p = threshold or 0.0
        for i in order:
            name = self.names[i]
            if name in picked:
                continue
            if len(picked) >= top_k:
                break  # the rest stay "not in top k"
            if p[name] < floor_p:
                why[name] = f"below threshold (p={p[name]:.2f} < {floor_p:g})"
            else:
                picked[name] = p[name]
                why[name] = f"router p={p[name]:.2f}"
        route.chosen = self._floor(picked, why)
        return route

    def _abstention(self, fit: float, nearest: str, triggered: bool) -> dict[str, Any]:
        """The abstention record of a route: fit, threshold, nearest expert, whether and why."""
        tau = float(self.fit_threshold)  # type: ignore[arg-type]
        out: dict[str, Any] = {"score": round(fit, 4), "threshold": tau, "nearest": nearest, "abstained": False}
        if triggered:
            out["reason"] = f"a trigger word chose (fit {fit:.2f})"
        elif fit < tau:
            out.update(abstained=True, reason=f"nearest expert {nearest} at {fit:.2f}, below {tau:.2f}: bare base")
        else:
            out["reason"] = f"nearest expert {nearest} at {fit:.2f}, at or above {tau:.2f}"
        return out

    @staticmethod
    def _floor(picked: dict[str, float], why: dict[str, str]) -> list[tuple[str, float]]:
        """The picked experts renormalised, without those under FLOOR of the top member's weight (or that
        round to 0): they would cost a forward each for next to nothing."""
        if not picked:
            return []
        top = max(picked.values())
        kept = {n: w for n, w in picked.items() if w >= FLOOR * top}
        for name, w in picked.items():
            if name not in kept:
                why[name] = f"left out (weight {w / sum(picked.values()):.2g} < floor {FLOOR:g} x top)"
        chosen = renormalise(sorted(kept.items(), key=lambda kv: -kv[1]))
        for name in kept.keys() - dict(chosen).keys():
            why[name] += " (weight rounds to 0, left out)"
        return chosen

    def _trigger_matches(self, prompt: str) -> list[tuple[str, str]]:
        """(as written, trigger) for the trigger words in `prompt`, in order: whole words, longest first,
        case-insensitive. Only the triggers whose first word the prompt holds are tried, so 10,000 cost what
        10 do. The trigger is told by which one matched, not by lower-casing the match: "İstanbul" matches
        "istanbul" but lower-cases to "i̇stanbul"."""
        if not self.triggers or not prompt:
            return []
        candidates = [t for w in {*_WORD.findall(prompt.lower()), ""} for t in self._by_word.get(w, ())]
        if not candidates:
            return []
        words = sorted(candidates, key=len, reverse=True)
        pattern = re.compile(r"(?<!\w)(" + "|".join(map(re.escape, words)) + r")(?!\w)", re.IGNORECASE)
        same = lambda word, text: re.fullmatch(re.escape(word), text, re.IGNORECASE) is not None  # noqa: E731
        return [(m.group(0), next(w for w in words if same(w, m.group(0)))) for m in pattern.finditer(prompt)]



# --- loading --------------------------------------------------------------------------------------


def _triggers(catalog: Catalog) -> dict[str, list[str]]:
    return {e.name: list(e.trigger) for e in catalog.experts}


def _cache_path(catalog: Catalog) -> Path:
    """Beside the catalog, or in the user's data folder for the packaged demo (never written to)."""
    if is_packaged(catalog.path):
        key = hashlib.sha256(os.path.realpath(catalog.path).encode()).hexdigest()[:32]
        return user_data_dir() / "cache" / "prototypes" / f"{key}.safetensors"
    return catalog.root / f".{catalog.path.stem}.prototypes.safetensors"


def _cache_key(catalog: Catalog, encoder: str) -> str:
    """What every cached row depends on: the cache format, the encoder and the base (whose text encoder "base" is)."""
    ident = {"v": f"{FORMAT_VERSION}.rows.abstain", "texts": TEXTS_VERSION, "encoder": encoder, "base": catalog.base_identity() if encoder == "base" else None}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _cached_rows(path: Path, key: str) -> tuple[Gate, list[str], int] | None:
    """(gate, each row's texts digest, experts its center came from) of a prototype cache made with `key`."""
    if not path.is_file():
        return None
    with contextlib.suppress(RouterError):
        cached = read_checkpoint(path)
        if cached.key == key and all("texts" in x for x in cached.experts):
            return cached.gate, [str(x["texts"]) for x in cached.experts], int(cached.training.get("center_experts", 0))
    return None


def prototype_router(catalog: Catalog, encoder: Encoder) -> Router:
    """Prototype routing, cached beside the catalog and kept up to date incrementally: an expert whose
    texts (`labels.expert_texts`) are unchanged keeps its row, a new or changed one is embedded alone and
    imprinted against the cached center (as `routing.sync` adds a row to a trained router). The center is
    recomputed from every expert, with every row, once the catalog has doubled since it was."""
    import torch

    key, path = _cache_key(catalog, encoder.id), _cache_path(catalog)
    digests = [texts_key(e) for e in catalog.experts]
    cached = _cached_rows(path, key)
    if cached is not None and len(digests) <= 2 * max(cached[2], 1):
        old, old_digests, center_n = cached
        if old_digests == digests:
            gate = old  # the warm path: nothing to embed, nothing to write
        else:
            at = {d: i for i, d in enumerate(old_digests)}
            todo = [i for i, d in enumerate(digests) if d not in at]
            _, new = prototype_rows(encoder, [expert_texts(catalog.experts[i]) for i in todo], old.mean)
            fresh = dict(zip(todo, new))
            weight = torch.stack([fresh[i] if i in fresh else old.weight[at[d]] for i, d in enumerate(digests)])
            gate = replace(old, weight=weight, bias=torch.zeros(len(digests)))  # the "none" row and its calibration stay, as the center does
            _save_prototypes(gate, catalog, encoder.id, key, digests, center_n, path)
    else:
        center, weight = prototype_rows(encoder, [expert_texts(e) for e in catalog.experts])
        gate = Gate(mean=center, weight=weight, bias=torch.zeros(len(digests)), scale=PROTOTYPE_SCALE)
        calibration = learn_abstention(gate, catalog, encoder)
        _save_prototypes(gate, catalog, encoder.id, key, digests, len(digests), path, calibration)
    return Router(catalog.names, gate, encoder, kind="prototypes", triggers=_triggers(catalog))


def _save_prototypes(
    gate: Gate, catalog: Catalog, encoder: str, key: str, digests: list[str], center_n: int, path: Path, calibration: dict[str, Any] | None = None
) -> None:
    """Write the prototype cache (a router checkpoint of kind "prototypes"); best effort."""
    ckpt = for_catalog(gate, catalog, encoder, kind="prototypes", key=key, training={"center_experts": center_n, **(calibration or {})})
    for row, digest in zip(ckpt.experts, digests):
        row["texts"] = digest
    try:
        save_checkpoint(ckpt, path)
    except (OSError, OutputError) as exc:  # a read-only catalog folder (or a full disk) still routes, just without the cache
        log.debug("prototype cache not written: %s", exc)


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
    notes: list[str] = []
    if problem is not None:
        ckpt, problem, notes = _catch_up(cat, ckpt, problem, pipe)
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
        ckpt.names, ckpt.gate, enc, kind="trained", triggers=_triggers(cat), checkpoint=path, checkpoint_sha256=sha256_file(path),
        warnings=notes,
    )


def _catch_up(cat: Catalog, ckpt: Any, problem: str, pipe: Any) -> tuple[Any, str | None, list[str]]:
    """A checkpoint one catalog write behind (experts added, or one removed, since it was written: the
    router write after a catalog write never happened, or its file is not the user's to write) gets those
    rows now, in memory, and on disk where it can be written. Else the problem stands."""
    from mixdiff_cli.routing import sync

    fixed = sync.caught_up(cat, ckpt, pipe=pipe)
    if fixed is None:
        return ckpt, problem, []
    ckpt, change, names = fixed
    shown = ", ".join(names)
    try:
        from mixdiff_cli.catalog.discovery import check_writable

        check_writable(cat.router_path())
        if change == "added":
            sync.extend_router(cat, names, pipe=pipe)
        else:
            sync.drop_router_row(cat, names[0])
        return ckpt, None, []
    except (MixdiffError, OSError) as exc:
        why = exc.message if isinstance(exc, MixdiffError) else f"{exc.strerror or exc}: {exc.filename}"
        hint = (exc.hint if isinstance(exc, MixdiffError) else None) or "run 'mixdiff router train' to write it"
        return ckpt, None, [f"router checkpoint {cat.router} lacks the change to {shown} ({change}); routing with it in step for "
                            f"this run ({why}). {hint[:1].upper()}{hint[1:]}"]


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
    gate = ckpt.gate
    status["temperature"] = round(gate.temperature, 4)
    status["abstains_below_fit"] = None if gate.fit_threshold is None else round(gate.fit_threshold, 4)
    return status
