"""The gate: a cosine classifier over prompt embeddings, and its forward pass written once.

logits = scale * normalize(W) @ phi(z) + b with z = normalize(x - mean) (Gidaris & Komodakis 2018,
"Dynamic Few-Shot Visual Learning without Forgetting"), so a prototype row is commensurate with trained
rows and a new expert joins by weight imprinting (Qi et al. 2018, "Low-Shot Learning with Imprinted
Weights"): its row is its normalised mean feature, the other rows stay as they are.

`forward_features`, `row_matrix` and `forward_logits` take torch tensors (training, `Gate`) or numpy
arrays (`Router`, one decision in a handful of small ops): the same formula on either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

PROTOTYPE_SCALE = 10.0  # cosine -> logit for prototype routing: cos 0.3 apart is ~20:1 odds


def _unit_np(v: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as torch.nn.functional.normalize (eps 1e-12)."""
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _silu_np(h: np.ndarray) -> np.ndarray:
    return h / (1.0 + np.exp(-h))


def _ops(x: Any) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """(normalize rows, silu) for `x`'s framework: numpy, else torch."""
    if isinstance(x, np.ndarray):
        return _unit_np, _silu_np
    import torch.nn.functional as F

    return (lambda v: F.normalize(v, dim=-1)), F.silu


def forward_features(x: Any, mean: Any, w1: Any = None, b1: Any = None, w2: Any = None) -> Any:
    """(N, D) raw embeddings -> (N, D) unit features phi(z), z = normalize(x - mean).

    phi(z) = z (linear gate) or normalize(z + W2 silu(W1 z + b1)) (one hidden layer, a residual MLP that
    starts as the identity), so rows always live in the D-dim space where prototypes are computed."""
    unit, silu = _ops(x)
    z = unit(x - mean)  # (N, D)
    if w1 is None:
        return z
    return unit(z + silu(z @ w1.T + b1) @ w2.T)  # (N, H) hidden, back to (N, D)


def row_matrix(weight: Any, scale: Any) -> Any:
    """(E, D) gate rows -> the (D, E) matrix scale * normalize(rows).T that features multiply."""
    unit, _ = _ops(weight)
    return scale * unit(weight).T


def none_logit(features: Any, weight: Any, scale: Any, bias: Any) -> Any:
    """(N, D) features -> (N,) logit of the "none of these" row: scale * cos(feature, row) + bias, as an
    expert's; zeros without a row."""
    if weight is None:
        return features[:, 0] * 0
    unit, _ = _ops(weight)
    return features @ (scale * unit(weight[None])[0]) + bias


def fit_margin(logits: Any, none: Any) -> Any:
    """(N, E) expert logits, (N,) none logits -> (N,) log-odds of "some expert" against "none of these":
    logsumexp(logits) - none (numpy or torch)."""
    if isinstance(logits, np.ndarray):
        top = logits.max(-1)
        return top + np.log(np.exp(logits - top[:, None]).sum(-1)) - none
    import torch

    return torch.logsumexp(logits, -1) - none


def fit_score(margin: Any, platt: tuple[float, float] = (1.0, 0.0)) -> Any:
    """(N,) `fit_margin` -> (N,) fit = P(some expert fits) = sigmoid(a * margin + b), `platt` = (a, b)
    fitted at calibration (Platt 1999); (1, 0) is the gate's own 1 - softmax([logits, none])[none]."""
    z = platt[0] * margin + platt[1]
    if isinstance(z, np.ndarray):
        return (0.5 * (1 + np.tanh(0.5 * z))).astype(np.float32)  # sigmoid without overflow
    import torch

    return torch.sigmoid(z)


def forward_logits(features: Any, matrix: Any, bias: Any) -> Any:
    """(N, D) features, (D, E) `row_matrix`, (E,) bias -> (N, E) logits."""
    return features @ matrix + bias


@dataclass
class Gate:
    """logits = scale * normalize(weight) @ phi(z) + bias, z = normalize(x - mean) (see `forward_features`)."""

    mean: torch.Tensor  # (D,)
    weight: torch.Tensor  # (E, D) rows, normalised when used
    bias: torch.Tensor  # (E,)
    scale: float
    w1: torch.Tensor | None = None  # (H, D)
    b1: torch.Tensor | None = None  # (H,)
    w2: torch.Tensor | None = None  # (D, H)
    own_cos: torch.Tensor | None = None  # (E,) mean cosine of each row with its own expert's prompts
    none_weight: torch.Tensor | None = None  # (D,) the "none of these" row, learnt from generic captions (routing.generic)
    none_bias: float = 0.0
    temperature: float = 1.0  # fitted on held-out prompts (Guo et al. 2017): probabilities = softmax(logits / temperature)
    fit_threshold: float | None = None  # abstain when fit = P(some expert) is below it; None: never abstain
    fit_platt: tuple[float, float] = (1.0, 0.0)  # fit = sigmoid(a * margin + b), calibrated on held-out prompts and generic captions

    @property
    def hidden(self) -> int:
        return 0 if self.w1 is None else int(self.w1.shape[0])

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) raw embeddings -> (N, D) unit features phi(z)."""
        return forward_features(x, self.mean, self.w1, self.b1, self.w2)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, E)."""
        return forward_logits(self.features(x), row_matrix(self.weight, self.scale), self.bias)

    def none_logit(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) features -> (N,) logit of "none of these" (zeros and no effect on fit when there is no such row)."""
        return none_logit(features, self.none_weight, self.scale, self.none_bias)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The gate as named float32 tensors, as a checkpoint stores them."""
        import torch

        out = {"mean": self.mean, "weight": self.weight, "bias": self.bias, "scale": torch.tensor([self.scale])}
        if self.w1 is not None:
            out.update({"mlp.w1": self.w1, "mlp.b1": self.b1, "mlp.w2": self.w2})
        if self.own_cos is not None:
            out["own_cos"] = self.own_cos
        if self.none_weight is not None:
            out.update({"none.weight": self.none_weight, "none.bias": torch.tensor([self.none_bias])})
        if self.temperature != 1.0:
            out["temperature"] = torch.tensor([self.temperature])
        if self.fit_threshold is not None:
            out["fit_threshold"] = torch.tensor([self.fit_threshold])
        if self.fit_platt != (1.0, 0.0):
            out["fit_platt"] = torch.tensor(self.fit_platt)
        return {k: v.detach().float().contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> Gate:
        """The inverse of `tensors`."""
        one = lambda key, default: float(t[key].reshape(-1)[0]) if key in t else default  # noqa: E731
        return cls(
            mean=t["mean"], weight=t["weight"], bias=t["bias"], scale=one("scale", None),
            w1=t.get("mlp.w1"), b1=t.get("mlp.b1"), w2=t.get("mlp.w2"), own_cos=t.get("own_cos"),
            none_weight=t.get("none.weight"), none_bias=one("none.bias", 0.0), temperature=one("temperature", 1.0),
            fit_threshold=one("fit_threshold", None),
            fit_platt=tuple(float(v) for v in t["fit_platt"].reshape(-1)[:2]) if "fit_platt" in t else (1.0, 0.0),  # type: ignore[arg-type]
        )


def prototype(gate: Gate, vectors: torch.Tensor) -> torch.Tensor:
    """(N, D) embeddings of one expert's prompts -> its (D,) unit row: the normalised mean feature."""
    import torch.nn.functional as F

    return F.normalize(gate.features(vectors).mean(0), dim=-1)


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
