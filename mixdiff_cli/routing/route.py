"""A route is one value: the experts that run for a prompt, each with a weight (and room for the part of
the sampling run and the part of the canvas it covers). One grammar spells a member everywhere, on the
command line, in prompt files and in the Python API:

    NAME[:WEIGHT][@START:END]   watercolor, watercolor:0.7, layout@:0.4, detail:0.5@0.4:

START and END are fractions of the sampling run: step i of n (0-based) is in the band when
START <= i/n < END; an empty bound is open (0 or 1), so END = 1 includes the last step.

Import-light: no torch here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from mixdiff_cli.core.errors import ExpertNotFound, UsageError

OnStale = Literal["error", "prototypes"]  # a router checkpoint made for other experts: refuse, or route by prototypes
WEIGHT_DIGITS = 4  # route weights are rounded so that near-identical routes share a key
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # = catalog.model.NAME_RE, whole names only (fullmatch)
EXAMPLE = "write NAME or NAME:WEIGHT with a positive weight, e.g. --expert watercolor:0.7"
BAND_EXAMPLE = "write the band as @START:END with 0 <= START < END <= 1, e.g. --expert layout@:0.4 --expert detail@0.4:"
Band = tuple[float, float]


class RouteSpecError(UsageError):
    """An expert spelled outside the `NAME[:WEIGHT]` grammar, or a route that cannot run."""


@dataclass(frozen=True)
class Member:
    """One expert of a route. `weight`: its share of the blend (> 0; renormalised over the route).
    `band`: the (start, end) fraction of the sampling run it covers; None = the whole run.
    `region`: the part of the canvas it covers; None = the whole canvas."""

    expert: str
    weight: float = 1.0
    band: tuple[float, float] | None = None
    region: Any = None

    def spec(self) -> str:
        """The member in the `NAME[:WEIGHT][@START:END]` grammar (weight 1 and the whole run left out)."""
        text = self.expert if self.weight == 1.0 else f"{self.expert}:{self.weight:g}"
        return text + (format_band(self.band) if self.band is not None else "")

    def to_json(self) -> list[Any]:
        """[name, weight] or, with a band, [name, weight, [start, end]] (prompt items, manifests)."""
        return [self.expert, self.weight] + ([list(self.band)] if self.band is not None else [])


def format_band(band: Band) -> str:
    """(0.4, 1.0) -> "@0.4:" (open bounds left empty)."""
    start, end = band
    return "@" + (f"{start:g}" if start > 0 else "") + ":" + (f"{end:g}" if end < 1 else "")


def parse_band(text: Any, shown: Any) -> Band | None:
    """"START:END" (either may be empty), or [start, end] -> (start, end); the whole run -> None."""
    if isinstance(text, str):
        start_text, sep, end_text = text.partition(":")
        if not sep:
            raise RouteSpecError(f"bad expert {shown!r}: the band {text!r} has no ':'", BAND_EXAMPLE)
        bounds: list[Any] = [start_text.strip() or 0.0, end_text.strip() or 1.0]
    elif isinstance(text, (list, tuple)) and len(text) == 2:
        bounds = [0.0 if text[0] is None else text[0], 1.0 if text[1] is None else text[1]]
    else:
        raise RouteSpecError(f"bad expert {shown!r}: the band is not START:END", BAND_EXAMPLE)
    try:
        start, end = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise RouteSpecError(f"bad expert {shown!r}: the band's bounds are not numbers", BAND_EXAMPLE) from None
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
        raise RouteSpecError(f"bad expert {shown!r}: the band's bounds must lie in 0..1", BAND_EXAMPLE)
    if not start < end:
        raise RouteSpecError(f"bad expert {shown!r}: the band's start {start:g} is not before its end {end:g}", BAND_EXAMPLE)
    return None if (start, end) == (0.0, 1.0) else (start, end)


def band_steps(band: Band | None, steps: int) -> range | list[int]:
    """The 0-based steps of an n-step run that `band` covers: START <= i/n < END."""
    if band is None:
        return range(steps)
    return [i for i in range(steps) if band[0] <= i / steps < band[1]]


def member(name: Any, weight: Any = 1.0, *, band: Any = None, spec: Any = None) -> Member:
    """A validated member: a catalog-style name, a finite positive weight (a number or its text) and an
    optional band (text "START:END" or a pair)."""
    shown = spec if spec is not None else f"{name}:{weight}"
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise RouteSpecError(f"bad expert {shown!r}: {name!r} is not an expert name", EXAMPLE)
    if isinstance(weight, str):
        try:
            weight = float(weight) if weight.strip() else None
        except ValueError:
            weight = None
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise RouteSpecError(f"bad expert {shown!r}: the weight is not a number", EXAMPLE)
    if not (math.isfinite(weight) and weight > 0):
        raise RouteSpecError(f"bad expert {shown!r}: the weight must be a positive number", "leave an expert out instead of giving it weight 0 or less; " + EXAMPLE)
    return Member(name, float(weight), None if band is None else parse_band(band, shown))


def parse_member(spec: str | Member | Sequence[Any]) -> Member:
    """`NAME` or `NAME:WEIGHT` (or a Member, or a (name, weight) pair; weight None = 1) -> Member. The one parser."""
    if isinstance(spec, Member):
        return member(spec.expert, spec.weight, band=spec.band)
    if isinstance(spec, (list, tuple)):
        if len(spec) not in (2, 3):
            raise RouteSpecError(f"bad expert {list(spec)!r}: give [name, weight] or [name, weight, [start, end]]", EXAMPLE)
        band = spec[2] if len(spec) == 3 else None
        return member(spec[0], 1.0 if spec[1] is None else spec[1], band=band, spec=list(spec))
    if not isinstance(spec, str):
        raise RouteSpecError(f"bad expert {spec!r}: not text", EXAMPLE)
    head, at, band_text = spec.strip().partition("@")
    name, sep, weight = head.strip().partition(":")
    return member(name.strip(), weight.strip() if sep else 1.0, band=band_text if at else None, spec=spec)


def parse_members(specs: Iterable[str | Member | Sequence[Any]] | None) -> tuple[Member, ...]:
    """Several specs -> members, each expert at most once."""
    out = tuple(parse_member(s) for s in (specs or ()))
    names = [m.expert for m in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise RouteSpecError(f"expert {dup} is given twice", "name each expert once")
    return out


def check_known(members: Iterable[Member], names: Sequence[str]) -> None:
    """Every member names an expert of the catalog (`names`)."""
    for m in members:
        if m.expert not in names:
            raise ExpertNotFound(
                f"expert {m.expert!r} is not in the catalog",
                f"known experts: {', '.join(names) or 'none'}. Run 'mixdiff experts list'",
            )


def renormalise(pairs: Sequence[tuple[str, float]], digits: int = WEIGHT_DIGITS) -> list[tuple[str, float]]:
    """Weights summing to 1, rounded to `digits` so that near-identical routes share a key (the largest
    absorbs the rounding). Experts whose weight rounds to 0 are left out: they would add nothing.
    Idempotent: a renormalised route comes back unchanged."""
    total = sum(w for _, w in pairs)
    out = [(n, round(w / total, digits)) for n, w in pairs]
    out = [(n, w) for n, w in out if w > 0] or out[:1]
    if len(out) > 1:
        top = max(range(len(out)), key=lambda i: out[i][1])
        out[top] = (out[top][0], round(1.0 - sum(w for i, (_, w) in enumerate(out) if i != top), digits))
    elif out:
        out[0] = (out[0][0], 1.0)
    return out


@dataclass
class Route:
    """Which experts run for one prompt. `chosen` weights sum to 1; empty means the bare base."""

    chosen: list[tuple[str, float]]
    probs: dict[str, float]  # router probability of every expert (empty when overrides decided alone)
    reasons: dict[str, str] = field(default_factory=dict)  # why each expert is in or out
    prompt: str | None = None
    router: dict[str, Any] = field(default_factory=dict)  # kind, encoder, checkpoint, sha256
    options: dict[str, Any] = field(default_factory=dict)  # top_k, temperature, threshold, overrides
    bands: dict[str, Band] = field(default_factory=dict)  # expert -> (start, end) of the run; absent = whole run
    abstention: dict[str, Any] | None = None  # score (the fit), threshold, nearest, abstained, reason (calibrated routers only)

    @property
    def key(self) -> tuple[Any, ...]:
        """Hashable identity for grouping prompts that run under the same experts, weights and bands."""
        return tuple((n, w, self.bands[n]) if n in self.bands else (n, w) for n, w in self.chosen)

    @property
    def abstain(self) -> bool:
        return not self.chosen

    @property
    def members(self) -> tuple[Member, ...]:
        return tuple(Member(n, w, self.bands.get(n)) for n, w in self.chosen)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "chosen": [{"expert": n, "weight": w, **({"band": list(self.bands[n])} if n in self.bands else {})} for n, w in self.chosen],
            "abstain": self.abstain,
            "probs": self.probs,
            "reasons": self.reasons,
            "router": dict(self.router),
            "options": self.options,
            **({"abstention": dict(self.abstention)} if self.abstention is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Route:
        """Inverse of `to_dict` (for replaying a recorded route)."""
        return cls(
            chosen=[(c["expert"], float(c["weight"])) for c in data.get("chosen", [])],
            bands={c["expert"]: (float(c["band"][0]), float(c["band"][1])) for c in data.get("chosen", []) if c.get("band")},
            probs={k: float(v) for k, v in (data.get("probs") or {}).items()},
            reasons=dict(data.get("reasons") or {}),
            prompt=data.get("prompt"),
            router=dict(data.get("router") or {}),
            options=dict(data.get("options") or {}),
            abstention=dict(data["abstention"]) if isinstance(data.get("abstention"), dict) else None,
        )


def explicit_route(members: Iterable[Member], prompt: str | None = None, names: Sequence[str] = ()) -> Route:
    """The route fixed by `--expert` members, without a router. `names`: the catalog's experts, whose
    reasons say the overrides replaced the router."""
    members = tuple(members)
    picked = {m.expert for m in members}
    reasons = {n: "not chosen (--expert overrides the router)" for n in names if n not in picked}
    reasons.update({m.expert: "override" for m in members})
    return Route(
        chosen=renormalise([(m.expert, m.weight) for m in members]) if members else [],
        probs={},
        reasons=reasons,
        prompt=prompt,
        options={"overrides": [m.spec() if m.band else f"{m.expert}:{m.weight:g}" for m in members]},
        bands={m.expert: m.band for m in members if m.band is not None},
    )


def uncovered(bands: Sequence[Band | None]) -> list[Band]:
    """The parts of the run [0, 1) that none of `bands` covers (None covers all)."""
    if any(b is None for b in bands):
        return []
    gaps, reach = [], 0.0
    for start, end in sorted(b for b in bands if b is not None):
        if start > reach:
            gaps.append((reach, start))
        reach = max(reach, end)
    return gaps + ([(reach, 1.0)] if reach < 1.0 else [])


def catalog_bands(catalog: Any) -> dict[str, Band | None]:
    """Each expert's default band from the catalog (`band: [start, end]`), None where it has none."""
    return {e.name: (tuple(e.band) if e.band else None) for e in catalog.experts}  # type: ignore[misc]


def spread_bands(route: Route, preference: dict[str, Band | None], steps: int | None = None) -> Route:
    """`--bands auto`: give the chosen experts consecutive parts of the run, as wide as their weights,
    ordered by the middle of their catalog band (no band: 0.5), so that each step runs one expert. An
    expert whose share of a `steps`-step run would hold less than one step is left out (the user named no
    band: a sliver is never their error), the others renormalised."""
    if steps and len(route.chosen) > 1:
        kept = [(n, w) for n, w in route.chosen if w * steps >= 1.05] or [max(route.chosen, key=lambda c: c[1])]  # 5%: rounding
        if len(kept) < len(route.chosen):
            reasons = dict(route.reasons)
            for name in dict(route.chosen).keys() - dict(kept).keys():
                reasons[name] = f"{reasons.get(name, '')}; left out: its share holds no step of the {steps}-step run".lstrip("; ")
            route = replace(route, chosen=renormalise(kept), reasons=reasons)
    if len(route.chosen) < 2:
        return route
    middle = {n: 0.5 if preference.get(n) is None else sum(preference[n]) / 2 for n, _ in route.chosen}  # type: ignore[arg-type]
    order = sorted(route.chosen, key=lambda c: (middle[c[0]], -c[1]))
    bands: dict[str, Band] = {}
    start = 0.0
    for i, (name, weight) in enumerate(order):
        end = 1.0 if i == len(order) - 1 else round(start + weight, WEIGHT_DIGITS)
        bands[name] = (start, end)
        start = end
    return replace(route, chosen=list(route.chosen), options={**route.options, "bands": "auto"}, bands=bands)


def explanations(decision: dict[str, Any]) -> list[str]:
    """One line per abstention and per member left out, from a route's `to_dict()`: what `route` and
    `generate` print under the chosen experts."""
    ab = decision.get("abstention") or {}
    lines = [f"abstained: {ab['reason']}"] if ab.get("abstained") else []
    return lines + [f"{name} {why}" for name, why in (decision.get("reasons") or {}).items() if why.startswith("left out")]


def check_routing(top_k: int, temperature: float, threshold: float | None, n_experts: int) -> None:
    """The router's options, in range for a catalog of `n_experts` (0: nothing to route, any k)."""
    if n_experts and not 1 <= top_k <= n_experts:
        raise RouteSpecError(
            f"--top-k {top_k} is out of range: the catalog has {n_experts} expert{'s' if n_experts != 1 else ''}",
            f"pass --top-k between 1 and {n_experts}",
        )
    if not n_experts and top_k < 1:
        raise RouteSpecError(f"--top-k {top_k} is out of range", "pass --top-k 1 or more")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise RouteSpecError(f"--temperature {temperature} must be a positive number", "try 1.0 (lower is sharper)")
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 <= threshold < 1.0):
        raise RouteSpecError(f"--threshold {threshold} must be in [0, 1)", "0 never abstains; e.g. 0.5 abstains when no expert has p >= 0.5")
