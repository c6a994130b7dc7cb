"""Fine-tuning settings: what to train and how (`FineTuneConfig`), one call's inputs (`FineTuneJob`), their checks."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from mixdiff_cli.core.errors import MixdiffError, UsageError
from mixdiff_cli.training.dataset import Crop
from mixdiff_cli.training.encoding import CacheSpec

TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "attn-ff": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
}
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
MixedPrecision = Literal["no", "fp16", "bf16"]
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


class FineTuneError(MixdiffError):
    pass


class InvalidConfig(UsageError):
    """A fine-tuning setting is out of range (exit 2)."""


@dataclass
class FineTuneConfig:
    """What to train and how. Defaults follow diffusers' train_text_to_image_lora.py where it has one."""

    # LoRA
    rank: int = 8
    alpha: float | None = None  # None: = rank (LoRA scale 1)
    target: str = "attn"  # a preset (attn, attn-ff) or comma-separated module names, e.g. "to_q,to_v"
    train_text_encoder: bool = False
    # schedule
    steps: int | None = None  # optimizer steps; None: from `epochs`, else 500
    epochs: float | None = None
    lr: float = 1e-4
    lr_scheduler: str = "constant"
    warmup: int = 0  # warm-up steps
    batch_size: int = 1  # per process
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2
    gradient_checkpointing: bool = False
    mixed_precision: MixedPrecision = "no"
    snr_gamma: float | None = None  # min-SNR weighting; 5.0 is the paper's value
    noise_offset: float = 0.0
    # fraction of training captions replaced by "" (kohya's caption_dropout_rate): the expert also learns its
    # domain unconditionally, which is the branch classifier-free guidance subtracts at sampling time
    caption_dropout: float = 0.0
    seed: int | None = None  # None: drawn at random and recorded
    # data
    resolution: int | None = None  # None: the base's native size
    crop: Crop = "center"
    random_flip: bool = False
    latents: Literal["mean", "sample"] = "mean"  # VAE posterior mean (deterministic) or one cached sample (center crops)
    trigger: list[str] = field(default_factory=list)
    validation_split: float = 0.1
    validation_prompts: list[str] = field(default_factory=list)
    validation_inference_steps: int = 20
    # checkpoints
    checkpoint_every: int | None = None  # None: 5 checkpoints per run
    keep: int = 2

    # Settings a resumed run may change; every other one must match its checkpoint.
    RUN_CONTROL = ("checkpoint_every", "keep", "validation_prompts", "validation_inference_steps")

    def validate(self) -> None:
        def bad(what: str, hint: str) -> InvalidConfig:
            return InvalidConfig(what, hint)

        if self.rank < 1:
            raise bad(f"rank {self.rank} is not a LoRA rank", "pass --rank 1 or more (4-32 is usual)")
        if self.alpha is not None and self.alpha <= 0:
            raise bad(f"alpha {self.alpha} must be positive", "pass --alpha equal to the rank for scale 1, or leave it out")
        self.target_modules()
        if self.steps is not None and self.epochs is not None:
            raise bad("both steps and epochs are set", "pass --steps or --epochs, not both")
        if self.steps is not None and self.steps < 1:
            raise bad(f"steps {self.steps} must be at least 1", "pass --steps 1 or more")
        if self.epochs is not None and self.epochs <= 0:
            raise bad(f"epochs {self.epochs} must be positive", "pass --epochs 1 or more")
        if not self.lr > 0:
            raise bad(f"learning rate {self.lr} must be positive", "pass e.g. --lr 1e-4")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise bad(f"unknown learning-rate scheduler {self.lr_scheduler!r}", f"use one of: {', '.join(LR_SCHEDULERS)}")
        for key in ("warmup",):
            if getattr(self, key) < 0:
                raise bad(f"{key} must not be negative", f"pass --{key} 0 or more")
        for key in ("batch_size", "grad_accum", "keep", "validation_inference_steps"):
            if getattr(self, key) < 1:
                raise bad(f"{key.replace('_', '-')} {getattr(self, key)} must be at least 1", f"pass --{key.replace('_', '-')} 1 or more")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise bad("checkpoint-every must be at least 1", "pass --checkpoint-every N (steps)")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise bad(f"unknown mixed precision {self.mixed_precision!r}", "use no, fp16 or bf16")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise bad(f"snr-gamma {self.snr_gamma} must be positive", "pass 5.0 (the paper's value) or leave it out")
        if self.noise_offset < 0:
            raise bad("noise-offset must not be negative", "pass e.g. 0.05, or 0 for none")
        if not 0 <= self.caption_dropout < 1:
            raise bad(f"caption-dropout {self.caption_dropout} must be in [0, 1)", "pass e.g. 0.1, or 0 for none")
        if not 0 <= self.validation_split < 1:
            raise bad(f"validation split {self.validation_split} must be in [0, 1)", "pass e.g. 0.1 for 10%")
        if self.crop not in ("center", "random"):
            raise bad(f"unknown crop {self.crop!r}", "use center or random")
        if self.latents not in ("mean", "sample"):
            raise bad(f"unknown latents mode {self.latents!r}", "use mean or sample")
        if self.resolution is not None and self.resolution < 8:
            raise bad(f"resolution {self.resolution} is too small", "leave --resolution out to use the base's native size")

    def target_modules(self) -> list[str]:
        if self.target in TARGET_PRESETS:
            return list(TARGET_PRESETS[self.target])
        names = [t.strip() for t in self.target.split(",") if t.strip()]
        if not names or any(" " in n for n in names):
            raise InvalidConfig(f"bad --target {self.target!r}", f"use a preset ({', '.join(TARGET_PRESETS)}) or module names like to_q,to_v")
        return names

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def cache_spec(self) -> CacheSpec:
        """How the training images and captions are prepared once (a frozen text encoder's embeddings cached)."""
        return CacheSpec(tuple(self.trigger), self.crop, self.latents, self.random_flip, cache_text=not self.train_text_encoder)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}



@dataclass
class Registration:
    """How a finished run enters the catalog (`FineTuneJob.register`)."""

    description: str | None = None  # None: "LoRA fine-tuned on N images of DIR (S steps)"


@dataclass
class FineTuneJob:
    """One `fine_tune` call: the images, the expert's name, the settings, and where the base and the files are."""

    catalog_path: str | Path | None
    data: str | Path  # captioned image folder
    name: str
    config: FineTuneConfig = field(default_factory=FineTuneConfig)
    # None: the catalog's base; else train against this diffusers folder (then register=False unless it is the same)
    base: str | Path | None = None
    output: str | Path | None = None  # the LoRA file; None: experts/NAME.safetensors beside the catalog
    output_dir: str | Path | None = None  # checkpoints and sample images; None: runs/NAME beside the catalog
    register: bool | Registration = True  # True, a Registration (with its catalog description) or False (the LoRA only)
    resume: str | Path | None = None  # "latest" or a checkpoint folder
    stop_after: int | None = None  # optimizer steps to run in this call before a checkpoint and an unfinished return
    device: str | None = None
