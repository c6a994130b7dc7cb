"""The reports' PNG figures from their metrics: routing confusion, usage, calibration and top-N; the loss matrix."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mixdiff_cli.evaluation.markdown import pct
from mixdiff_cli.evaluation.metrics import BASE_LABEL, CONFUSION_MAX

if TYPE_CHECKING:
    from PIL import Image


def routing_figures(metrics: Mapping[str, Any]) -> dict[str, Image.Image]:
    """confusion.png (up to CONFUSION_MAX experts; above, confused.png: the most-confused pairs), usage.png
    (the most used experts above CONFUSION_MAX), calibration.png and topn.png (top-1..top-10 accuracy)."""
    from mixdiff_cli.evaluation.figures import HeatmapStyle, bars, heatmap

    names = metrics["experts"]
    figures = {}
    conf = metrics["confusion"]["matrix"]
    if conf is not None:
        shade = [[c / sum(row) if sum(row) else None for c in row] for row in conf]
        figures["confusion.png"] = heatmap(
            conf, names, names, text=[[str(c) for c in row] for row in conf], shade=shade,
            style=HeatmapStyle(title=f"Routing confusion (n={metrics['n']}, top-1 accuracy {pct(metrics['top1_accuracy'])})",
                               cmap="blues", row_title="label", col_title="router's top-1"),
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
        [usage[e] for e in shown], shown, text=[f"{pct(usage[e])} ({metrics['per_expert'][e]['predicted']})" for e in shown],
        reference=1 / len(names), title=f"Top-1 usage ({what}balance {metrics['usage']['balance']:.2f}; dashed: equal share)",
    )
    table = metrics["calibration"]["bins"]
    figures["calibration.png"] = bars(
        [b["accuracy"] or 0.0 for b in table], [f"p {b['lo']:.1f}-{b['hi']:.1f}" for b in table],
        text=[f"acc {pct(b['accuracy'])}, n={b['n']}" for b in table],
        title=f"Accuracy by confidence (ECE {metrics['calibration']['ece']:.3f})",
    )
    head = metrics.get("headline")
    curve = head["topn"] if head else metrics["topn"]
    figures["topn.png"] = bars(
        list(curve.values()), [f"top-{m}" for m in curve], text=[pct(v) for v in curve.values()],
        title=f"Top-N accuracy of the {'final route' if head else 'gate'} ({len(names)} experts, n={metrics['n']})",
    )
    return figures


def loss_figure(base: Mapping[str, float], losses: Mapping[str, Mapping[str, float]], metrics: Mapping[str, Any]) -> Image.Image:
    """Rows: base then experts; columns: domains; cells: loss and ratio to the base, coloured by the
    ratio on a log scale saturating at x0.71 / x1.41 (blue: lower than the base, red: higher); own-domain
    cells outlined."""
    from mixdiff_cli.evaluation.figures import HeatmapStyle, heatmap

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
        values, rows, domains, text=text, shade=shade, highlight=own,
        style=HeatmapStyle(title="Held-out denoising loss (x: ratio to base; outlined: own domain)", cmap="diverging",
                           row_title="model", col_title="domain"),
    )
