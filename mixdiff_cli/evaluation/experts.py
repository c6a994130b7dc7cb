"""`evaluate_experts`: the held-out denoising loss of the base and of every expert on every domain."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixdiff_cli.core.errors import UsageError
from mixdiff_cli.evaluation.charts import loss_figure
from mixdiff_cli.evaluation.heldout import HeldoutLoss
from mixdiff_cli.evaluation.inputs import check_range, parse_data_specs
from mixdiff_cli.evaluation.markdown import experts_markdown
from mixdiff_cli.evaluation.metrics import BASE_LABEL, gates, loss_matrix_metrics
from mixdiff_cli.evaluation.report import EvaluateError, Report, report_header

if TYPE_CHECKING:
    from mixdiff_cli.catalog.model import Catalog


@dataclass(frozen=True)
class ExpertsSettings:
    """How `evaluate_experts` measures: which experts (None: all), the UNet batch, (image, timestep)
    pairs per domain (None: fine-tune's validation count), images per domain, device, dtype and the
    --max-loss-ratio gate."""

    experts: Sequence[str] | None = None
    batch_size: int = 16
    evals: int | None = None
    max_images: int | None = None
    device: str | None = None
    dtype: str | None = "float32"
    max_loss_ratio: float | None = None

    def check(self, evals: int) -> None:
        """Raise `UsageError` on an out-of-range value (`evals`: the resolved pair count)."""
        check_range("--batch-size", self.batch_size, 1)
        check_range("--evals", evals, 1)
        if self.max_images is not None:
            check_range("--max-images", self.max_images, 1)
        if self.max_loss_ratio is not None and self.max_loss_ratio <= 0:
            raise UsageError(f"--max-loss-ratio {self.max_loss_ratio} must be positive", "pass e.g. 0.95: each expert at least 5% below the base on its domain")


@dataclass
class _Domain:
    name: str
    folder: Path
    records: list[Any]
    dataset_hash: str
    skipped: int


def evaluate_experts(catalog: Catalog | str | Path, data: Mapping[str, str | Path] | Sequence[str], settings: ExpertsSettings | None = None) -> Report:
    """The held-out denoising loss of the base and each expert on each domain's captioned folder.

    Every (image, timestep, noise) triple comes from fine-tune's fixed validation seed, so the matrix is
    the same run to run and comparable with fine-tune's reported held-out loss. Name each domain after
    the expert it belongs to (`{"stripes": "./heldout/stripes"}`) to check specialisation.
    """
    from mixdiff_cli.catalog.schema import load_catalog
    from mixdiff_cli.sampling.engine import Engine
    from mixdiff_cli.training.loss import VAL_EVALS, VAL_SEED

    s = settings or ExpertsSettings()
    cat = catalog if not isinstance(catalog, (str, Path)) else load_catalog(catalog)
    domains_in = dict(data) if isinstance(data, Mapping) else parse_data_specs(data)
    if not domains_in:
        raise UsageError("no domains to evaluate on", "pass --data NAME=DIR once per domain")
    evals = VAL_EVALS if s.evals is None else s.evals
    s.check(evals)
    names = _expert_names(cat, s, domains_in)
    domains = _scan_domains(domains_in, s.max_images)  # every folder is checked before any model loads
    engine = Engine(cat, device=s.device, dtype=s.dtype, max_loaded=1)
    heldout = {d.name: HeldoutLoss(engine, d.records, evals) for d in domains}
    losses: dict[str, dict[str, float]] = {}
    for model in [None, *names]:
        experts = [] if model is None else [model]
        losses[BASE_LABEL if model is None else model] = {d.name: heldout[d.name].loss(experts, s.batch_size) for d in domains}
    base = losses.pop(BASE_LABEL)
    metrics = loss_matrix_metrics(base, losses)
    settings_out = {"data": {d.name: str(d.folder) for d in domains}, "experts": names, "evals": evals, "batch_size": s.batch_size,
                    "max_images": s.max_images, "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
                    "resolution": heldout[domains[0].name].resolution}
    report = report_header("experts", cat, settings_out, {"heldout_noise": VAL_SEED, "latents": "vae posterior mean"})
    report["domains"] = {d.name: {"folder": str(d.folder), "images": len(d.records), "evals": len(heldout[d.name]),
                                  "dataset_hash": d.dataset_hash, "skipped": d.skipped} for d in domains}
    report["losses"] = {BASE_LABEL: base, "experts": losses}
    report["metrics"] = metrics
    report["gates"] = gates(metrics, max_loss_ratio=s.max_loss_ratio)
    return Report("experts", report, experts_markdown(report), {"losses.png": loss_figure(base, losses, metrics)})


def _expert_names(cat: Catalog, s: ExpertsSettings, domains: Mapping[str, Any]) -> list[str]:
    """The experts to evaluate, each checked against the catalog; with --max-loss-ratio, one must own a domain."""
    names = list(s.experts) if s.experts else cat.names
    if not names:
        raise EvaluateError(f"catalog {cat.path} has no experts", "add experts with 'mixdiff add-expert' first")
    for name in names:
        cat.expert(name)  # ExpertNotFound names the known ones
    if s.max_loss_ratio is not None and not any(n in domains for n in names):
        raise UsageError(
            "--max-loss-ratio needs a domain named after an expert",
            f"name the data folders after the experts they belong to, e.g. --data {names[0]}=DIR",
        )
    return names


def _scan_domains(domains: Mapping[str, str | Path], max_images: int | None) -> list[_Domain]:
    """Each domain's captioned folder scanned, cut to `max_images` records."""
    from mixdiff_cli.training.dataset import scan_dataset

    out = []
    for name, folder in domains.items():
        ds = scan_dataset(folder)
        records = ds.records[:max_images] if max_images else ds.records
        ds.records = records
        out.append(_Domain(name, Path(folder), records, ds.hash(), len(ds.skipped)))
    return out
