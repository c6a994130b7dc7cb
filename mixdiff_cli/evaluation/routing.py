"""`evaluate_routing`: the catalog's router on labelled prompts, as the gate ranks them and as generate routes them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixdiff_cli.core.errors import UsageError
from mixdiff_cli.evaluation.charts import routing_figures
from mixdiff_cli.evaluation.inputs import check_range, check_unit, file_example
from mixdiff_cli.evaluation.markdown import routing_markdown
from mixdiff_cli.evaluation.metrics import gates, routing_metrics, topn_curve
from mixdiff_cli.evaluation.report import EvaluateError, Report, report_header
from mixdiff_cli.routing.labels import Labeled, check_labels, read_labeled

if TYPE_CHECKING:
    from mixdiff_cli.catalog.model import Catalog


@dataclass(frozen=True)
class RoutingSettings:
    """How `evaluate_routing` routes and measures: the router's top-k, threshold, temperature and encoder
    (None: the checkpoint's), the calibration bins, the device and the --min-accuracy gate."""

    top_k: int = 2
    threshold: float | None = None  # None: the router's calibrated abstention
    abstain: bool = True
    temperature: float = 1.0
    encoder: str | None = None
    bins: int = 5
    device: str | None = None
    min_accuracy: float | None = None

    def check(self) -> None:
        """Raise `UsageError` on an out-of-range value."""
        check_range("--top-k", self.top_k, 1)
        check_range("--bins", self.bins, 1)
        if self.threshold is not None and not 0 <= self.threshold < 1:
            raise UsageError(f"--threshold {self.threshold} must be in [0, 1)", "pass e.g. --threshold 0.5")
        if self.min_accuracy is not None:
            check_unit("--min-accuracy", self.min_accuracy)


def evaluate_routing(
    catalog: Catalog | str | Path, labeled: str | Path | Sequence[Labeled], settings: RoutingSettings | None = None,
    outside: str | Path | Sequence[str] | None = None,
) -> Report:
    """Route every labelled prompt with the catalog's router and measure its probabilities (see
    `routing_metrics`). Trigger words and the threshold act after the gate: the report counts the
    prompts they forced or left to the bare base separately, and its headline (`metrics["headline"]`) is
    the route `generate` would use with them. `threshold` is the router's (default None: its calibrated
    abstention, as generate's); the calibration table splits confidence at it, or at 0.5. `outside`:
    prompts no expert is for (a file of one per line, or .jsonl rows with a "prompt"): the report's
    `abstention` says how many of them went to the bare base (recall) and how many of all abstentions
    they are (precision)."""
    from mixdiff_cli.catalog.schema import load_catalog
    from mixdiff_cli.routing.router import load_router

    s = settings or RoutingSettings()
    cat = catalog if not isinstance(catalog, (str, Path)) else load_catalog(catalog)
    s.check()
    items = list(labeled) if not isinstance(labeled, (str, Path)) else read_labeled(labeled)
    if not items:
        raise EvaluateError("no labelled prompts", file_example(("prompt", "expert")))
    if not cat.experts:
        raise EvaluateError(f"catalog {cat.path} has no experts", "add experts with 'mixdiff add-expert' first")
    check_labels(items, cat.names, cat.path)
    router = load_router(cat, s.encoder, device=s.device)
    k = min(s.top_k, len(cat.names))
    outside_prompts = _outside(outside)
    options = {"top_k": k, "temperature": s.temperature, "threshold": s.threshold, "abstain": s.abstain}
    routes = router.route([it.prompt for it in items], **options)
    probs = _prob_matrix(routes, cat.names)
    split = s.threshold or 0.5  # a threshold of 0 (or the calibrated abstention) splits nothing
    metrics = routing_metrics([it.expert for it in items], probs, cat.names, top_k=k, threshold=split, bins=s.bins)
    _add_final_routes(metrics, items, routes, probs, cat.names)
    metrics["abstention"] = _abstention(routes, router.route(outside_prompts, **options) if outside_prompts else None, router)
    settings_out = {"labels": str(labeled) if isinstance(labeled, (str, Path)) else None, "top_k": k, "threshold": s.threshold,
                    "abstain": s.abstain, "temperature": s.temperature, "bins": s.bins,
                    "outside": str(outside) if isinstance(outside, (str, Path)) else None}
    data = report_header("routing", cat, settings_out, {"routing": "deterministic (no sampling)"})
    data["router"] = {**router.info(), "warnings": list(router.warnings)}
    data["metrics"] = metrics
    data["gates"] = gates(metrics, min_accuracy=s.min_accuracy)
    return Report("routing", data, routing_markdown(data), routing_figures(metrics))


def _add_final_routes(metrics: dict[str, Any], items: Sequence[Labeled], routes: Sequence[Any], probs: Any, names: Sequence[str]) -> None:
    """Add to the gate's `metrics` what the final routes did: each prediction's prompt, chosen experts and
    trigger words, `routes` (abstained, trigger-forced) and the `headline` accuracies."""
    k = metrics["top_k"]
    forced = 0
    for pred, item, route in zip(metrics["predictions"], items, routes):
        pred["prompt"] = item.prompt
        pred["chosen"] = [[name, float(w)] for name, w in route.chosen]
        triggered = sorted(n for n, why in route.reasons.items() if why.startswith("trigger"))
        if triggered:
            pred["triggered"] = triggered
            forced += 1
    metrics["routes"] = {
        "abstained": sum(1 for r in routes if not r.chosen),  # no expert passed the threshold: bare base
        "trigger_forced": forced,
        "chosen_top1_accuracy": sum(1 for r, it in zip(routes, items) if r.chosen and r.chosen[0][0] == it.expert) / len(items),
    }
    index = {e: i for i, e in enumerate(names)}
    ranks = [_route_rank([n for n, _ in r.chosen], index[it.expert], row, index) for r, it, row in zip(routes, items, probs)]
    metrics["headline"] = {
        "what": "the route generate would use: trigger words first, then the gate's ranking; below --threshold, the bare base",
        "top1_accuracy": metrics["routes"]["chosen_top1_accuracy"],
        "topk_accuracy": sum(r < k for r in ranks) / len(items),
        "topn": topn_curve(ranks, len(names)),
        "gate_top1_accuracy": metrics["top1_accuracy"],
        "gate_topk_accuracy": metrics["topk_accuracy"],
    }


def _outside(outside: str | Path | Sequence[str] | None) -> list[str]:
    """The prompts of `outside`: a list, or a file (.txt: one per line, blank lines and # comments skipped;
    .jsonl: the "prompt" of each row)."""
    if outside is None:
        return []
    if not isinstance(outside, (str, Path)):
        return [str(p) for p in outside]
    path = Path(outside)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        from mixdiff_cli.routing.labels import read_prompt_rows

        return read_prompt_rows(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluateError(f"cannot read --outside {path}: {exc.strerror if isinstance(exc, OSError) else 'not UTF-8 text'}",
                            "pass a text file with one prompt per line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise EvaluateError(f"no prompts in --outside {path}", "one prompt no expert is for per line, e.g. 'a bowl of ramen'")
    return prompts


def _abstention(inside: Sequence[Any], outside: Sequence[Any] | None, router: Any) -> dict[str, Any]:
    """How often the labelled (in-world) prompts and the `outside` ones went to the bare base: recall
    (outside prompts abstained), precision (abstentions that were outside prompts)."""
    abstained_in = sum(1 for r in inside if not r.chosen)
    out: dict[str, Any] = {"fit_threshold": router.fit_threshold, "in_world": {"n": len(inside), "abstained": abstained_in,
                           "rate": abstained_in / len(inside) if inside else None}}
    if outside is not None:
        abstained_out = sum(1 for r in outside if not r.chosen)
        total = abstained_in + abstained_out
        out["outside"] = {"n": len(outside), "abstained": abstained_out, "recall": abstained_out / len(outside) if outside else None,
                          "missed": [r.prompt for r in outside if r.chosen][:50]}
        out["precision"] = abstained_out / total if total else None
    return out


def _prob_matrix(routes: Sequence[Any], names: Sequence[str]) -> Any:
    """(N, E) float64 array of the routes' gate probabilities, columns in `names` order."""
    import numpy as np

    if not routes:
        return np.zeros((0, len(names)))
    order = list(routes[0].probs)
    matrix = np.array([list(r.probs.values()) for r in routes], dtype=np.float64)  # the router's column order
    return matrix if order == list(names) else matrix[:, [order.index(n) for n in names]]


def _route_rank(chosen: Sequence[str], label: int, probs: Any, index: Mapping[str, int]) -> int:
    """Where the label is in the final route's ranking: the chosen experts in order (the bare base first
    when none was chosen), then the others in the gate's order (ties: catalog order). 0-based."""

    def gate_rank(i: int) -> int:
        return int((probs > probs[i]).sum() + (probs[:i] == probs[i]).sum())

    names = [index[n] for n in chosen]
    if label in names:
        return names.index(label)
    mine = gate_rank(label)
    ahead = sum(1 for i in names if gate_rank(i) < mine)
    return (len(names) or 1) + mine - ahead
