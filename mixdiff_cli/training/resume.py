"""Fine-tune checkpoints for an exact resume: safetensors and JSON only (no pickles), found, written, read and checked."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixdiff_cli.core.checkpoints import read_checkpoint, write_checkpoint
from mixdiff_cli.core.errors import MixdiffError
from mixdiff_cli.training.config import FineTuneConfig

if TYPE_CHECKING:
    import torch

CHECKPOINT_FORMAT = "mixdiff-finetune-checkpoint/1"
LORA_FILE = "lora.safetensors"  # the LoRA parameters in a checkpoint folder


class CheckpointError(MixdiffError):
    """--resume found nothing to resume, or a checkpoint of a different run."""


def checkpoint_dirs(folder: Path) -> list[Path]:
    """The complete checkpoint-NNNNNN folders in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and (p / "state.json").is_file() and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def find_checkpoint(output_dir: str | Path, resume: str | Path) -> Path:
    """`resume` = "latest" (the newest checkpoint in output_dir) or a checkpoint folder."""
    output_dir = Path(output_dir)
    if str(resume) == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            raise CheckpointError(f"no checkpoint to resume in {output_dir}", "start without --resume, or pass --output-dir with the earlier run's folder")
        return found[-1]
    path = Path(resume).expanduser()
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{path} is not a fine-tune checkpoint (no state.json)", f"pass --resume latest or a checkpoint-NNNNNN folder from {output_dir}")
    return path


def save_state(folder: Path, params: dict[str, "torch.Tensor"], optimizer_state: dict, meta: dict, keep: int) -> Path:
    """Write checkpoint-NNNNNN atomically, keep the last `keep`."""
    for stale in folder.glob(".checkpoint-*.partial*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    target = write_checkpoint(folder / f"checkpoint-{meta['step']:06d}", params, optimizer_state, meta, LORA_FILE)
    for old in checkpoint_dirs(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_state(path: Path) -> tuple[dict[str, "torch.Tensor"], dict, dict]:
    """(LoRA tensors, optimizer state, state.json) of a checkpoint folder."""
    try:
        params, opt, meta = read_checkpoint(path, LORA_FILE)
        if opt is None:
            raise KeyError("optimizer")
    except (OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt ({exc})", "resume from an earlier checkpoint-NNNNNN folder") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a mixdiff fine-tune checkpoint", "pass a checkpoint-NNNNNN folder written by mixdiff fine-tune")
    return params, opt, meta


def run_fingerprint(cfg: FineTuneConfig, seed: int, **run: Any) -> dict[str, Any]:
    """What a resumed run must share with its checkpoint: every setting but RUN_CONTROL, the seed and `run`."""
    return {**{k: v for k, v in cfg.to_dict().items() if k not in (*FineTuneConfig.RUN_CONTROL, "seed")}, "seed": seed, **run}


def check_same_run(meta: dict, fingerprint: dict, path: Path) -> None:
    """Refuse a checkpoint whose fingerprint differs from this run's."""
    old = meta.get("fingerprint", {})
    diff = [k for k in sorted(set(old) | set(fingerprint)) if old.get(k) != fingerprint.get(k)]
    if diff:
        shown = "; ".join(f"{k}: {old.get(k)!r} then, {fingerprint.get(k)!r} now" for k in diff[:4])
        raise CheckpointError(
            f"checkpoint {path} comes from a different run ({shown})",
            "resume with the same data, base and settings, or start a new run with another --output-dir",
        )
