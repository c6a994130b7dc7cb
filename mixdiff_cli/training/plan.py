"""Everything a fine-tune run decides before a model loads (`make_plan`): any bad input fails here, with nothing written."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mixdiff_cli.core.errors import DuplicateExpert, UsageError
from mixdiff_cli.models.pipeline import BaseInfo, BaseModelError, inspect_base
from mixdiff_cli.training.config import FineTuneConfig, FineTuneError, FineTuneJob, InvalidConfig, Registration
from mixdiff_cli.training.dataset import Dataset, scan_dataset
from mixdiff_cli.training.resume import CheckpointError, checkpoint_dirs, find_checkpoint, load_state

if TYPE_CHECKING:
    from mixdiff_cli.catalog.model import Catalog


def _split(ds: Dataset, fraction: float) -> tuple[list, list]:
    """Held-out images picked by a hash of their path: stable across seeds and when images are added."""
    n = len(ds.records)
    n_val = 0 if fraction == 0 or n < 2 else min(n - 1, max(1, round(n * fraction)))
    key = {r.path: hashlib.sha256(r.path.relative_to(ds.root).as_posix().encode()).hexdigest() for r in ds.records}
    val = set(sorted(ds.records, key=lambda r: key[r.path])[:n_val])
    return [r for r in ds.records if r not in val], [r for r in ds.records if r in val]


def _resolve_base(cat: Catalog | None, base: str | Path | None) -> Path:
    """The base's diffusers folder: `base` (a folder or a hub id, fetched) or the catalog's."""
    from mixdiff_cli.catalog import sources

    if base is not None:
        return sources.fetch(str(base)) if sources.is_hub(str(base)) else Path(base).expanduser()
    if cat is None or cat.base is None:
        where = f"the catalog {cat.path} has no base" if cat is not None else "no catalog and no --base"
        raise BaseModelError(where, "pass --base PATH, or set one with 'mixdiff init --base PATH'")
    return sources.resolve(cat, cat.base.source)


@dataclass
class Plan:
    """Everything decided before a model loads."""

    name: str
    cfg: FineTuneConfig
    cat: Catalog | None
    registration: Registration | None  # None: write the LoRA only
    info: BaseInfo
    resolution: int
    output: Path
    output_dir: Path
    ckpt_path: Path | None
    ckpt: tuple[dict, dict, dict] | None  # (LoRA tensors, optimizer state, state.json)
    seed: int
    ds: Dataset
    train: list
    val: list


def _check_same_base(cat: Catalog, base: str | Path, base_path: Path) -> None:
    """A LoRA registered in a catalog must be trained on the catalog's base."""
    from mixdiff_cli.catalog import sources

    if os.path.realpath(sources.resolve(cat, cat.base.source)) != os.path.realpath(base_path):
        raise UsageError(
            f"--base {base} is not the catalog's base ({cat.base.source}); the LoRA would not fit its experts",
            "drop --base, or pass --no-register",
        )


def _files(job: FineTuneJob, root: Path) -> tuple[Path, Path]:
    """(the LoRA file, the checkpoint folder), checked: writable, a new .safetensors file."""
    from mixdiff_cli.catalog.discovery import check_writable

    output = Path(job.output).expanduser() if job.output is not None else root / "experts" / f"{job.name}.safetensors"
    output_dir = Path(job.output_dir).expanduser() if job.output_dir is not None else root / "runs" / job.name
    check_writable(output, output_dir)
    if output.suffix != ".safetensors":
        raise UsageError(f"output {output} must end in .safetensors", "pass --output NAME.safetensors")
    if output.exists():
        raise FineTuneError(f"{output} already exists", "pass --output with another file, or remove it")
    return output, output_dir


def make_plan(job: FineTuneJob) -> Plan:
    """Check every input of `job` and decide the base, the files, the checkpoint to resume, the seed and the split."""
    from mixdiff_cli.catalog.discovery import check_writable, is_packaged
    from mixdiff_cli.catalog.model import check_name
    from mixdiff_cli.catalog.schema import load_catalog

    if job.stop_after is not None and job.stop_after < 1:
        raise InvalidConfig("stop-after must be at least 1", "pass the number of steps to run before stopping")
    cfg, name = job.config, job.name
    registration = Registration() if job.register is True else job.register or None
    register = registration is not None
    cfg.validate()
    check_name(name)
    cat = load_catalog(job.catalog_path) if job.catalog_path is not None else None
    if register and cat is None:
        raise UsageError("no catalog to register the expert in", "pass --catalog PATH, or --no-register with --base")
    if register:
        check_writable(cat.path)  # the packaged demo is read-only
    if register and name in cat.names:
        raise DuplicateExpert(f"an expert named {name!r} already exists in {cat.path}", "pass another --name, or remove the old one first")
    root = cat.root if cat is not None and not is_packaged(cat.path) else Path.cwd()
    base_path = _resolve_base(cat, job.base)
    info = inspect_base(base_path)
    if register and job.base is not None and cat.base is not None:
        _check_same_base(cat, job.base, base_path)
    resolution = cfg.resolution or info.native_resolution
    if resolution % info.size_multiple:
        raise InvalidConfig(f"resolution {resolution} does not fit this base", f"use a multiple of {info.size_multiple}")
    output, output_dir = _files(job, root)
    ckpt_path = find_checkpoint(output_dir, job.resume) if job.resume is not None else None
    if ckpt_path is None and checkpoint_dirs(output_dir):
        raise CheckpointError(f"{output_dir} holds checkpoints of an earlier run", "pass --resume latest to continue it, or another --output-dir")
    ckpt = load_state(ckpt_path) if ckpt_path is not None else None
    seed = cfg.seed if cfg.seed is not None else (ckpt[2]["seed"] if ckpt else int.from_bytes(os.urandom(4), "little"))
    ds = scan_dataset(job.data)
    train, val = _split(ds, cfg.validation_split)
    return Plan(name, cfg, cat, registration, info, resolution, output, output_dir, ckpt_path, ckpt, seed, ds, train, val)
