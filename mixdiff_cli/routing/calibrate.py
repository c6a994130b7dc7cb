"""Calibration of a gate on held-out prompts: the temperature of its expert probabilities (Guo et al.
2017, "On Calibration of Modern Neural Networks", temperature scaling) and the fit threshold under which
it abstains (the bare base), set between the experts' held-out prompts and generic captions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from mixdiff_cli.routing.gate import Gate

TEMPERATURES = np.exp(np.linspace(np.log(0.05), np.log(20.0), 301))  # the grid searched, 0.05..20
IN_WORLD_WEIGHT = 2.0  # an expert's prompt sent to the bare base costs twice a generic prompt sent to an expert


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T in `TEMPERATURES` that minimises the held-out NLL of softmax(logits / T); (N, E), (N,)."""
    if not len(labels):
        return 1.0
    z = logits.detach().double().cpu().numpy()  # (N, E)
    y = labels.cpu().numpy()
    best, best_nll = 1.0, float("inf")
    for t in TEMPERATURES:
        s = z / t
        s = s - s.max(-1, keepdims=True)
        nll = float((np.log(np.exp(s).sum(-1)) - s[np.arange(len(y)), y]).mean())
        if nll < best_nll - 1e-12:
            best, best_nll = float(t), nll
    return round(best, 4)


def fit_platt(margin_in: torch.Tensor | np.ndarray, margin_out: torch.Tensor | np.ndarray, ridge: float = 1e-2) -> tuple[float, float]:
    """(a, b) of the logistic regression P(in world) = sigmoid(a * margin + b) on the fit margins of experts'
    held-out prompts (label 1) against generic captions (label 0), each kind weighted to half (Platt 1999);
    a small ridge keeps `a` finite when the two are separable. (1, 0) without both kinds."""
    m_in, m_out = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (margin_in, margin_out))
    if not len(m_in) or not len(m_out):
        return 1.0, 0.0
    m = np.concatenate([m_in, m_out])
    y = np.concatenate([np.ones(len(m_in)), np.zeros(len(m_out))])
    w = np.concatenate([np.full(len(m_in), 0.5 / len(m_in)), np.full(len(m_out), 0.5 / len(m_out))])
    scale = max(float(m.std()), 1e-6)  # Newton's method on standardised margins
    z, theta = (m - m.mean()) / scale, np.zeros(2)
    for _ in range(100):
        p = 1 / (1 + np.exp(-(theta[0] * z + theta[1])))
        grad = np.array([(w * (p - y) * z).sum() + ridge * theta[0], (w * (p - y)).sum()])
        h = w * p * (1 - p)
        hess = np.array([[(h * z * z).sum() + ridge, (h * z).sum()], [(h * z).sum(), h.sum() + 1e-12]])
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    a = theta[0] / scale
    return round(float(a), 6), round(float(theta[1] - a * m.mean()), 6)


def fit_threshold(fit_in: torch.Tensor | np.ndarray, fit_out: torch.Tensor | np.ndarray) -> float | None:
    """The fit threshold that best separates experts' held-out prompts (`fit_in`, kept at or above it)
    from generic captions (`fit_out`, abstained below it): the maximum of IN_WORLD_WEIGHT * recall + the
    abstention rate, in the middle of the widest gap that reaches it. None without both kinds of prompt."""
    a = np.sort(np.asarray(fit_in, dtype=np.float64))
    b = np.sort(np.asarray(fit_out, dtype=np.float64))
    if not len(a) or not len(b):
        return None
    cuts = np.unique(np.concatenate([a, b, [0.0, 1.0]]))
    mids = np.concatenate([[0.0], (cuts[1:] + cuts[:-1]) / 2, [1.0]])  # thresholds between observed values
    kept = 1 - np.searchsorted(a, mids, side="left") / len(a)  # in-world at or above
    abstained = np.searchsorted(b, mids, side="left") / len(b)  # generic below
    score = IN_WORLD_WEIGHT * kept + abstained
    best = np.flatnonzero(score >= score.max() - 1e-12)
    # of the best thresholds, the run of consecutive candidates that is widest in fit, and its middle
    runs = np.split(best, np.flatnonzero(np.diff(best) > 1) + 1)
    run = max(runs, key=lambda r: mids[r[-1]] - mids[r[0]])
    return round(float((mids[run[0]] + mids[run[-1]]) / 2), 4)


def calibrate(gate: Gate, x: torch.Tensor, y: torch.Tensor | None, generic: torch.Tensor | None) -> dict[str, Any]:
    """Fit `gate`'s temperature on held-out prompts `x` (labels `y`; None keeps it) and, with held-out
    `generic` captions and a "none" row, its abstention (`calibrate_fit`); set both on the gate and
    return what was measured."""
    import torch

    from mixdiff_cli.routing.gate import forward_logits, row_matrix

    out: dict[str, Any] = {}
    if y is not None:
        with torch.no_grad():
            gate.temperature = fit_temperature(forward_logits(gate.features(x), row_matrix(gate.weight, gate.scale), gate.bias), y)
        out["temperature"] = gate.temperature
    return {**out, **calibrate_fit(gate, x, generic)}


def calibrate_fit(gate: Gate, x: torch.Tensor, generic: torch.Tensor | None) -> dict[str, Any]:
    """Set `gate.fit_platt` and `gate.fit_threshold` from experts' prompts `x` (kept) against `generic`
    captions (abstained); without a "none" row or generic captions, the gate never abstains."""
    import torch

    from mixdiff_cli.routing.gate import fit_margin, fit_score, forward_logits, row_matrix

    gate.fit_threshold = None
    if gate.none_weight is None or generic is None or not len(generic) or not len(x):
        return {}
    with torch.no_grad():
        margin_in, margin_out = (
            fit_margin(forward_logits(f, row_matrix(gate.weight, gate.scale), gate.bias), gate.none_logit(f))
            for f in (gate.features(x), gate.features(generic))
        )
    gate.fit_platt = fit_platt(margin_in, margin_out)
    fit_in, fit_out = (fit_score(m, gate.fit_platt) for m in (margin_in, margin_out))
    gate.fit_threshold = fit_threshold(fit_in, fit_out)
    if gate.fit_threshold is None:
        return {}
    return {"fit_threshold": gate.fit_threshold, "fit_platt": list(gate.fit_platt), "n_generic": len(generic),
            "kept_in_world": round(float((fit_in >= gate.fit_threshold).float().mean()), 4),
            "abstained_generic": round(float((fit_out < gate.fit_threshold).float().mean()), 4)}
