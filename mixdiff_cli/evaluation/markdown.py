"""report.md of each report kind (routing, experts, samples) from its report.json data, and the text
formats (tables, percentages, route labels) the reports and their figures share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mixdiff_cli import __version__
from mixdiff_cli.evaluation.metrics import BASE_LABEL


def pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal; None as '-'."""
    return "-" if x is None else f"{100 * x:.1f}%"


def few(names: Sequence[str], shown: int = 10) -> str:
    """Up to `shown` names, then how many more."""
    if not names:
        return "none"
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def route_label(chosen: Sequence[tuple[str, float]]) -> str:
    """'shapes 0.70, stripes 0.30', or the bare base when no expert was chosen."""
    return ", ".join(f"{n} {w:.2f}" for n, w in chosen) if chosen else "base (no expert)"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats to 4 decimals (1 from 10 up), None as '-'."""
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
    return ["## Gates", "", md_table(["gate", "limit", "value", "result", "detail"], rows), ""]


def _md_document(title: str, data: Mapping[str, Any], body: list[str]) -> str:
    """A report's Markdown: header, gates, then `body`."""
    return "\n".join(_md_header(title, data) + _md_gates(data) + body)


# --- routing --------------------------------------------------------------------------------------


def routing_markdown(data: Mapping[str, Any]) -> str:
    """report.md of a routing evaluation."""
    m = data["metrics"]
    small = m["confusion"]["matrix"] is not None
    lines = _routing_accuracy_md(data) + _routing_experts_md(m, small) + _routing_confusion_md(m, small)
    lines += _routing_calibration_md(m["calibration"]) + _routing_abstention_md(m.get("abstention")) + _routing_errors_md(m)
    return _md_document("Routing evaluation", data, lines)


def _routing_abstention_md(ab: Mapping[str, Any] | None) -> list[str]:
    """How many labelled and --outside prompts went to the bare base."""
    if not ab:
        return []
    inside = ab["in_world"]
    rows = [["labelled (in world)", inside["n"], inside["abstained"], pct(inside["rate"])]]
    if "outside" in ab:
        rows.append(["--outside", ab["outside"]["n"], ab["outside"]["abstained"], pct(ab["outside"]["recall"])])
    lines = ["## Abstention", "", f"Fit threshold: {ab['fit_threshold'] if ab['fit_threshold'] is not None else 'none (this router never abstains by itself)'}.", "",
             md_table(["prompts", "n", "bare base", "rate"], rows), ""]
    if "outside" in ab:
        lines += [f"Recall {pct(ab['outside']['recall'])} (outside prompts that abstained), precision "
                  f"{pct(ab['precision']) if ab['precision'] is not None else '-'} (abstentions that were outside prompts).", ""]
        if ab["outside"]["missed"]:
            lines += ["Outside prompts routed to an expert: " + "; ".join(f"`{p}`" for p in ab["outside"]["missed"][:10]), ""]
    return lines


def _routing_accuracy_md(data: Mapping[str, Any]) -> list[str]:
    """Accuracy of the final route and of the gate, top-N, and the router's warnings."""
    m = data["metrics"]
    head = m.get("headline") or {"top1_accuracy": m["top1_accuracy"], "topk_accuracy": m["topk_accuracy"], "topn": m["topn"]}
    return [
        "## Accuracy",
        "",
        md_table(["prompts", "experts", "top-1", f"top-{m['top_k']}", "gate top-1", f"gate top-{m['top_k']}", "balanced", "macro F1"],
                 [[m["n"], len(m["experts"]), pct(head["top1_accuracy"]), pct(head["topk_accuracy"]), pct(m["top1_accuracy"]),
                   pct(m["topk_accuracy"]), pct(m["balanced_accuracy"]), m["macro_f1"]]]),
        "",
        f"Top-1 and top-{m['top_k']}: the route `generate` would use (trigger words force their experts in, then the "
        f"{data['router']['kind']} gate on the {data['router']['encoder']!r} encoder ranks the rest; below the threshold, the "
        f"bare base). Gate: its own ranking alone. {m['routes']['trigger_forced']} prompts had experts forced by trigger words "
        f"and {m['routes']['abstained']} went to the bare base (fitting no expert, or below --threshold).",
        "",
        md_table(["", *[f"top-{n}" for n in head["topn"]]], [["final route", *map(pct, head["topn"].values())],
                                                             ["gate", *map(pct, m["topn"].values())]]),
        "",
        "![top-N](topn.png)",
        "",
        *[line for w in data["router"].get("warnings", []) for line in (f"> warning: {w}", "")],
    ]


def _routing_experts_md(m: Mapping[str, Any], small: bool) -> list[str]:
    """One row per expert (above CONFUSION_MAX experts: the 20 routed worst) and the load balance."""
    names = m["experts"]
    per_expert = list(m["per_expert"].items())
    if not small:  # the experts routed worst, instead of one row each
        per_expert = sorted(((e, p) for e, p in per_expert if p["support"]), key=lambda ep: (ep[1]["recall"], -ep[1]["support"]))[:20]
    return [
        "## Per expert" if small else f"## The {len(per_expert)} experts routed worst (report.json has all {len(names)})",
        "",
        md_table(["expert", "support", "routed here (top-1)", "precision", "recall", "F1", "top-1 share", "mean p"],
                 [[e, p["support"], p["predicted"], p["precision"], p["recall"], p["f1"], pct(m["usage"]["top1"][e]),
                   m["usage"]["mean_prob"][e]] for e, p in per_expert]),
        "",
        f"Load balance: normalised entropy of top-1 usage {m['usage']['balance']:.3f} (1 = even), largest share "
        f"{pct(m['usage']['max_share'])}, unused: {few(m['usage']['unused'])}.",
        "",
    ]


def _routing_confusion_md(m: Mapping[str, Any], small: bool) -> list[str]:
    """The confusion matrix, or above CONFUSION_MAX experts the most-confused pairs."""
    names = m["experts"]
    if small:
        return ["## Confusion matrix (rows: label, columns: router's top-1)", "",
                md_table(["label \\ top-1", *names], [[e, *row] for e, row in zip(names, m["confusion"]["matrix"])]), "",
                "![confusion](confusion.png) ![usage](usage.png)", ""]
    return ["## Most-confused pairs (label -> router's top-1)", "",
            md_table(["label", "routed to", "prompts"], [[p["label"], p["top1"], p["n"]] for p in m["confused"][:20]]), "",
            "![most-confused pairs](confused.png) ![usage](usage.png)", ""]


def _routing_calibration_md(cal: Mapping[str, Any]) -> list[str]:
    """Accuracy above and below the threshold, and the reliability table."""
    return [
        "## Calibration",
        "",
        f"Threshold {cal['threshold']:g}: {cal['confident']['n']} prompts at or above it (top-1 accuracy "
        f"{pct(cal['confident']['accuracy'])}), {cal['below_threshold']} below it ({pct(cal['below_threshold_fraction'])}; "
        f"accuracy {pct(cal['unconfident']['accuracy'])}). Mean confidence {cal['mean_confidence']:.3f}, ECE {cal['ece']:.3f}.",
        "",
        md_table(["confidence", "prompts", "mean confidence", "accuracy"],
                 [[f"{b['lo']:.1f}-{b['hi']:.1f}", b["n"], b["confidence"], pct(b["accuracy"])] for b in cal["bins"]]),
        "",
        "![calibration](calibration.png)",
        "",
    ]


def _routing_errors_md(m: Mapping[str, Any]) -> list[str]:
    """The first 50 prompts the gate misrouted."""
    errors = [m["predictions"][i] for i in m["errors"]]
    if not errors:
        return []
    lines = ["## Misrouted prompts (gate)", "",
             md_table(["prompt", "label", "top-1", "confidence"],
                      [[p.get("prompt", ""), p["label"], p["top1"], p["confidence"]] for p in errors[:50]]), ""]
    if len(errors) > 50:
        lines += [f"... and {len(errors) - 50} more (report.json lists them all).", ""]
    return lines


# --- experts and samples --------------------------------------------------------------------------


def experts_markdown(data: Mapping[str, Any]) -> str:
    """report.md of an expert evaluation: domains, the loss matrix and the ratios to the base."""
    m = data["metrics"]
    base, losses = data["losses"][BASE_LABEL], data["losses"]["experts"]
    domains, s = m["domains"], m["summary"]
    return _md_document("Expert specialisation: held-out denoising loss", data, [
        "## Domains",
        "",
        md_table(["domain", "folder", "images", "evaluations", "dataset sha256"],
                 [[d, v["folder"], v["images"], v["evals"], v["dataset_hash"][:12]] for d, v in data["domains"].items()]),
        "",
        "## Loss matrix (rows: model, columns: domain; lower is better)",
        "",
        md_table(["model", *domains], [[BASE_LABEL, *[base[d] for d in domains]], *[[e, *[row[d] for d in domains]] for e, row in losses.items()]]),
        "",
        "## Ratio to the base (below 1: the expert helps on that domain)",
        "",
        md_table(["expert", *domains, "best domain", "own domain", "specialised"],
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


def samples_markdown(data: Mapping[str, Any]) -> str:
    """report.md of a samples evaluation: the contact sheet, prompts, pixel changes and CLIP scores."""
    cols = data["summary"]["columns"]
    lines = _md_header("Samples: routed mixture, base and single experts", data) + _md_gates(data)
    lines += ["![contact sheet](contact_sheet.png)", ""]
    header = ["#", "prompt", "seed"] + (["route"] if "routed" in cols else [])
    rows = []
    for i, r in enumerate(data["samples"]):
        row = [i, r["prompt"], r["seed"]]
        if "routed" in cols:
            row.append(route_label([(n, float(w)) for n, w in r["route"]["chosen"]]))
        rows.append(row)
    lines += ["## Prompts", "", md_table(header, rows), ""]
    lines += ["## Mean absolute pixel difference from the base (0-1)", "",
              md_table(cols[:0] + [c for c in cols if c != BASE_LABEL], [[data["summary"]["delta_from_base"][c] for c in cols if c != BASE_LABEL]]) if len(cols) > 1 else "-", ""]
    if "clip_score" in data["summary"]:
        lines += ["## CLIP score (100 x cosine, mean over prompts; higher is better)", "",
                  md_table(cols, [[data["summary"]["clip_score"][c] for c in cols]]), "",
                  md_table(["#", *cols], [[i, *[r["clip_score"][c] for c in cols]] for i, r in enumerate(data["samples"])]), ""]
    return "\n".join(lines)
