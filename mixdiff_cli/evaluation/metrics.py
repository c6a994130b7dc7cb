"""Pure evaluation metrics: routing accuracy and calibration, loss-matrix specialisation, quality gates.

Lists and dicts in, a dict out; numpy is imported inside the functions that use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

BASE_LABEL = "base"  # the bare base model's row / column in reports
CONFUSION_MAX = 30  # experts up to which routing reports carry the confusion matrix (else the most-confused pairs)
CONFUSED_SHOWN = 50  # most-confused pairs a routing report lists


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

    names = list(experts)
    _check_routing_inputs(labels, probs, names)
    n, idx = len(labels), {e: i for i, e in enumerate(names)}
    e_count, k = len(names), max(1, min(top_k, len(names)))
    p = np.asarray(probs, dtype=np.float64) if not isinstance(probs[0], Mapping) else np.array([[float(row.get(e, 0.0)) for e in names] for row in probs])
    y = np.array([idx[label] for label in labels])  # (N,)
    ranks = np.argsort(-p, axis=1, kind="stable")  # (N, E): ties keep catalog order
    top1 = ranks[:, 0]
    conf_l = p[np.arange(n), top1].tolist()  # (N,) confidence
    hit1 = top1 == y
    hitk = (ranks[:, :k] == y[:, None]).any(1)
    label_rank = (ranks == y[:, None]).argmax(1)  # (N,) where the label is in each ranking
    pairs: dict[tuple[int, int], int] = {}
    for t, c in zip(y.tolist(), top1.tolist()):
        pairs[t, c] = pairs.get((t, c), 0) + 1
    predicted = np.bincount(top1, minlength=e_count)
    per_expert = _per_expert(names, np.bincount(y, minlength=e_count), predicted, np.bincount(y[hit1], minlength=e_count))
    labelled = [e for e in names if per_expert[e]["support"]]
    hit_l = hit1.tolist()
    confusion, confused = _confusion(names, pairs)
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
        "confused": confused,
        "usage": _usage(names, predicted.tolist(), np.bincount(ranks[:, :k].ravel(), minlength=e_count), p.sum(0) / n),
        "calibration": _calibration(conf_l, hit_l, threshold, bins),
        "predictions": [{"label": labels[i], "top1": names[top1[i]], "confidence": conf_l[i], "ranking": [names[j] for j in ranks[i, :k]]}
                        for i in range(n)],
        "errors": [i for i in range(n) if not hit_l[i]],
    }


def _check_routing_inputs(labels: Sequence[str], probs: Sequence[Any], names: Sequence[str]) -> None:
    n = len(labels)
    if n == 0:
        raise ValueError("no labelled prompts")
    if len(probs) != n:
        raise ValueError(f"{len(probs)} probability rows for {n} labels")
    if not names:
        raise ValueError("no experts")
    unknown = sorted(set(labels) - set(names))
    if unknown:
        raise ValueError(f"labels name unknown experts: {unknown}")


def _per_expert(names: Sequence[str], support: Any, predicted: Any, correct: Any) -> dict[str, dict[str, Any]]:
    """Precision, recall and F1 of each expert from its (E,) label, top-1 and right-top-1 counts."""
    per_expert: dict[str, dict[str, Any]] = {}
    for i, e in enumerate(names):
        tp, sup, pred = int(correct[i]), int(support[i]), int(predicted[i])
        precision, recall = _div(tp, pred), _div(tp, sup)
        f1 = None
        if precision is not None and recall is not None:
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_expert[e] = {"support": sup, "predicted": pred, "correct": tp, "precision": precision, "recall": recall, "f1": f1}
    return per_expert


def _usage(names: Sequence[str], counts: Sequence[int], in_topk: Any, mean_prob: Any) -> dict[str, Any]:
    """Load balance from the (E,) top-1 counts, top-k membership counts and mean probabilities."""
    n = sum(counts)
    shares = [c / n for c in counts]
    entropy = -sum(s * math.log(s) for s in shares if s > 0)
    mean = n / len(names)
    return {
        "top1": {e: s for e, s in zip(names, shares)},
        "topk": {e: int(c) / n for e, c in zip(names, in_topk)},
        "mean_prob": {e: float(m) for e, m in zip(names, mean_prob)},
        # normalised entropy of the top-1 shares: 1 = every expert used equally, 0 = one expert only
        "balance": entropy / math.log(len(names)) if len(names) > 1 else 1.0,
        "max_share": max(shares),
        "unused": [e for e, c in zip(names, counts) if c == 0],
        "cv": math.sqrt(sum((c - mean) ** 2 for c in counts) / len(names)) / mean,  # coefficient of variation
    }


def _calibration(conf_l: Sequence[float], hit_l: Sequence[bool], threshold: float, bins: int) -> dict[str, Any]:
    """Accuracy above and below `threshold`, the reliability table and the ECE (Guo et al. 2017, Eq. 3)."""
    n = len(conf_l)
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
    return {
        "threshold": threshold,
        "confident": {"n": len(confident), "accuracy": _div(sum(hit_l[i] for i in confident), len(confident))},
        "unconfident": {"n": len(unsure), "accuracy": _div(sum(hit_l[i] for i in unsure), len(unsure))},
        "below_threshold": len(unsure),
        "below_threshold_fraction": len(unsure) / n,
        "mean_confidence": math.fsum(conf_l) / n,
        "bins": table,
        "ece": ece,
    }


def _confusion(names: Sequence[str], pairs: Mapping[tuple[int, int], int]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The confusion matrix (None above CONFUSION_MAX experts) and the most-confused pairs, from
    {(label index, top-1 index): prompts}."""
    idx = {e: i for i, e in enumerate(names)}
    e_count = len(names)
    confusion: dict[str, Any] = {"labels": list(names), "matrix": None}
    if e_count <= CONFUSION_MAX:
        confusion["matrix"] = [[pairs.get((t, c), 0) for c in range(e_count)] for t in range(e_count)]
    confused = sorted(((names[t], names[c], m) for (t, c), m in pairs.items() if t != c), key=lambda x: (-x[2], idx[x[0]], idx[x[1]]))
    return confusion, [{"label": t, "top1": c, "n": m} for t, c, m in confused[:CONFUSED_SHOWN]]


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
    per_expert = _loss_per_expert(domains, ratios)
    per_domain = _loss_per_domain(base, experts, ratios)
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


def _loss_per_expert(domains: Sequence[str], ratios: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """Each expert's best domain, own domain (the one named like it) and how far ahead it is there."""
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
    return per_expert


def _loss_per_domain(base: Mapping[str, float], experts: Mapping[str, Mapping[str, float]],
                     ratios: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """Each domain's lowest-loss expert, and whether it beats the base there."""
    per_domain: dict[str, dict[str, Any]] = {}
    for d in base:
        best_e = min(experts, key=lambda e: (experts[e][d], list(experts).index(e))) if experts else None
        best_loss = experts[best_e][d] if best_e else None
        per_domain[d] = {
            "base": base[d],
            "best_expert": best_e,
            "best_expert_loss": best_loss,
            "best_expert_ratio": ratios[best_e][d] if best_e else None,
            "best": best_e if best_e is not None and best_loss < base[d] else BASE_LABEL,
        }
    return per_domain


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
