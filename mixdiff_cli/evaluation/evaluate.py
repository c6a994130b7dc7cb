"""Evaluation reports on a catalog: how well the router routes, whether each expert specialises, and
what the mixture draws.

- `evaluate_routing`: top-1 / top-k accuracy of the router on labelled prompts, per-expert precision
  and recall, the confusion matrix, expert usage (load balance) and calibration.
- `evaluate_experts`: the held-out denoising loss of the base and of every expert on every domain,
  with the fixed noise and timesteps of fine-tune's validation loss (deterministic run to run).
- `evaluate_samples`: each prompt rendered with the routed mixture, the bare base and each single
  expert at fixed seeds, as a contact sheet; optionally scored with a local CLIP model.

Each returns a `Report` (JSON-able numbers, markdown tables, figures) that `write_report` saves.
The metric functions (`routing_metrics`, `loss_matrix_metrics`, `gates`) are pure: lists and dicts
in, a dict out. Heavy frameworks are imported inside the functions that run models.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mixdiff_cli import __version__
from mixdiff_cli.core.errors import MixdiffError, UsageError
from mixdiff_cli.routing.labels import Labeled, check_labels, read_labeled

if TYPE_CHECKING:
    from PIL import Image

    from mixdiff_cli.catalog.schema import Catalog
    from mixdiff_cli.sampling.options import GenerationOptions

ReportKind = Literal["routing", "experts", "samples"]
REPORT_FORMAT = "mixdiff-evaluate/1"
BASE_LABEL = "base"  # the bare base model's row / column in reports
CONFUSION_MAX = 30  # experts up to which routing reports carry the confusion matrix (else the most-confused pairs)
CONFUSED_SHOWN = 50  # most-confused pairs a routing report lists


class EvaluateError(MixdiffError):
    """Evaluation inputs that cannot be used (labels, prompt files, data folders, CLIP model)."""


class GateFailed(MixdiffError):
    """A quality gate (--min-accuracy, --max-loss-ratio) was not met; the report is still written."""


# --- input files ----------------------------------------------------------------------------------


def _example(columns: tuple[str, ...]) -> str:
    if columns == ("prompt",):
        return 'write one prompt per line (.txt), {"prompt": "..."} lines (.jsonl) or a "prompt" column (.csv)'
    return 'write lines like {"prompt": "a red circle", "expert": "shapes"} (.jsonl) or a csv with the header prompt,expert'


def parse_data_specs(specs: Sequence[str]) -> dict[str, Path]:
    """`NAME=DIR` (or a bare DIR, named after its folder) -> {domain: folder}, in the given order."""
    domains: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            name, folder = Path(spec).name, spec
        name = name.strip()
        if not name or not folder.strip():
            raise UsageError(f"bad --data {spec!r}", "write NAME=DIR, e.g. --data stripes=./heldout/stripes")
        if name in domains:
            raise UsageError(f"domain {name!r} given twice in --data", "give each domain one folder")
        domains[name] = Path(folder).expanduser()
    if not domains:
        raise UsageError("no --data folders", "pass --data NAME=DIR once per domain, named after the expert it belongs to")
    return domains


# --- pure metrics ---------------------------------------------------------------------------------


def ranking(probs: Mapping[str, float], experts: Sequence[str]) -> list[str]:
    """Experts by decreasing probability; ties keep catalog order."""
    order = {e: i for i, e in enumerate(experts)}
    return sorted(experts, key=lambda e: (-float(probs.get(e, 0.0)), order[e]))


def _div(a: float, b: float) -> float | None:
    return a / b if b else None


def routing_metrics(
    labels: Sequence[str],
    probs: Sequence[Mapping[str, float]] | Any,
    experts: Sequence[str],
    *,
    top_k: int = 2,
    threshold: float = 0.5,
    bins: int = 5,
) -> dict[str, Any]:
    """Accuracy, per-expert precision/recall, confusion, usage and calibration of routing decisions.

    `labels[i]` is the right expert for prompt i and `probs[i]` the router's probabilities over
    `experts` (a mapping per prompt, or an (N, E) array in `experts` order). The top-1 choice is the most
    probable expert (ties: catalog order); its probability is the confidence. `threshold` splits confident
    from unconfident prompts; `bins` equal-width confidence bins give the reliability table and the expected
    calibration error (Guo et al. 2017, Eq. 3). Above `CONFUSION_MAX` experts the confusion matrix is left
    out: `confused` (the most-confused pairs) and `topn` (top-1..top-10 accuracy) stay readable at any size.
    """
    import numpy as np

    n, names = len(labels), list(experts)
    if n == 0:
        raise ValueError("no labelled prompts")
    if len(probs) != n:
        raise ValueError(f"{len(probs)} probability rows for {n} labels")
    if not names:
        raise ValueError("no experts")
    unknown = sorted(set(labels) - set(names))
    if unknown:
        raise ValueError(f"labels name unknown experts: {unknown}")
    idx = {e: i for i, e in enumerate(names)}
    e_count, k = len(names), max(1, min(top_k, len(names)))
    p = np.asarray(probs, dtype=np.float64) if not isinstance(probs[0], Mapping) else np.array([[float(row.get(e, 0.0)) for e in names] for row in probs])
    y = np.array([idx[label] for label in labels])  # (N,)
    ranks = np.argsort(-p, axis=1, kind="stable")  # (N, E): ties keep catalog order
    top1 = ranks[:, 0]
    conf = p[np.arange(n), top1]  # (N,)
    hit1 = top1 == y
    hitk = (ranks[:, :k] == y[:, None]).any(1)
    label_rank = (ranks == y[:, None]).argmax(1)  # (N,) where the label is in each ranking

    pairs: dict[tuple[int, int], int] = {}
    for t, c in zip(y.tolist(), top1.tolist()):
        pairs[t, c] = pairs.get((t, c), 0) + 1
    support, predicted = np.bincount(y, minlength=e_count), np.bincount(top1, minlength=e_count)
    correct = np.bincount(y[hit1], minlength=e_count)
    per_expert: dict[str, dict[str, Any]] = {}
    for i, e in enumerate(names):
        tp, sup, pred = int(correct[i]), int(support[i]), int(predicted[i])
        precision, recall = _div(tp, pred), _div(tp, sup)
        f1 = None
        if precision is not None and recall is not None:
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_expert[e] = {"support": sup, "predicted": pred, "correct": tp, "precision": precision, "recall": recall, "f1": f1}
    labelled = [e for e in names if per_expert[e]["support"]]

    counts = predicted.tolist()
    shares = [c / n for c in counts]
    entropy = -sum(s * math.log(s) for s in shares if s > 0)
    mean = n / len(names)
    in_topk = np.bincount(ranks[:, :k].ravel(), minlength=e_count)
    mean_prob = p.sum(0) / n
    usage = {
        "top1": {e: s for e, s in zip(names, shares)},
        "topk": {e: int(c) / n for e, c in zip(names, in_topk)},
        "mean_prob": {e: float(m) for e, m in zip(names, mean_prob)},
        # normalised entropy of the top-1 shares: 1 = every expert used equally, 0 = one expert only
        "balance": entropy / math.log(len(names)) if len(names) > 1 else 1.0,
        "max_share": max(shares),
        "unused": [e for e, c in zip(names, counts) if c == 0],
        "cv": math.sqrt(sum((c - mean) ** 2 for c in counts) / len(names)) / mean,  # coefficient of variation
    }

    conf_l, hit_l = conf.tolist(), hit1.tolist()
    confident = [i for i in range(n) if conf_l[i] >= threshold]
    unsure = [i for i in range(n) if conf_l[i] < threshold]
    table = []
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i in range(n) if min(int(conf_l[i] * bins), bins - 1) == b]
        acc = _div(sum(hit_l[i] for i in members), len(members))
        mean_conf = _div(math.fsum(conf_l[i] for i in members), len(members))
        if members:
            ece += len(members) / n * abs(acc - mean_conf)
        table.append({"lo": lo, "hi": hi, "n": len(members), "confidence": mean_conf, "accuracy": acc})
    calibration = {
        "threshold": threshold,
        "confident": {"n": len(confident), "accuracy": _div(sum(hit_l[i] for i in confident), len(confident))},
        "unconfident": {"n": len(unsure), "accuracy": _div(sum(hit_l[i] for i in unsure), len(unsure))},
        "below_threshold": len(unsure),
        "below_threshold_fraction": len(unsure) / n,
        "mean_confidence": math.fsum(conf_l) / n,
        "bins": table,
        "ece": ece,
    }
    confusion: dict[str, Any] = {"labels": names, "matrix": None}
    if e_count <= CONFUSION_MAX:
        confusion["matrix"] = [[pairs.get((t, c), 0) for c in range(e_count)] for t in range(e_count)]
    confused = sorted(((names[t], names[c], m) for (t, c), m in pairs.items() if t != c), key=lambda x: (-x[2], idx[x[0]], idx[x[1]]))
    return {
        "n": n,
        "experts": names,
        "top_k": k,
        "top1_accuracy": float(hit1.mean()),
        "topk_accuracy": float(hitk.mean()),
        "topn": topn_curve(label_rank, e_count),
        "balanced_accuracy": math.fsum(per_expert[e]["recall"] for e in labelled) / len(labelled),
        "macro_f1": math.fsum(per_expert[e]["f1"] or 0.0 for e in labelled) / len(labelled),
        "per_expert": per_expert,
        "confusion": confusion,
        "confused": [{"label": t, "top1": c, "n": m} for t, c, m in confused[:CONFUSED_SHOWN]],
        "usage": usage,
        "calibration": calibration,
        "predictions": [{"label": labels[i], "top1": names[top1[i]], "confidence": conf_l[i], "ranking": [names[j] for j in ranks[i, :k]]}
                        for i in range(n)],
        "errors": [i for i in range(n) if not hit_l[i]],
    }


def topn_curve(label_rank: Any, n_experts: int, up_to: int = 10) -> dict[str, float]:
    """{"1": top-1 accuracy, ..., "10": top-10} from each prompt's 0-based rank of its label."""
    import numpy as np

    ranks = np.asarray(label_rank)
    return {str(m): float((ranks < m).mean()) for m in range(1, min(up_to, n_experts) + 1)}


def loss_matrix_metrics(base: Mapping[str, float], experts: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Specialisation from held-out losses: `base[domain]` and `experts[name][domain]`.

    The ratio expert/base per domain removes how hard each domain is; an expert's best domain is its
    lowest ratio, and a domain named like an expert is that expert's own. A specialised expert's best
    domain is its own.
    """
    domains = list(base)
    if not domains:
        raise ValueError("no domains")
    for name, row in experts.items():
        missing = [d for d in domains if d not in row]
        if missing:
            raise ValueError(f"expert {name} has no loss on {missing}")
    ratios = {e: {d: row[d] / base[d] if base[d] else math.inf for d in domains} for e, row in experts.items()}
    per_expert: dict[str, dict[str, Any]] = {}
    for e, r in ratios.items():
        best = min(domains, key=lambda d: (r[d], domains.index(d)))
        own = e if e in domains else None
        others = [r[d] for d in domains if d != own]
        per_expert[e] = {
            "best_domain": best,
            "best_ratio": r[best],
            "own_domain": own,
            "own_ratio": r[own] if own else None,
            # how much lower the own ratio is than the best other domain's (positive: specialised)
            "margin": (min(others) - r[own]) if own and others else None,
            "specialised": (best == own) if own else None,
        }
    per_domain: dict[str, dict[str, Any]] = {}
    for d in domains:
        best_e = min(experts, key=lambda e: (experts[e][d], list(experts).index(e))) if experts else None
        best_loss = experts[best_e][d] if best_e else None
        per_domain[d] = {
            "base": base[d],
            "best_expert": best_e,
            "best_expert_loss": best_loss,
            "best_expert_ratio": ratios[best_e][d] if best_e else None,
            "best": best_e if best_e is not None and best_loss < base[d] else BASE_LABEL,
        }
    owned = [e for e in per_expert if per_expert[e]["own_domain"]]
    own_ratios = [per_expert[e]["own_ratio"] for e in owned]
    return {
        "domains": domains,
        "experts": list(experts),
        "ratios": ratios,
        "per_expert": per_expert,
        "per_domain": per_domain,
        "summary": {
            "with_own_domain": len(owned),
            "specialised": sum(1 for e in owned if per_expert[e]["specialised"]),
            "own_best_on_domain": sum(1 for e in owned if per_domain[e]["best_expert"] == e),
            "worst_own_ratio": max(own_ratios) if own_ratios else None,
            "mean_own_ratio": math.fsum(own_ratios) / len(own_ratios) if own_ratios else None,
        },
    }


def gates(metrics: Mapping[str, Any], *, min_accuracy: float | None = None, max_loss_ratio: float | None = None) -> list[dict[str, Any]]:
    """Quality gates over routing metrics (top-1 accuracy >= min_accuracy) or loss-matrix metrics
    (every expert's loss on its own domain <= max_loss_ratio x the base's)."""
    result = []
    if min_accuracy is not None:
        acc = metrics.get("headline", metrics)["top1_accuracy"]  # the route generate would use, when evaluated
        result.append({
            "name": "min_accuracy", "limit": min_accuracy, "value": acc, "passed": acc >= min_accuracy,
            "detail": f"top-1 routing accuracy {acc:.3f} {'>=' if acc >= min_accuracy else '<'} --min-accuracy {min_accuracy:g}",
        })
    if max_loss_ratio is not None:
        over = {e: p["own_ratio"] for e, p in metrics["per_expert"].items() if p["own_ratio"] is not None and p["own_ratio"] > max_loss_ratio}
        worst = metrics["summary"]["worst_own_ratio"]
        if worst is None:
            detail, passed = "no domain is named after an evaluated expert", False
        elif over:
            detail = "loss/base on own domain above --max-loss-ratio {:g}: {}".format(
                max_loss_ratio, ", ".join(f"{e} {r:.3f}" for e, r in over.items()))
            passed = False
        else:
            detail, passed = f"every expert's own-domain loss ratio <= {max_loss_ratio:g} (worst {worst:.3f})", True
        result.append({"name": "max_loss_ratio", "limit": max_loss_ratio, "value": worst, "passed": passed, "detail": detail})
    return result


# --- reports --------------------------------------------------------------------------------------


@dataclass
class Report:
    """What one evaluation produced: `data` (report.json), `markdown` (report.md) and PNG figures."""

    kind: ReportKind
    data: dict[str, Any]
    markdown: str
    figures: dict[str, Image.Image] = field(default_factory=dict)  # file name -> figure
    images: dict[str, Image.Image] = field(default_factory=dict)  # relative path -> rendered sample

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [g for g in self.data.get("gates", []) if not g["passed"]]

    def check(self) -> None:
        """Raise `GateFailed` when a gate was not met."""
        failed = self.failed
        if failed:
            where = self.data.get("files", {}).get("report.md", "report.md")
            raise GateFailed("quality gate failed: " + "; ".join(g["detail"] for g in failed), f"see {where} for the details")

    def to_dict(self) -> dict[str, Any]:
        return self.data


def _versions() -> dict[str, str]:
    from mixdiff_cli.core.runtime import versions

    return versions()


def _header(kind: ReportKind, cat: Catalog, settings: dict[str, Any], seeds: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": REPORT_FORMAT,
        "kind": kind,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "catalog": {"path": str(cat.path), "hash": cat.hash(), "base": cat.base.to_dict() if cat.base else None,
                    "router": cat.router, "experts": cat.names},
        "versions": _versions(),
        "settings": settings,
        "seeds": seeds,
    }


def write_report(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """report.json, report.md, figures and samples into `out_dir`, each written atomically."""
    from mixdiff_cli.core.fsutil import atomic_path, atomic_write

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EvaluateError(f"--out {out_dir} is a file", "pass a folder for the report")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for rel, image in {**report.images, **report.figures}.items():
        path = out_dir / rel
        if "mixdiff" in image.info:
            from mixdiff_cli.sampling.pngmeta import save_png

            save_png(image, path)
        else:
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
        written[rel] = path
    report.data["files"] = {**{rel: str(p) for rel, p in written.items()}, "report.json": str(out_dir / "report.json"),
                            "report.md": str(out_dir / "report.md")}
    written["report.md"] = atomic_write(out_dir / "report.md", report.markdown)
    written["report.json"] = atomic_write(out_dir / "report.json", json.dumps(report.data, indent=2, default=_jsonable) + "\n")
    return written


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def _md_header(title: str, data: Mapping[str, Any]) -> list[str]:
    cat = data["catalog"]
    return [
        f"# {title}",
        "",
        f"- catalog: `{cat['path']}` (hash `{cat['hash'][:12]}`)",
        f"- created: {data['created']}; mixdiff {data['versions'].get('mixdiff', __version__)}, "
        + ", ".join(f"{k} {v}" for k, v in data["versions"].items() if k != "mixdiff"),
        "- settings: " + ", ".join(f"{k}={v}" for k, v in data["settings"].items() if v is not None),
        "- seeds: " + ", ".join(f"{k}={v}" for k, v in data["seeds"].items()),
        "",
    ]


def _md_gates(data: Mapping[str, Any]) -> list[str]:
    if not data.get("gates"):
        return []
    rows = [[g["name"], g["limit"], g["value"], "pass" if g["passed"] else "FAIL", g["detail"]] for g in data["gates"]]
    return ["## Gates", "", _md_table(["gate", "limit", "value", "result", "detail"], rows), ""]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


# --- routing --------------------------------------------------------------------------------------


def evaluate_routing(
    catalog: Catalog | str | Path,
    labeled: str | Path | Sequence[Labeled],
    *,
    top_k: int = 2,
    threshold: float = 0.0,
    temperature: float = 1.0,
    encoder: str | None = None,
    bins: int = 5,
    device: str | None = None,
    min_accuracy: float | None = None,
) -> Report:
    """Route every labelled prompt with the catalog's router and measure its probabilities (see
    `routing_metrics`). Trigger words and the threshold act after the gate: the report counts the
    prompts they forced or left to the bare base separately, and its headline (`metrics["headline"]`) is
    the route `generate` would use with them. `threshold` is the router's (default 0, as generate's); the
    calibration table splits confidence at it, or at 0.5 when it is 0."""
    from mixdiff_cli.catalog.schema import load_catalog
    from mixdiff_cli.routing.router import load_router

    cat = catalog if not isinstance(catalog, (str, Path)) else load_catalog(catalog)
    _check_range("--top-k", top_k, 1)
    _check_range("--bins", bins, 1)
    if not 0 <= threshold < 1:
        raise UsageError(f"--threshold {threshold} must be in [0, 1)", "pass e.g. --threshold 0.5")
    if min_accuracy is not None:
        _check_unit("--min-accuracy", min_accuracy)
    items = list(labeled) if not isinstance(labeled, (str, Path)) else read_labeled(labeled)
    if not items:
        raise EvaluateError("no labelled prompts", _example(("prompt", "expert")))
    if not cat.experts:
        raise EvaluateError(f"catalog {cat.path} has no experts", "add experts with 'mixdiff add-expert' first")
    check_labels(items, cat.names, cat.path)
    router = load_router(cat, encoder, device=device)
    k = min(top_k, len(cat.names))
    routes = router.route([it.prompt for it in items], top_k=k, temperature=temperature, threshold=threshold)
    probs = _prob_matrix(routes, cat.names)
    split = threshold or 0.5  # a threshold of 0 splits nothing
    metrics = routing_metrics([it.expert for it in items], probs, cat.names, top_k=k, threshold=split, bins=bins)
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
    index = {e: i for i, e in enumerate(cat.names)}
    ranks = [_route_rank([n for n, _ in r.chosen], index[it.expert], row, index) for r, it, row in zip(routes, items, probs)]
    metrics["headline"] = {
        "what": "the route generate would use: trigger words first, then the gate's ranking; below --threshold, the bare base",
        "top1_accuracy": metrics["routes"]["chosen_top1_accuracy"],
        "topk_accuracy": sum(r < k for r in ranks) / len(items),
        "topn": topn_curve(ranks, len(cat.names)),
        "gate_top1_accuracy": metrics["top1_accuracy"],
        "gate_topk_accuracy": metrics["topk_accuracy"],
    }
    settings = {"labels": str(labeled) if isinstance(labeled, (str, Path)) else None, "top_k": k, "threshold": threshold,
                "temperature": temperature, "bins": bins}
    data = _header("routing", cat, settings, {"routing": "deterministic (no sampling)"})
    data["router"] = {**router.info(), "warnings": list(router.warnings)}
    data["metrics"] = metrics
    data["gates"] = gates(metrics, min_accuracy=min_accuracy)
    return Report("routing", data, routing_markdown(data), routing_figures(metrics))


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


def routing_figures(metrics: Mapping[str, Any]) -> dict[str, Image.Image]:
    """confusion.png (up to CONFUSION_MAX experts; above, confused.png: the most-confused pairs), usage.png
    (the most used experts above CONFUSION_MAX), calibration.png and topn.png (top-1..top-10 accuracy)."""
    from mixdiff_cli.evaluation.figures import bars, heatmap

    names = metrics["experts"]
    figures = {}
    conf = metrics["confusion"]["matrix"]
    if conf is not None:
        shade = [[c / sum(row) if sum(row) else None for c in row] for row in conf]
        figures["confusion.png"] = heatmap(
            conf, names, names, text=[[str(c) for c in row] for row in conf], shade=shade, cmap="blues",
            title=f"Routing confusion (n={metrics['n']}, top-1 accuracy {_pct(metrics['top1_accuracy'])})",
            row_title="label", col_title="router's top-1",
        )
    else:
        pairs = metrics["confused"][:15] or [{"label": "-", "top1": "-", "n": 0}]
        most = max(p["n"] for p in pairs) or 1
        figures["confused.png"] = bars(
            [p["n"] / most for p in pairs], [f"{p['label']} -> {p['top1']}" for p in pairs], text=[str(p["n"]) for p in pairs],
            title=f"Most-confused pairs (label -> router's top-1) of {len(names)} experts, n={metrics['n']}",
        )
    usage = metrics["usage"]["top1"]
    shown = names if len(names) <= CONFUSION_MAX else sorted(names, key=lambda e: -usage[e])[:20]
    what = "" if len(shown) == len(names) else f"the {len(shown)} most used of {len(names)}; "
    figures["usage.png"] = bars(
        [usage[e] for e in shown], shown, text=[f"{_pct(usage[e])} ({metrics['per_expert'][e]['predicted']})" for e in shown],
        reference=1 / len(names), title=f"Top-1 usage ({what}balance {metrics['usage']['balance']:.2f}; dashed: equal share)",
    )
    table = metrics["calibration"]["bins"]
    figures["calibration.png"] = bars(
        [b["accuracy"] or 0.0 for b in table], [f"p {b['lo']:.1f}-{b['hi']:.1f}" for b in table],
        text=[f"acc {_pct(b['accuracy'])}, n={b['n']}" for b in table],
        title=f"Accuracy by confidence (ECE {metrics['calibration']['ece']:.3f})",
    )
    head = metrics.get("headline")
    curve = head["topn"] if head else metrics["topn"]
    figures["topn.png"] = bars(
        list(curve.values()), [f"top-{m}" for m in curve], text=[_pct(v) for v in curve.values()],
        title=f"Top-N accuracy of the {'final route' if head else 'gate'} ({len(names)} experts, n={metrics['n']})",
    )
    return figures


def _md_document(title: str, data: Mapping[str, Any], body: list[str]) -> str:
    """A report's Markdown: header, gates, then `body`."""
    return "\n".join(_md_header(title, data) + _md_gates(data) + body)


def routing_markdown(data: Mapping[str, Any]) -> str:
    m, cal = data["metrics"], data["metrics"]["calibration"]
    names = m["experts"]
    head = m.get("headline") or {"top1_accuracy": m["top1_accuracy"], "topk_accuracy": m["topk_accuracy"], "topn": m["topn"]}
    small = m["confusion"]["matrix"] is not None
    per_expert = list(m["per_expert"].items())
    if not small:  # the experts routed worst, instead of one row each
        per_expert = sorted(((e, p) for e, p in per_expert if p["support"]), key=lambda ep: (ep[1]["recall"], -ep[1]["support"]))[:20]
    lines = [
        "## Accuracy",
        "",
        _md_table(["prompts", "experts", "top-1", f"top-{m['top_k']}", "gate top-1", f"gate top-{m['top_k']}", "balanced", "macro F1"],
                  [[m["n"], len(names), _pct(head["top1_accuracy"]), _pct(head["topk_accuracy"]), _pct(m["top1_accuracy"]),
                    _pct(m["topk_accuracy"]), _pct(m["balanced_accuracy"]), m["macro_f1"]]]),
        "",
        f"Top-1 and top-{m['top_k']}: the route `generate` would use (trigger words force their experts in, then the "
        f"{data['router']['kind']} gate on the {data['router']['encoder']!r} encoder ranks the rest; below the threshold, the "
        f"bare base). Gate: its own ranking alone. {m['routes']['trigger_forced']} prompts had experts forced by trigger words "
        f"and {m['routes']['abstained']} fell below the threshold.",
        "",
        _md_table(["", *[f"top-{n}" for n in head["topn"]]], [["final route", *map(_pct, head["topn"].values())],
                                                              ["gate", *map(_pct, m["topn"].values())]]),
        "",
        "![top-N](topn.png)",
        "",
        *[line for w in data["router"].get("warnings", []) for line in (f"> warning: {w}", "")],
        "## Per expert" if small else f"## The {len(per_expert)} experts routed worst (report.json has all {len(names)})",
        "",
        _md_table(["expert", "support", "routed here (top-1)", "precision", "recall", "F1", "top-1 share", "mean p"],
                  [[e, p["support"], p["predicted"], p["precision"], p["recall"], p["f1"], _pct(m["usage"]["top1"][e]),
                    m["usage"]["mean_prob"][e]] for e, p in per_expert]),
        "",
        f"Load balance: normalised entropy of top-1 usage {m['usage']['balance']:.3f} (1 = even), largest share "
        f"{_pct(m['usage']['max_share'])}, unused: {_few(m['usage']['unused'])}.",
        "",
    ]
    if small:
        lines += ["## Confusion matrix (rows: label, columns: router's top-1)", "",
                  _md_table(["label \\ top-1", *names], [[e, *row] for e, row in zip(names, m["confusion"]["matrix"])]), "",
                  "![confusion](confusion.png) ![usage](usage.png)", ""]
    else:
        lines += ["## Most-confused pairs (label -> router's top-1)", "",
                  _md_table(["label", "routed to", "prompts"], [[p["label"], p["top1"], p["n"]] for p in m["confused"][:20]]), "",
                  "![most-confused pairs](confused.png) ![usage](usage.png)", ""]
    lines += [
        "## Calibration",
        "",
        f"Threshold {cal['threshold']:g}: {cal['confident']['n']} prompts at or above it (top-1 accuracy "
        f"{_pct(cal['confident']['accuracy'])}), {cal['below_threshold']} below it ({_pct(cal['below_threshold_fraction'])}; "
        f"accuracy {_pct(cal['unconfident']['accuracy'])}). Mean confidence {cal['mean_confidence']:.3f}, ECE {cal['ece']:.3f}.",
        "",
        _md_table(["confidence", "prompts", "mean confidence", "accuracy"],
                  [[f"{b['lo']:.1f}-{b['hi']:.1f}", b["n"], b["confidence"], _pct(b["accuracy"])] for b in cal["bins"]]),
        "",
        "![calibration](calibration.png)",
        "",
    ]
    errors = [m["predictions"][i] for i in m["errors"]]
    if errors:
        lines += ["## Misrouted prompts (gate)", "",
                  _md_table(["prompt", "label", "top-1", "confidence"],
                            [[p.get("prompt", ""), p["label"], p["top1"], p["confidence"]] for p in errors[:50]]), ""]
        if len(errors) > 50:
            lines += [f"... and {len(errors) - 50} more (report.json lists them all).", ""]
    return _md_document("Routing evaluation", data, lines)


def _few(names: Sequence[str], shown: int = 10) -> str:
    """Up to `shown` names, then how many more."""
    if not names:
        return "none"
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


# --- experts: held-out denoising loss ------------------------------------------------------------


@dataclass
class _Domain:
    name: str
    folder: Path
    records: list[Any]
    dataset_hash: str
    skipped: int


class HeldoutLoss:
    """The held-out denoising loss of any blend of experts on one set of captioned images.

    The (image, noise, timestep) triples are fine-tune's validation set, built the same way and from the
    same fixed seed, so the numbers are the same run to run and comparable with fine-tune's report.
    `rows[i]` is the record that triple i comes from (records repeat when `evals` > len(records)).
    """

    def __init__(self, engine: Any, records: Sequence[Any], evals: int):
        from diffusers import DDPMScheduler

        from mixdiff_cli.models.text import is_sdxl
        from mixdiff_cli.training.encoding import CaptionEncoder
        from mixdiff_cli.training.loss import make_heldout

        self.engine = engine
        self.text = CaptionEncoder(engine.pipe, "sdxl" if is_sdxl(engine.pipe) else "sd")
        self.scheduler = DDPMScheduler.from_config(engine.pipe.scheduler.config)
        size = engine.unet.config.sample_size
        self.resolution = int((size if isinstance(size, int) else size[0]) * engine.pipe.vae_scale_factor)
        # token ids kept: the text is encoded per model (LoRAs on the encoder)
        self.val = make_heldout(engine.pipe, self.text, records, self.resolution, engine.device, self.scheduler.config.num_train_timesteps,
                                evals=evals)
        self.rows: list[int] = self.val.rows.tolist()

    def __len__(self) -> int:
        return len(self.rows)

    def losses(self, experts: Sequence[str] = (), batch_size: int = 16) -> list[float]:
        """Per-triple MSE with `experts` (equal weights; none: the bare base) active through the mixture
        module. Summed by callers in float64 in a fixed order, so the batch size changes nothing but
        float32 rounding."""
        from mixdiff_cli.sampling.engine import Active
        from mixdiff_cli.sampling.mixture import Blend
        from mixdiff_cli.training.loss import heldout_losses

        engine = self.engine
        cat = engine.catalog
        members = [Active(cat.expert(n), 1.0) for n in experts]
        engine.ensure_loaded([m.name for m in members])
        slices, models, weights = engine.plan(members, "noise")[:3]
        blend = Blend(slices=slices, models=models, weights=weights)
        unet = engine.mixture
        with unet.routed(blend):
            chunks = heldout_losses(unet, self.scheduler, self.text, self.val, chunk=batch_size, dtype=engine.unet.dtype)
        return [x for losses in chunks for x in losses.double().cpu().tolist()]

    def loss(self, experts: Sequence[str] = (), batch_size: int = 16) -> float:
        per = self.losses(experts, batch_size)
        return math.fsum(per) / len(per)


def evaluate_experts(
    catalog: Catalog | str | Path,
    data: Mapping[str, str | Path] | Sequence[str],
    *,
    experts: Sequence[str] | None = None,
    batch_size: int = 16,
    evals: int | None = None,
    max_images: int | None = None,
    device: str | None = None,
    dtype: str | None = "float32",
    max_loss_ratio: float | None = None,
) -> Report:
    """The held-out denoising loss of the base and each expert on each domain's captioned folder.

    Every (image, timestep, noise) triple comes from fine-tune's fixed validation seed, so the matrix is
    the same run to run and comparable with fine-tune's reported held-out loss. Name each domain after
    the expert it belongs to (`{"stripes": "./heldout/stripes"}`) to check specialisation.
    """
    from mixdiff_cli.catalog.schema import load_catalog
    from mixdiff_cli.training.dataset import scan_dataset
    from mixdiff_cli.training.loss import VAL_EVALS, VAL_SEED

    cat = catalog if not isinstance(catalog, (str, Path)) else load_catalog(catalog)
    domains_in = dict(data) if isinstance(data, Mapping) else parse_data_specs(data)
    if not domains_in:
        raise UsageError("no domains to evaluate on", "pass --data NAME=DIR once per domain")
    evals = VAL_EVALS if evals is None else evals
    _check_range("--batch-size", batch_size, 1)
    _check_range("--evals", evals, 1)
    if max_images is not None:
        _check_range("--max-images", max_images, 1)
    if max_loss_ratio is not None and max_loss_ratio <= 0:
        raise UsageError(f"--max-loss-ratio {max_loss_ratio} must be positive", "pass e.g. 0.95: each expert at least 5% below the base on its domain")
    names = list(experts) if experts else cat.names
    if not names:
        raise EvaluateError(f"catalog {cat.path} has no experts", "add experts with 'mixdiff add-expert' first")
    for name in names:
        cat.expert(name)  # ExpertNotFound names the known ones
    if max_loss_ratio is not None and not any(n in domains_in for n in names):
        raise UsageError(
            "--max-loss-ratio needs a domain named after an expert",
            f"name the data folders after the experts they belong to, e.g. --data {names[0]}=DIR",
        )
    domains = []
    for name, folder in domains_in.items():  # every folder is checked before any model loads
        ds = scan_dataset(folder)
        records = ds.records[:max_images] if max_images else ds.records
        ds.records = records
        domains.append(_Domain(name, Path(folder), records, ds.hash(), len(ds.skipped)))

    from mixdiff_cli.sampling.engine import Engine

    engine = Engine(cat, device=device, dtype=dtype, max_loaded=1)
    heldout = {d.name: HeldoutLoss(engine, d.records, evals) for d in domains}
    losses: dict[str, dict[str, float]] = {}
    for model in [None, *names]:
        experts = [] if model is None else [model]
        losses[BASE_LABEL if model is None else model] = {d.name: heldout[d.name].loss(experts, batch_size) for d in domains}
    base = losses.pop(BASE_LABEL)
    metrics = loss_matrix_metrics(base, losses)
    settings = {"data": {d.name: str(d.folder) for d in domains}, "experts": names, "evals": evals, "batch_size": batch_size,
                "max_images": max_images, "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
                "resolution": heldout[domains[0].name].resolution}
    report = _header("experts", cat, settings, {"heldout_noise": VAL_SEED, "latents": "vae posterior mean"})
    report["domains"] = {d.name: {"folder": str(d.folder), "images": len(d.records), "evals": len(heldout[d.name]),
                                  "dataset_hash": d.dataset_hash, "skipped": d.skipped} for d in domains}
    report["losses"] = {BASE_LABEL: base, "experts": losses}
    report["metrics"] = metrics
    report["gates"] = gates(metrics, max_loss_ratio=max_loss_ratio)
    return Report("experts", report, experts_markdown(report), {"losses.png": loss_figure(base, losses, metrics)})


def loss_figure(base: Mapping[str, float], losses: Mapping[str, Mapping[str, float]], metrics: Mapping[str, Any]) -> Image.Image:
    """Rows: base then experts; columns: domains; cells: loss and ratio to the base, coloured by the
    ratio on a log scale saturating at x0.71 / x1.41 (blue: lower than the base, red: higher); own-domain
    cells outlined."""
    from mixdiff_cli.evaluation.figures import heatmap

    domains = list(base)
    rows = [BASE_LABEL, *losses]
    values = [[base[d] for d in domains], *[[losses[e][d] for d in domains] for e in losses]]
    ratios = metrics["ratios"]
    text = [[f"{base[d]:.4f}" for d in domains]]
    shade = [[0.5] * len(domains)]
    for e in losses:
        text.append([f"{losses[e][d]:.4f}\nx{ratios[e][d]:.3f}" for d in domains])
        shade.append([0.5 + 0.5 * max(-1.0, min(1.0, math.log2(ratios[e][d]) / 0.5)) if ratios[e][d] > 0 else 0.0 for d in domains])
    own = [(i + 1, domains.index(e)) for i, e in enumerate(losses) if e in domains]
    return heatmap(
        values, rows, domains, text=text, shade=shade, cmap="diverging", highlight=own,
        title="Held-out denoising loss (x: ratio to base; outlined: own domain)", row_title="model", col_title="domain",
    )


def experts_markdown(data: Mapping[str, Any]) -> str:
    m = data["metrics"]
    base, losses = data["losses"][BASE_LABEL], data["losses"]["experts"]
    domains, s = m["domains"], m["summary"]
    return _md_document("Expert specialisation: held-out denoising loss", data, [
        "## Domains",
        "",
        _md_table(["domain", "folder", "images", "evaluations", "dataset sha256"],
                  [[d, v["folder"], v["images"], v["evals"], v["dataset_hash"][:12]] for d, v in data["domains"].items()]),
        "",
        "## Loss matrix (rows: model, columns: domain; lower is better)",
        "",
        _md_table(["model", *domains], [[BASE_LABEL, *[base[d] for d in domains]], *[[e, *[row[d] for d in domains]] for e, row in losses.items()]]),
        "",
        "## Ratio to the base (below 1: the expert helps on that domain)",
        "",
        _md_table(["expert", *domains, "best domain", "own domain", "specialised"],
                  [[e, *[f"{m['ratios'][e][d]:.3f}" for d in domains], p["best_domain"], p["own_domain"],
                    "-" if p["specialised"] is None else ("yes" if p["specialised"] else "NO")] for e, p in m["per_expert"].items()]),
        "",
        f"Experts with a domain of their own: {s['with_own_domain']}. Doing best (relative to the base) on their own "
        f"domain: {s['specialised']}. Lowest loss of all experts on their own domain: {s['own_best_on_domain']}. "
        f"Worst own-domain ratio: {'-' if s['worst_own_ratio'] is None else format(s['worst_own_ratio'], '.3f')}.",
        "",
        "![loss matrix](losses.png)",
        "",
    ])


# --- samples --------------------------------------------------------------------------------------


def clip_scores(clip_dir: str | Path, images: Sequence[Image.Image], prompts: Sequence[str], device: str | None = None) -> list[float]:
    """CLIPScore of each (image, prompt): 100 * max(cos(image embedding, text embedding), 0), as
    torchmetrics' `CLIPScore` (Hessel et al. 2021, with w = 100). The model folder is read locally only."""
    import torch

    from mixdiff_cli.core.runtime import pick_device

    folder = Path(clip_dir).expanduser()
    if not folder.is_dir():
        raise EvaluateError(f"CLIP model folder {folder} does not exist", "pass --clip with a local CLIPModel folder (config.json, weights, tokenizer, preprocessor_config.json)")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise EvaluateError(f"{folder} has no readable config.json", "pass a folder written by CLIPModel.save_pretrained") from None
    if config.get("model_type") != "clip":
        raise EvaluateError(f"{folder} holds a {config.get('model_type')!r} model, not CLIP", "pass a CLIPModel folder, e.g. openai/clip-vit-base-patch32 downloaded once")
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    dev = pick_device(device)
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).to(dev).eval()
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise EvaluateError(f"could not load the CLIP model in {folder}: {str(exc).splitlines()[0]}",
                            "it needs config.json, model.safetensors, vocab.json, merges.txt and preprocessor_config.json") from None
    max_len = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
    scores: list[float] = []
    with torch.no_grad():
        for i in range(0, len(images), 16):
            ims = [im.convert("RGB") for im in images[i : i + 16]]
            pixels = processor(images=ims, return_tensors="pt")["pixel_values"].to(dev)
            tokens = tokenizer(list(prompts[i : i + 16]), padding=True, truncation=True, max_length=max_len, return_tensors="pt").to(dev)
            img = model.get_image_features(pixel_values=pixels)
            txt = model.get_text_features(**tokens)
            img = getattr(img, "pooler_output", img)
            txt = getattr(txt, "pooler_output", txt)
            cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)  # (B,)
            scores.extend((100 * cos.clamp(min=0)).tolist())
    return scores


def _diff(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute pixel difference in [0, 1]."""
    import numpy as np

    x = np.asarray(a.convert("RGB"), dtype=np.float32)
    y = np.asarray(b.convert("RGB"), dtype=np.float32)
    return float(np.abs(x - y).mean() / 255.0) if x.shape == y.shape else float("nan")


def _route_label(chosen: Sequence[tuple[str, float]]) -> str:
    return ", ".join(f"{n} {w:.2f}" for n, w in chosen) if chosen else "base (no expert)"


@dataclass(frozen=True)
class Sweep:
    """A boundary swept between two experts: `first` takes the run before each boundary, `second` after."""

    first: str
    second: str
    boundaries: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)

    def routes(self) -> dict[str, list[str]]:
        """Column label -> route (`NAME@START:END` members); 0 and 1 are the second and first alone."""
        out: dict[str, list[str]] = {}
        for b in self.boundaries:
            if not 0.0 <= b <= 1.0:
                raise UsageError(f"sweep boundary {b:g} is outside 0..1", "pass boundaries such as 0,0.2,0.4,0.6,0.8,1")
            route = [self.second] if b == 0 else [self.first] if b == 1 else [f"{self.first}@:{b:g}", f"{self.second}@{b:g}:"]
            out[f"{self.first} -> {self.second} at {b:g}"] = route
        return out


def evaluate_samples(
    catalog: Catalog | str | Path,
    prompts: str | Path | Sequence[str],
    options: GenerationOptions | None = None,
    *,
    routed: bool = True,
    clip: str | Path | None = None,
    sweep: Sweep | None = None,
) -> Report:
    """Render each prompt with the routed mixture, the bare base and each single expert (the same seed
    in every column: the file's, else `seed + index`) into a contact sheet; CLIP scores when `clip`
    is a local CLIP model folder. `prompts`: a prompt file (as `mixdiff generate --prompts` reads; its
    per-line expert overrides are ignored, since each column fixes its experts) or a list of prompts.
    `options`: steps (default 20), seed (default 0), top-k (default 2), blend and the rest; its experts,
    when given, are the single-expert columns (default: every expert). `sweep`: instead of the routed and
    single-expert columns, one column per boundary b: `first` over the run before b, `second` after it."""
    from mixdiff_cli.catalog.schema import load_catalog
    from mixdiff_cli.sampling.engine import Engine, Request, RouteInfo
    from mixdiff_cli.sampling.options import GenerationOptions
    from mixdiff_cli.sampling.prompts import PromptItem, load_prompts

    cat = catalog if not isinstance(catalog, (str, Path)) else load_catalog(catalog)
    opts = options or GenerationOptions(top_k=2)
    seed, steps = opts.seed if opts.seed is not None else 0, opts.steps or 20
    scheduler, width, height, blend = opts.scheduler or "ddim", opts.width, opts.height, opts.blend
    top_k, temperature, threshold, device = opts.top_k, opts.temperature, opts.threshold, opts.device
    opts.check()
    if isinstance(prompts, (str, Path)):
        items = load_prompts(prompts)
    else:
        items = [PromptItem(index=i, line=i + 1, prompt=p) for i, p in enumerate(prompts)]
    if not items:
        raise EvaluateError("no prompts", _example(("prompt",)))
    experts = [m.expert for m in opts.experts] or None
    names = list(experts) if experts is not None else cat.names
    for name in names:
        cat.expert(name)
    if clip is not None and not Path(clip).expanduser().is_dir():
        raise EvaluateError(f"CLIP model folder {clip} does not exist", "pass --clip with a local CLIPModel folder, or leave it out")
    routed = routed and bool(cat.experts)

    engine = Engine(cat, device=device, dtype=opts.dtype)
    guidance = engine.default_guidance() if opts.guidance is None else opts.guidance
    requests = [
        Request(it.prompt, negative=it.negative, seed=it.seed if it.seed is not None else seed + it.index,
                steps=it.steps or steps, guidance=guidance if it.guidance is None else it.guidance,
                width=it.width or width, height=it.height or height, scheduler=it.scheduler or scheduler)  # type: ignore[arg-type]
        for it in items
    ]
    texts = [r.prompt for r in requests]
    n = len(requests)
    encoded = engine.encode(texts, [r.negative for r in requests])
    columns: list[str] = []
    grid: dict[str, list[Any]] = {}
    routes: list[Any] = []
    if routed:
        from mixdiff_cli.routing.router import load_router

        router = load_router(cat, pipe=engine.pipe, device=device)
        routes = router.route(texts, top_k=min(top_k, len(cat.names)), temperature=temperature, threshold=threshold)
        columns.append("routed")
        grid["routed"] = [None] * n
        groups: dict[tuple, list[int]] = {}
        for i, route in enumerate(routes):
            # the router rounds weights to 4 digits: a tiny second expert can come back as 0.0, which
            # the engine refuses; it contributes nothing, so leave it out
            groups.setdefault(tuple((e, w) for e, w in route.key if w > 0), []).append(i)
        for key, idx in groups.items():
            images = engine.generate([requests[i] for i in idx], list(key), blend, encoded=encoded.take(idx),  # type: ignore[arg-type]
                                     route_info=RouteInfo("router", routes[idx[0]].to_dict()))
            for i, image in zip(idx, images):
                grid["routed"][i] = image
    columns.append(BASE_LABEL)
    grid[BASE_LABEL] = engine.generate(requests, [], blend, encoded=encoded)  # type: ignore[arg-type]
    fixed = sweep.routes() if sweep is not None else {name: [name] for name in names}
    for label, route in fixed.items():
        columns.append(label)
        grid[label] = engine.generate(requests, route, blend, encoded=encoded)  # type: ignore[arg-type]

    scores: dict[str, list[float]] | None = None
    if clip is not None:
        flat = [grid[c][i] for c in columns for i in range(n)]
        values = clip_scores(clip, flat, [texts[i] for _ in columns for i in range(n)], device=device)
        scores = {c: values[k * n : (k + 1) * n] for k, c in enumerate(columns)}

    rows: list[dict[str, Any]] = []
    images: dict[str, Any] = {}
    for i, req in enumerate(requests):
        row: dict[str, Any] = {"prompt": req.prompt, "negative": req.negative, "seed": grid[BASE_LABEL][i].info["mixdiff"]["seed"],
                               "images": {}, "delta_from_base": {}}
        if routes:
            row["route"] = {"chosen": [[e, w] for e, w in routes[i].chosen], "probs": routes[i].probs, "reasons": routes[i].reasons}
        for c in columns:
            rel = f"samples/{i:03d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', c)}.png"
            images[rel] = grid[c][i]
            row["images"][c] = rel
            if c != BASE_LABEL:
                row["delta_from_base"][c] = _diff(grid[c][i], grid[BASE_LABEL][i])
        if scores is not None:
            row["clip_score"] = {c: scores[c][i] for c in columns}
        rows.append(row)
    summary: dict[str, Any] = {
        "columns": columns,
        "delta_from_base": {c: math.fsum(r["delta_from_base"][c] for r in rows) / n for c in columns if c != BASE_LABEL},
    }
    if scores is not None:
        summary["clip_score"] = {c: math.fsum(scores[c]) / n for c in columns}
        summary["clip_best"] = max(columns, key=lambda c: summary["clip_score"][c])
    first = grid[BASE_LABEL][0]
    settings = {"prompts": str(prompts) if isinstance(prompts, (str, Path)) else None, "steps": steps, "guidance": guidance,
                "scheduler": scheduler, "width": first.width, "height": first.height, "experts": names,
                "routed": routed, "top_k": top_k if routed else None, "threshold": threshold if routed else None,
                "temperature": temperature if routed else None, "blend": blend or "noise",
                "clip": str(clip) if clip else None, "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
                "sweep": None if sweep is None else {"first": sweep.first, "second": sweep.second, "boundaries": list(sweep.boundaries)}}
    data = _header("samples", cat, settings, {"base_seed": seed, "per_prompt": [r["seed"] for r in rows]})
    data["samples"] = rows
    data["summary"] = summary
    data["gates"] = []
    from mixdiff_cli.evaluation.figures import contact_sheet

    sheet = contact_sheet(
        [[grid[c][i] for c in columns] for i in range(n)],
        [f"{i}. {r['prompt']} (seed {r['seed']})" for i, r in enumerate(rows)],
        columns, captions=[[_sample_caption(c, r) for c in columns] for r in rows],
        title=f"Samples: {steps} steps, guidance {guidance:g}, {scheduler}" + (f"; CLIP score from {Path(clip).name}" if clip else ""),
    )
    return Report("samples", data, samples_markdown(data), {"contact_sheet.png": sheet}, images)


def _sample_caption(column: str, row: Mapping[str, Any]) -> str:
    lines = []
    if column == "routed" and "route" in row:
        lines.append(_route_label([(n, float(w)) for n, w in row["route"]["chosen"]]))
    if "clip_score" in row:
        lines.append(f"CLIP {row['clip_score'][column]:.1f}")
    return "\n".join(lines)


def samples_markdown(data: Mapping[str, Any]) -> str:
    cols = data["summary"]["columns"]
    lines = _md_header("Samples: routed mixture, base and single experts", data) + _md_gates(data)
    lines += ["![contact sheet](contact_sheet.png)", ""]
    header = ["#", "prompt", "seed"] + (["route"] if "routed" in cols else [])
    rows = []
    for i, r in enumerate(data["samples"]):
        row = [i, r["prompt"], r["seed"]]
        if "routed" in cols:
            row.append(_route_label([(n, float(w)) for n, w in r["route"]["chosen"]]))
        rows.append(row)
    lines += ["## Prompts", "", _md_table(header, rows), ""]
    lines += ["## Mean absolute pixel difference from the base (0-1)", "",
              _md_table(cols[:0] + [c for c in cols if c != BASE_LABEL], [[data["summary"]["delta_from_base"][c] for c in cols if c != BASE_LABEL]]) if len(cols) > 1 else "-", ""]
    if "clip_score" in data["summary"]:
        lines += ["## CLIP score (100 x cosine, mean over prompts; higher is better)", "",
                  _md_table(cols, [[data["summary"]["clip_score"][c] for c in cols]]), "",
                  _md_table(["#", *cols], [[i, *[r["clip_score"][c] for c in cols]] for i, r in enumerate(data["samples"])]), ""]
    return "\n".join(lines)


# --- argument checks ------------------------------------------------------------------------------


def _check_range(flag: str, value: int, lo: int) -> None:
    if value < lo:
        raise UsageError(f"{flag} {value} must be at least {lo}", f"pass {flag} {lo} or more")


def _check_unit(flag: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise UsageError(f"{flag} {value} must be between 0 and 1", f"pass e.g. {flag} 0.5")
