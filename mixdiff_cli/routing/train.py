"""`router train`: learn the gate's rows, a bias and a scale from each expert's prompts (and a labelled-
prompts file), report held-out accuracy, save the checkpoint and point the catalog's `router:` at it."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixdiff_cli.catalog.model import Catalog
from mixdiff_cli.catalog.schema import load_catalog
from mixdiff_cli.core.errors import MixdiffError
from mixdiff_cli.routing.calibrate import calibrate
from mixdiff_cli.routing.checkpoint import ROUTER_FILE, Checkpoint, for_catalog, read_checkpoint, save_checkpoint
from mixdiff_cli.routing.encoders import Encoder, check_encoder, get_encoder
from mixdiff_cli.routing.errors import RouteOptionError, RouterError, StaleRouter
from mixdiff_cli.routing.gate import PROTOTYPE_SCALE, Gate, forward_features, forward_logits, none_logit, prototype_gate, row_matrix
from mixdiff_cli.routing.labels import check_labels, expert_texts, read_labeled

if TYPE_CHECKING:
    import torch

CONFUSION_MAX = 30  # experts up to which results carry the whole confusion matrix (else the most-confused pairs)


@dataclass
class TrainConfig:
    hidden: int | None = None  # 0: linear cosine gate; N: one hidden layer of N units (residual MLP); None: the last router's, else 0
    epochs: int = 300  # full passes over the training prompts (mini-batches of `batch_size`)
    lr: float = 0.01  # Adam
    seed: int = 0
    val_split: float = 0.2  # held-out fraction per expert (experts with < 2 prompts keep all for training)
    balance: float = 0.01  # load-balancing loss coefficient (Switch Transformer, Fedus et al. 2021, eq. 4)
    batch_size: int = 512
    top_k: int = 2  # also report top-k accuracy
    encoder: str | None = None  # None: the last router's encoder, else "base"
    max_steps: int = 1000  # fewer epochs when they would take more optimizer steps (thousands of experts)
    abstain: bool = True  # learn a "none of these" row from generic captions and calibrate the fit threshold
    outlier: float = 0.5  # weight of the outlier-exposure loss: generic captions spread over the experts (Hendrycks et al. 2019)


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
    confusion: list[list[int]]  # held-out counts: rows = true expert, columns = routed expert ([] above CONFUSION_MAX experts)
    loss: float
    config: TrainConfig
    confused: list[tuple[str, str, int]] = field(default_factory=list)  # held-out (true, routed, count), most first
    epochs: int = 0  # epochs run (config.epochs, or fewer under config.max_steps)
    calibration: dict[str, Any] = field(default_factory=dict)  # temperature, fit_threshold and what they were measured on

    def to_dict(self) -> dict[str, Any]:
        out = {
            "checkpoint": str(self.checkpoint),
            "experts": self.names,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "top1": self.top1,
            f"top{self.k}": self.topk,
            "train_top1": self.train_top1,
            "confused": [{"expert": t, "routed": r, "n": n} for t, r, n in self.confused[:50]],
            "loss": self.loss,
            "epochs": self.epochs,
            "calibration": self.calibration,
            "config": asdict(self.config),
        }
        if self.confusion:
            out["confusion"] = {t: dict(zip(self.names, row)) for t, row in zip(self.names, self.confusion)}
        return out


def _split(examples: list[tuple[str, int]], n_experts: int, val_split: float, seed: int):
    """Stratified: each expert with >= 2 prompts gives round(val_split * n) (at least 1) to the held-out set."""
    rng = random.Random(seed)
    train, val = [], []
    by_expert: list[list[tuple[str, int]]] = [[] for _ in range(n_experts)]
    for x in examples:
        by_expert[x[1]].append(x)
    for mine in by_expert:
        rng.shuffle(mine)
        n_val = 0 if len(mine) < 2 or val_split <= 0 else min(len(mine) - 1, max(1, round(val_split * len(mine))))
        val += mine[:n_val]
        train += mine[n_val:]
    return train, val


def _batch_loss(params: dict[str, torch.Tensor], feats: torch.Tensor, labels: torch.Tensor, n_experts: int, config: TrainConfig,
                with_none: bool) -> torch.Tensor:
    """The loss of one batch of (B, D) features: cross-entropy over the experts (and "none", class E,
    with `with_none`), outlier exposure on the generic captions and Switch load balancing."""
    import torch
    import torch.nn.functional as F

    scale = params["log_scale"].exp()
    logits = forward_logits(feats, row_matrix(params["weight"], scale), params["bias"])  # (B, E)
    mine = labels < n_experts
    if with_none:
        full = torch.cat([logits, none_logit(feats, params["none_w"], scale, params["none_b"])[:, None]], -1)  # (B, E + 1)
        loss = F.cross_entropy(full, labels)
        if (~mine).any():  # outlier exposure: cross-entropy to the uniform distribution over experts
            loss = loss - config.outlier * logits[~mine].log_softmax(-1).mean()
    else:
        loss = F.cross_entropy(logits, labels)
    if mine.any():
        probs = logits[mine].softmax(-1)
        # Switch load balancing: E * sum_i f_i * P_i, f = fraction routed to i, P = mean router prob of i
        frac = F.one_hot(probs.argmax(-1), n_experts).float().mean(0)
        loss = loss + config.balance * n_experts * (frac * probs.mean(0)).sum()
    return loss


def fit_gate(
    x: torch.Tensor, y: torch.Tensor, n_experts: int, config: TrainConfig, progress: Callable[[int, float], None] | None = None,
    generic: torch.Tensor | None = None,
) -> tuple[Gate, float]:
    """Train a cosine gate on (N, D) vectors and labels (N,); rows start at the class prototypes. With
    `generic` (G, D) vectors of generic captions, a "none of these" row learns them (class E) and their
    expert probabilities are pushed towards uniform (outlier exposure: no evidence, no preference)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(config.seed)
    counts = torch.bincount(y, minlength=n_experts)  # (E,)
    gate = prototype_gate(list(x[torch.argsort(y, stable=True)].split(counts.tolist())))  # each expert's (n_e, D), in order
    d, h = x.shape[1], config.hidden
    params: dict[str, torch.Tensor] = {
        "weight": gate.weight.clone(),
        "bias": torch.zeros(n_experts),
        "log_scale": torch.tensor(math.log(PROTOTYPE_SCALE)),
    }
    with_none = generic is not None and len(generic) > 0
    if with_none:
        params["none_w"] = F.normalize(gate.features(generic).mean(0), dim=-1)  # imprinted, as an expert's row
        params["none_b"] = torch.tensor(0.0)
        x, y = torch.cat([x, generic]), torch.cat([y, torch.full((len(generic),), n_experts, dtype=torch.long)])
    if h:
        params["w1"] = torch.randn(h, d, generator=gen) / math.sqrt(d)
        params["b1"] = torch.zeros(h)
        params["w2"] = torch.zeros(d, h)  # the MLP starts as the identity: rows stay prototypes
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=config.lr)
    mlp = lambda: (params.get("w1"), params.get("b1"), params.get("w2"))  # noqa: E731
    n = len(x)
    loss_value = float("nan")
    for epoch in range(epochs_run(config, n)):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            loss = _batch_loss(params, forward_features(x[idx], gate.mean, *mlp()), y[idx], n_experts, config, with_none)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_value = loss.item()
        if progress:
            progress(epoch + 1, loss_value)
    with torch.no_grad():
        w1, b1, w2 = (None if t is None else t.detach().clone() for t in mlp())
        trained = Gate(
            mean=gate.mean, weight=params["weight"].detach().clone(), bias=params["bias"].detach().clone(),
            scale=float(params["log_scale"].exp()), w1=w1, b1=b1, w2=w2,
        )
        if with_none:
            trained.none_weight, trained.none_bias = params["none_w"].detach().clone(), float(params["none_b"])
            x, y = x[y < n_experts], y[y < n_experts]
        own = (trained.features(x) * F.normalize(trained.weight, dim=-1)[y]).sum(-1)  # (N,) cosine with its own row
        trained.own_cos = torch.zeros(n_experts).index_add_(0, y, own) / counts.clamp_min(1)
    return trained, loss_value


def epochs_run(config: TrainConfig, n: int) -> int:
    """`config.epochs`, or fewer so that training takes at most `config.max_steps` optimizer steps."""
    batches = max(1, math.ceil(n / config.batch_size))
    return max(1, min(config.epochs, config.max_steps // batches))


def _confusion(y: list[int], pred: list[int], names: list[str]) -> tuple[list[list[int]], list[tuple[str, str, int]]]:
    """(the held-out confusion matrix, [] above CONFUSION_MAX experts; the (true, routed, count) errors, most first)."""
    pairs = Counter(zip(y, pred))
    confused = sorted(((names[t], names[p], c) for (t, p), c in pairs.items() if t != p), key=lambda x: (-x[2], x[0], x[1]))
    if len(names) > CONFUSION_MAX:
        return [], confused
    matrix = [[0] * len(names) for _ in names]
    for (t, p), c in pairs.items():
        matrix[t][p] = c
    return matrix, confused


def _accuracy(gate: Gate, x: torch.Tensor, y: torch.Tensor, k: int) -> tuple[float, float, torch.Tensor]:
    """(top-1 accuracy, top-k accuracy, (N,) top-1 predictions) of `gate` on vectors `x`, labels `y`."""
    import torch

    with torch.no_grad():  # (N, E) logits a few thousand rows at a time
        top = torch.cat([gate.logits(part).topk(k, dim=-1).indices for part in x.split(4096)])  # (N, k)
    return float((top[:, 0] == y).float().mean()), float((top == y[:, None]).any(-1).float().mean()), top[:, 0]


def _resolved(config: TrainConfig, cat: Catalog) -> TrainConfig:
    """`config` with the encoder and hidden size it leaves open taken from the catalog's current router (a
    retrain after add-expert keeps what the user chose), else base and 0."""
    import dataclasses

    last = None
    if (config.encoder is None or config.hidden is None) and cat.router_path() is not None:
        try:
            last = read_checkpoint(cat.router_path())
        except MixdiffError:
            last = None  # a damaged or missing checkpoint: the defaults
    return dataclasses.replace(
        config,
        encoder=config.encoder or (last.encoder if last else "base"),
        hidden=config.hidden if config.hidden is not None else (last.gate.hidden if last else 0),
    )


def _check_config(config: TrainConfig) -> None:
    if config.hidden < 0 or config.epochs < 1 or config.max_steps < 1 or not config.lr > 0 or not 0 <= config.val_split < 1 or config.balance < 0:
        raise RouteOptionError("bad training options", "use --hidden >= 0, --epochs >= 1, --lr > 0, 0 <= --val-split < 1")
    check_encoder(config.encoder)


def _examples(cat: Catalog, prompts_file: str | Path | None, config: TrainConfig) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(training, held-out) (text, expert index) pairs of the catalog's experts and the labelled file."""
    names = cat.names
    # example prompts (the experts' own and the labelled file's) are split into training and held-out sets;
    # the texts an expert ships with (trigger words, tags, title, description, file name) always train
    pairs = [(t, e.name) for e in cat.experts for t in e.prompts if t.strip()]
    if prompts_file is not None:
        labeled = read_labeled(prompts_file)
        check_labels(labeled, names, cat.path)
        pairs += [(x.prompt, x.expert) for x in labeled]
    pairs = list(dict.fromkeys(pairs))  # drop exact duplicates, keep order
    index = {n: i for i, n in enumerate(names)}
    train, val = _split([(t, index[n]) for t, n in pairs], len(names), config.val_split, config.seed)
    known = set(pairs)
    train += [(t, index[e.name]) for e in cat.experts for t in expert_texts(e) if (t, e.name) not in known]
    return train, val


def _save(ckpt: Checkpoint, cat: Catalog, out_path: Path) -> None:
    """Write the checkpoint and point the catalog's `router:` at it, unless its experts changed meanwhile."""
    from mixdiff_cli.catalog.schema import edit_catalog

    with edit_catalog(cat.path) as live:
        if live.hash() != ckpt.catalog_hash:
            raise StaleRouter("the catalog's experts changed while the router trained", "run 'mixdiff router train' again")
        save_checkpoint(ckpt, out_path)
        live.router = live.relative_source(out_path)


def _with_unseen_words(enc: Encoder, train: list[tuple[str, int]], val: list[tuple[str, int]], fit: tuple[torch.Tensor, torch.Tensor],
                       cal: tuple[torch.Tensor, torch.Tensor], vecs: torch.Tensor, seed: int) -> tuple[Any, Any, Any]:
    """The training and calibration (x, y) of an abstaining gate, each prompt also seen in an unseen
    wording (`routing.generic.noisy`: made-up words inserted to train on, a third of the words replaced
    to calibrate on), and (training, calibration) vectors of the generic negatives."""
    import torch

    from mixdiff_cli.routing.generic import negative_vectors, noisy

    owner = torch.tensor([e for _, e in train + val], dtype=torch.long)
    cal_texts = [t for t, _ in (val if len(val) else train)]
    fit = torch.cat([fit[0], enc(noisy([t for t, _ in train], seed, replace=0.0))]), torch.cat([fit[1], fit[1]])
    cal = torch.cat([cal[0], enc(noisy(cal_texts, seed + 1))]), torch.cat([cal[1], cal[1]])
    return fit, cal, negative_vectors(enc, vecs, owner, seed)


def check_output(path: Path) -> None:
    """`--output` may be new or a router checkpoint; anything else there (a LoRA, a base's weights, the
    catalog) is the user's file, never overwritten."""
    from mixdiff_cli.routing.checkpoint import FORMAT

    if not path.exists() and not path.is_symlink():
        return
    from mixdiff_cli.catalog.headers import read_header

    meta: dict[str, str] = {}
    if path.is_file():
        try:
            meta = read_header(path)[1]
        except (MixdiffError, OSError):
            meta = {}  # not even safetensors
    if meta.get("mixdiff.format") != FORMAT:
        raise RouterError(f"--output {path} exists and is not a router checkpoint", "choose a new path, or remove that file first")


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

    from mixdiff_cli.catalog.discovery import check_writable

    check_writable(catalog_path, output)  # before training: the packaged demo is read-only
    if output is not None:
        check_output(Path(output))
    config = config or TrainConfig()
    cat = load_catalog(catalog_path)
    if len(cat.experts) < 2:
        raise RouterError(f"the catalog {cat.path} has {len(cat.experts)} expert(s); a router needs at least 2", "add experts with 'mixdiff add-expert'")
    config = _resolved(config, cat)
    _check_config(config)
    k = max(1, min(config.top_k, len(cat.experts)))
    enc = encoder or get_encoder(cat, config.encoder)
    names = cat.names
    train, val = _examples(cat, prompts_file, config)

    texts = [t for t, _ in train + val]
    vecs = enc(texts)
    x_train, x_val = vecs[: len(train)], vecs[len(train) :]
    y_train = torch.tensor([e for _, e in train], dtype=torch.long)
    y_val = torch.tensor([e for _, e in val], dtype=torch.long)
    fit, cal, (g_train, g_val) = (x_train, y_train), (x_val, y_val) if len(val) else (x_train, y_train), (None, None)
    if config.abstain:
        fit, cal, (g_train, g_val) = _with_unseen_words(enc, train, val, fit, cal, vecs, config.seed)
    gate, loss = fit_gate(*fit, len(names), config, progress, generic=g_train)
    calibration = calibrate(gate, *cal, g_val)

    train_top1 = round(_accuracy(gate, x_train, y_train, k)[0], 4)
    confusion, confused = _confusion([], [], names)
    top1 = topk = None
    if len(val):
        top1, topk, pred = _accuracy(gate, x_val, y_val, k)
        top1, topk = round(top1, 4), round(topk, 4)
        confusion, confused = _confusion(y_val.tolist(), pred.tolist(), names)

    out_path = Path(output) if output else cat.root / ROUTER_FILE
    training = {"epochs": epochs_run(config, len(train)), "lr": config.lr, "seed": config.seed, "val_split": config.val_split,
                "balance": config.balance, "n_train": len(train), "n_val": len(val), "top1": top1, f"top{k}": topk, **calibration}
    _save(for_catalog(gate, cat, enc.id, training=training), cat, out_path)
    return TrainResult(
        checkpoint=out_path, names=names, n_train=len(train), n_val=len(val), top1=top1, topk=topk, k=k,
        train_top1=train_top1, confusion=confusion, loss=loss, config=config, confused=confused, epochs=epochs_run(config, len(train)),
        calibration=calibration,
    )
