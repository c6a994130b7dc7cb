"""What a fine-tune run reports: progress events on the way (`Event`) and its result (`FineTuneResult`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass
class StepEvent:
    step: int
    total: int
    loss: float  # mean training loss of this optimizer step (this process)
    lr: float
    steps_per_second: float


@dataclass
class CheckpointEvent:
    step: int
    total: int
    val_loss: float | None  # held-out denoising loss with the LoRA
    base_loss: float | None  # the same batch through the bare base
    path: Path
    samples: list[Path] = field(default_factory=list)


@dataclass
class Note:
    text: str
    level: Literal["info", "warn"] = "info"


Event = StepEvent | CheckpointEvent | Note


@dataclass
class FineTuneResult:
    name: str
    lora_path: Path | None  # None when the run stopped early (stop_after)
    registered: bool
    finished: bool
    step: int
    total_steps: int
    seed: int
    base_loss: float | None  # held-out denoising loss of the bare base
    lora_loss: float | None  # the same, with the trained LoRA
    train_loss: float | None  # mean training loss over the last optimizer steps
    history: list[dict[str, float]]  # [{"step", "val_loss"}] at each checkpoint
    checkpoint_dir: Path
    dataset_hash: str
    n_train: int
    n_val: int
    skipped: list[str]  # images that could not be decoded
    train_seconds: float
    steps_per_second: float
    main_process: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
