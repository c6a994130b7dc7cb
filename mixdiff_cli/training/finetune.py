"""Train a LoRA expert on a captioned image folder against the catalog's base, and register it.

The objective (`training/loss.py`) is the standard one of diffusers' `train_text_to_image_lora.py`:
noise the VAE latents of an image at a random timestep and regress the UNet's output onto the noise (or
the velocity, as the scheduler's `prediction_type` says), optionally with min-SNR-gamma weighting (Hang
et al. 2023, arXiv:2303.09556). Only PEFT LoRA weights train; latents and text embeddings are computed
once (`training/encoding.py`).

Every random draw is a pure function of (seed, what, index): the data order of each epoch, and the
noise/timesteps of each micro-batch. A checkpoint is therefore just tensors (safetensors) and numbers
(JSON) - no pickled RNG or optimizer objects - and a resumed run continues bit for bit.

Runs through accelerate: `accelerate launch --multi_gpu --num_processes N mixdiff fine-tune ...` (or
torchrun) trains data-parallel; each process takes its slice of every global batch.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mixdiff_cli import __version__
from mixdiff_cli.core.checkpoints import read_checkpoint, write_checkpoint
from mixdiff_cli.core.errors import DuplicateExpert, MixdiffError, UsageError
from mixdiff_cli.models.pipeline import BaseInfo, BaseModelError, inspect_base, load_pipeline
from mixdiff_cli.training.dataset import Crop, Dataset, scan_dataset, to_tensor
from mixdiff_cli.training.encoding import Cache, CacheSpec, CaptionEncoder, build_cache, derive, encode_images, generator, time_ids
from mixdiff_cli.training.loss import heldout_loss, make_heldout, per_sample_loss, snr_weights

if TYPE_CHECKING:
    import torch

TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "attn-ff": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
}
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
MixedPrecision = Literal["no", "fp16", "bf16"]
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
CHECKPOINT_FORMAT = "mixdiff-finetune-checkpoint/1"
LORA_FILE = "lora.safetensors"  # the LoRA parameters in a checkpoint folder
MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-512/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}
KOHYA_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


class FineTuneError(MixdiffError):
    pass


class InvalidConfig(UsageError):
    """A fine-tuning setting is out of range (exit 2)."""


class CheckpointError(MixdiffError):
    """--resume found nothing to resume, or a checkpoint of a different run."""


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
class Registration:
    """How a finished run enters the catalog (`fine_tune(register=...)`)."""

    description: str | None = None  # None: "LoRA fine-tuned on N images of DIR (S steps)"


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


# --- the base model -------------------------------------------------------------------------------


def base_hash(path: str | Path) -> str:
    """sha256 of the base UNet's weight file(s): what a LoRA was trained against."""
    folder = Path(path) / "unet"
    files = sorted(folder.glob("*.safetensors")) or sorted(p for p in folder.glob("*.bin"))
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


# --- data on the device ---------------------------------------------------------------------------


@dataclass
class _Batch:
    latents: "torch.Tensor"  # (B, C, h, w)
    noise: "torch.Tensor"
    timesteps: "torch.Tensor"  # (B,) int64
    hidden: "torch.Tensor | None"  # (B, T, D) when cached
    pooled: "torch.Tensor | None"
    time_ids: "torch.Tensor | None"
    ids: list["torch.Tensor"]  # token ids when the text encoder trains
    drop: "torch.Tensor | None" = None  # (B,) bool: captions replaced by "" (caption dropout)


class _Stream:
    """The infinite training stream: sample position p -> image perm_{p // N}[p % N]; micro-batch k holds
    positions [k*G, (k+1)*G) for a global batch G, and each process takes its slice of them."""

    def __init__(self, cache: Cache, n: int, cfg: FineTuneConfig, seed: int, num_train_timesteps: int,
                 global_batch: int, rank: int, device, vae, resolution: int):
        self.cache, self.n, self.cfg, self.seed = cache, n, cfg, seed
        self.T, self.G, self.rank, self.device = num_train_timesteps, global_batch, rank, device
        self.vae, self.resolution = vae, resolution
        self._perms: dict[int, "torch.Tensor"] = {}

    def perm(self, epoch: int) -> "torch.Tensor":
        import torch

        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(self.n, generator=generator(self.seed, "epoch", epoch))
        return self._perms[epoch]

    def indices(self, k: int) -> list[int]:
        start = k * self.G
        return [int(self.perm(p // self.n)[p % self.n]) for p in range(start, start + self.G)]

    def batch(self, k: int, latent_shape: tuple[int, ...]) -> _Batch:
        import torch

        cfg, G = self.cfg, self.G
        gen = generator(self.seed, "batch", k)
        noise = torch.randn((G, *latent_shape), generator=gen)  # (G, C, h, w)
        timesteps = torch.randint(0, self.T, (G,), generator=gen)
        if cfg.noise_offset:
            # https://www.crosslabs.org//blog/diffusion-with-offset-noise
            noise += cfg.noise_offset * torch.randn((G, latent_shape[0], 1, 1), generator=gen)
        flip = torch.rand(G, generator=gen) < 0.5 if cfg.random_flip else torch.zeros(G, dtype=torch.bool)
        crop_u = torch.rand((G, 2), generator=gen) if cfg.crop == "random" else None
        drop = torch.rand(G, generator=gen) < cfg.caption_dropout if cfg.caption_dropout else None  # drawn last: p = 0 changes nothing
        local = slice(self.rank * cfg.batch_size, (self.rank + 1) * cfg.batch_size)
        idx_list = self.indices(k)[local]
        idx = torch.tensor(idx_list, device=self.device)
        flip_l = flip[local].to(self.device)
        c = self.cache
        if c.latents is not None:
            latents = c.latents.index_select(0, idx)
            if c.latents_flipped is not None:
                latents = torch.where(flip_l[:, None, None, None], c.latents_flipped.index_select(0, idx), latents)
        else:
            latents, tids = self._random_crops(idx_list, flip[local].tolist(), crop_u[local])
        time_ids = None
        if c.time_ids is not None:
            if c.latents is None:
                time_ids = tids
            else:
                time_ids = torch.where(flip_l[:, None], c.time_ids_flipped.index_select(0, idx), c.time_ids.index_select(0, idx))
        return _Batch(
            latents=latents,
            noise=noise[local].to(self.device),
            timesteps=timesteps[local].to(self.device),
            hidden=None if c.hidden is None else c.hidden.index_select(0, idx),
            pooled=None if c.pooled is None else c.pooled.index_select(0, idx),
            time_ids=time_ids,
            ids=[t.index_select(0, idx.cpu()) for t in c.ids] if c.hidden is None else [],
            drop=None if drop is None else drop[local].to(self.device),
        )

    def _random_crops(self, idx: list[int], flips: list[bool], u: "torch.Tensor"):
        import torch
        from PIL import Image

        from mixdiff_cli.training.dataset import crop_box

        crops, tids = [], []
        for j, i in enumerate(idx):
            im = self.cache.images[i]
            left, top, right, bottom = crop_box(im.size, self.resolution, "random", (float(u[j, 0]), float(u[j, 1])))
            crop = im.crop((left, top, right, bottom))
            if flips[j]:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                left = im.width - right
            crops.append(crop)
            tids.append(time_ids(self.cache.sizes[i], top, left, self.resolution))
        latents = encode_images(self.vae, to_tensor(crops), "mean")
        return latents.to(self.device), torch.tensor(tids, dtype=torch.float32, device=self.device)


# --- checkpoints ----------------------------------------------------------------------------------


def _checkpoint_dirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and (p / "state.json").is_file() and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def find_checkpoint(output_dir: str | Path, resume: str | Path) -> Path:
    """`resume` = "latest" (the newest checkpoint in output_dir) or a checkpoint folder."""
    output_dir = Path(output_dir)
    if str(resume) == "latest":
        found = _checkpoint_dirs(output_dir)
        if not found:
            raise CheckpointError(f"no checkpoint to resume in {output_dir}", "start without --resume, or pass --output-dir with the earlier run's folder")
        return found[-1]
    path = Path(resume).expanduser()
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{path} is not a fine-tune checkpoint (no state.json)", f"pass --resume latest or a checkpoint-NNNNNN folder from {output_dir}")
    return path


def _write_checkpoint(folder: Path, params: dict[str, "torch.Tensor"], optimizer_state: dict, meta: dict, keep: int) -> Path:
    """Write checkpoint-NNNNNN atomically, keep the last `keep`."""
    for stale in folder.glob(".checkpoint-*.partial*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    target = write_checkpoint(folder / f"checkpoint-{meta['step']:06d}", params, optimizer_state, meta, LORA_FILE)
    for old in _checkpoint_dirs(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _read_checkpoint(path: Path) -> tuple[dict[str, "torch.Tensor"], dict, dict]:
    try:
        params, opt, meta = read_checkpoint(path, LORA_FILE)
        if opt is None:
            raise KeyError("optimizer")
    except (OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt ({exc})", "resume from an earlier checkpoint-NNNNNN folder") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a mixdiff fine-tune checkpoint", "pass a checkpoint-NNNNNN folder written by mixdiff fine-tune")
    return params, opt, meta


def _check_same_run(meta: dict, fingerprint: dict, path: Path) -> None:
    old = meta.get("fingerprint", {})
    diff = [k for k in sorted(set(old) | set(fingerprint)) if old.get(k) != fingerprint.get(k)]
    if diff:
        shown = "; ".join(f"{k}: {old.get(k)!r} then, {fingerprint.get(k)!r} now" for k in diff[:4])
        raise CheckpointError(
            f"checkpoint {path} comes from a different run ({shown})",
            "resume with the same data, base and settings, or start a new run with another --output-dir",
        )


# --- the LoRA file --------------------------------------------------------------------------------


def lora_metadata(*, name: str, arch: str, base_sha256: str, cfg: FineTuneConfig, steps: int, dataset_hash: str,
                  resolution: int, base_loss: float | None, lora_loss: float | None) -> dict[str, str]:
    """safetensors header entries: our own `mixdiff.*`, the SAI model spec (`modelspec.*`) and the
    kohya `ss_*` keys that web UIs read."""
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCH[arch],
        "modelspec.implementation": "diffusers",
        "modelspec.title": name,
        "modelspec.trigger_phrase": ", ".join(cfg.trigger),
        "modelspec.date": today,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "mixdiff.version": __version__,
        "mixdiff.base_sha256": base_sha256,
        "mixdiff.arch": arch,
        "mixdiff.rank": str(cfg.rank),
        "mixdiff.alpha": str(cfg.lora_alpha),
        "mixdiff.target": ",".join(cfg.target_modules()),
        "mixdiff.train_text_encoder": str(cfg.train_text_encoder).lower(),
        "mixdiff.steps": str(steps),
        "mixdiff.learning_rate": str(cfg.lr),
        "mixdiff.dataset_sha256": dataset_hash,
        "mixdiff.trigger": json.dumps(cfg.trigger),
        "mixdiff.resolution": str(resolution),
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(cfg.lora_alpha),
        "ss_steps": str(steps),
        "ss_learning_rate": str(cfg.lr),
        "ss_base_model_version": KOHYA_BASE_VERSION[arch],
        "ss_output_name": name,
    }
    if base_loss is not None and lora_loss is not None:
        meta["mixdiff.val_loss_base"] = f"{base_loss:.6f}"
        meta["mixdiff.val_loss_lora"] = f"{lora_loss:.6f}"
    return meta


def _export_lora(path: Path, family: str, unet, unet_config, encoders, te_config, metadata: dict[str, str]) -> Path:
    """Write a diffusers-format LoRA (save_lora_weights, PEFT key names `unet.*.lora_A.weight` as
    diffusers' own `save_lora_adapter` writes them) with `metadata` in its header, atomically."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mixdiff_cli.core.fsutil import atomic_path

    kwargs: dict[str, Any] = {
        "unet_lora_layers": get_peft_model_state_dict(unet),
        "unet_lora_adapter_metadata": unet_config.to_dict(),  # carries lora_alpha, so alpha != rank loads right
    }
    for key, enc in zip(("text_encoder", "text_encoder_2"), encoders):
        kwargs[f"{key}_lora_layers"] = get_peft_model_state_dict(enc)
        kwargs[f"{key}_lora_adapter_metadata"] = te_config.to_dict()
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    with atomic_path(path) as tmp:
        cls.save_lora_weights(tmp.parent, weight_name=tmp.name, **kwargs)
        with safe_open(tmp, "pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            header = dict(fh.metadata() or {})
        save_file(tensors, tmp, metadata={**header, **metadata})
    return path


# --- the run --------------------------------------------------------------------------------------


def _lora_enabled(models, flag: bool) -> None:
    """Switch every PEFT LoRA layer of `models` on or off (what diffusers' enable/disable_adapters do)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in models:
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(flag)


def _split(ds: Dataset, fraction: float) -> tuple[list, list]:
    """Held-out images picked by a hash of their path: stable across seeds and when images are added."""
    n = len(ds.records)
    n_val = 0 if fraction == 0 or n < 2 else min(n - 1, max(1, round(n * fraction)))
    key = {r.path: hashlib.sha256(r.path.relative_to(ds.root).as_posix().encode()).hexdigest() for r in ds.records}
    val = set(sorted(ds.records, key=lambda r: key[r.path])[:n_val])
    return [r for r in ds.records if r not in val], [r for r in ds.records if r in val]


def _make_accelerator(cfg: FineTuneConfig, device: str | None):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from mixdiff_cli.core.runtime import pick_device

    cpu = pick_device(device).type == "cpu"
    if cfg.mixed_precision == "fp16" and cpu:
        raise InvalidConfig("fp16 mixed precision needs a CUDA GPU", "use --mixed-precision bf16 or no on CPU")
    kwargs = {"mixed_precision": cfg.mixed_precision, "gradient_accumulation_steps": cfg.grad_accum, "cpu": cpu}
    try:
        return Accelerator(**kwargs)
    except ValueError as exc:
        # accelerate keeps one AcceleratorState per process; a second fine_tune() in the same Python
        # process with another mixed precision must reset it (single-process only).
        if "already been initialized" not in str(exc) or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(**kwargs)


def _resolve_base(cat, base: str | Path | None) -> Path:
    from mixdiff_cli.catalog import sources

    if base is not None:
        return sources.fetch(str(base)) if sources.is_hub(str(base)) else Path(base).expanduser()
    if cat is None or cat.base is None:
        where = f"the catalog {cat.path} has no base" if cat is not None else "no catalog and no --base"
        raise BaseModelError(where, "pass --base PATH, or set one with 'mixdiff init --base PATH'")
    return sources.resolve(cat, cat.base.source)


@dataclass
class _Plan:
    """Everything decided before a model loads: any bad input fails here, with nothing written."""

    name: str
    cfg: FineTuneConfig
    cat: Any  # Catalog | None
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


def _plan(catalog_path, data, name: str, cfg: FineTuneConfig, *, base, output, output_dir, register: bool, resume) -> _Plan:
    from mixdiff_cli.catalog.schema import check_name, check_writable, is_packaged, load_catalog

    cfg.validate()
    check_name(name)
    cat = load_catalog(catalog_path) if catalog_path is not None else None
    if register and cat is None:
        raise UsageError("no catalog to register the expert in", "pass --catalog PATH, or --no-register with --base")
    if register:
        check_writable(cat.path)  # the packaged demo is read-only
    if register and name in cat.names:
        raise DuplicateExpert(f"an expert named {name!r} already exists in {cat.path}", "pass another --name, or remove the old one first")
    root = cat.root if cat is not None and not is_packaged(cat.path) else Path.cwd()
    base_path = _resolve_base(cat, base)
    info = inspect_base(base_path)
    if register and base is not None and cat.base is not None:
        from mixdiff_cli.catalog import sources

        if os.path.realpath(sources.resolve(cat, cat.base.source)) != os.path.realpath(base_path):
            raise UsageError(
                f"--base {base} is not the catalog's base ({cat.base.source}); the LoRA would not fit its experts",
                "drop --base, or pass --no-register",
            )
    resolution = cfg.resolution or info.native_resolution
    if resolution % (info.vae_scale * info.unet_multiple):
        raise InvalidConfig(f"resolution {resolution} does not fit this base", f"use a multiple of {info.vae_scale * info.unet_multiple}")
    output = Path(output).expanduser() if output is not None else root / "experts" / f"{name}.safetensors"
    output_dir = Path(output_dir).expanduser() if output_dir is not None else root / "runs" / name
    check_writable(output, output_dir)
    if output.suffix != ".safetensors":
        raise UsageError(f"output {output} must end in .safetensors", "pass --output NAME.safetensors")
    if output.exists():
        raise FineTuneError(f"{output} already exists", "pass --output with another file, or remove it")
    ckpt_path = find_checkpoint(output_dir, resume) if resume is not None else None
    if ckpt_path is None and _checkpoint_dirs(output_dir):
        raise CheckpointError(f"{output_dir} holds checkpoints of an earlier run", "pass --resume latest to continue it, or another --output-dir")
    ckpt = _read_checkpoint(ckpt_path) if ckpt_path is not None else None
    seed = cfg.seed if cfg.seed is not None else (ckpt[2]["seed"] if ckpt else int.from_bytes(os.urandom(4), "little"))
    ds = scan_dataset(data)
    train, val = _split(ds, cfg.validation_split)
    return _Plan(name, cfg, cat, info, resolution, output, output_dir, ckpt_path, ckpt, seed, ds, train, val)


class _Trainer:
    """The base with its LoRA, the optimizer, the cached data and the held-out batch, on one process."""

    def __init__(self, plan: _Plan, accelerator, emit: Callable[[Event], None]):
        import torch
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        self.plan, self.cfg, self.acc, self.emit = plan, plan.cfg, accelerator, emit
        cfg, info, seed, dev = plan.cfg, plan.info, plan.seed, accelerator.device
        self.is_main = accelerator.is_main_process
        global_batch = cfg.batch_size * accelerator.num_processes
        if cfg.steps is not None:
            self.total = cfg.steps
        elif cfg.epochs is not None:
            self.total = max(1, math.ceil(cfg.epochs * len(plan.train) / (global_batch * cfg.grad_accum)))
        else:
            self.total = 500
        self.every = cfg.checkpoint_every or max(1, math.ceil(self.total / 5))
        self.dataset_hash = plan.ds.hash()
        self.base_sha = base_hash(info.path)
        self.fingerprint = {
            **{k: v for k, v in cfg.to_dict().items() if k not in (*FineTuneConfig.RUN_CONTROL, "seed")},
            "seed": seed, "total_steps": self.total, "resolution": plan.resolution, "global_batch": global_batch,
            "dataset_sha256": self.dataset_hash, "base_sha256": self.base_sha, "name": plan.name,
        }
        if plan.ckpt is not None:
            _check_same_run(plan.ckpt[2], self.fingerprint, plan.ckpt_path)

        # the model: frozen weights in the compute dtype, LoRA weights in float32 (as diffusers' scripts)
        weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
        self.pipe = pipe = load_pipeline(info.path, safety_checker=False)
        self.unet, self.text = pipe.unet, CaptionEncoder(pipe, info.family)
        for module in (self.unet, pipe.vae, *self.text.encoders):
            module.requires_grad_(False)
        cast = {} if weight_dtype == torch.float32 else {"dtype": weight_dtype}
        for module in (self.unet, *self.text.encoders):
            module.to(dev, **cast)
        pipe.vae.to(dev)  # float32: it only encodes, once
        self.unet_lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian", target_modules=cfg.target_modules())
        self.te_lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian", target_modules=list(TEXT_TARGETS))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive(seed, "lora-init"))
            try:
                self.unet.add_adapter(self.unet_lora)
            except ValueError:
                raise InvalidConfig(
                    f"--target {cfg.target} matches no layer of the base UNet",
                    f"use {' or '.join(TARGET_PRESETS)}, or names of its linear layers (e.g. to_q,to_v)",
                ) from None
            if cfg.train_text_encoder:
                from peft import inject_adapter_in_model

                for enc in self.text.encoders:  # transformers' add_adapter wants peft>=0.22; PEFT's injection works on any
                    inject_adapter_in_model(self.te_lora, enc)
        self.trained = [self.unet, *(self.text.encoders if cfg.train_text_encoder else [])]
        cast_training_params(self.trained, dtype=torch.float32)
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            for enc in self.trained[1:]:
                enc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        prefixes = ["unet", "text_encoder", "text_encoder_2"]
        self.named = [(f"{pre}.{n}", p) for pre, mod in zip(prefixes, self.trained) for n, p in mod.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup, num_training_steps=self.total)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        T = self.noise_scheduler.config.num_train_timesteps
        if self.noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise FineTuneError(f"the base's scheduler predicts {self.noise_scheduler.config.prediction_type!r}", "use a base that predicts epsilon, v or sample")

        # the data, once
        cache = build_cache(pipe, self.text, plan.train, cfg.cache_spec(), plan.resolution, seed, dev)
        side = plan.resolution // info.vae_scale
        self.latent_shape = (pipe.vae.config.latent_channels, side, side)
        self.stream = _Stream(cache, len(plan.train), cfg, seed, T, global_batch, accelerator.process_index, dev, pipe.vae, plan.resolution)
        self.empty_ids = self.text.tokenize([""])  # what a dropped caption becomes
        self.empty = None
        if cfg.caption_dropout and cache.hidden is not None:  # cached embeddings: the frozen encoder's "" once
            with torch.no_grad():
                self.empty = self.text.encode(self.empty_ids)
        self.valset = None
        if plan.val:
            self.valset = make_heldout(pipe, self.text, plan.val, plan.resolution, dev, T, trigger=cfg.trigger)

        # the learning-rate scheduler is stepped by hand, once per optimizer step: not prepared
        prepared = accelerator.prepare(*self.trained, optimizer)
        self.wrapped, self.optimizer = list(prepared[:-1]), prepared[-1]
        self.history: list[dict[str, float]] = []
        self.train_tail: list[float] = []
        self.base_loss: float | None = None

    def restore(self) -> int:
        """Load the checkpoint's LoRA, optimizer and scheduler state; return its step."""
        import torch

        weights, opt_state, meta = self.plan.ckpt
        names = [n for n, _ in self.named]
        if meta.get("params") != names or any(n not in weights for n in names):
            raise CheckpointError(f"checkpoint {self.plan.ckpt_path} does not hold this run's LoRA parameters", "start a new run with another --output-dir")
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(weights[n].to(p.device, p.dtype))
        self.optimizer.load_state_dict(opt_state)
        self.lr_scheduler.load_state_dict(meta["lr_scheduler"])
        self.history, self.train_tail = meta["history"], meta.get("train_tail", [])
        self.emit(Note(f"resumed from {self.plan.ckpt_path} at step {meta['step']}/{self.total}"))
        return meta["step"]

    def validate(self, lora: bool = True) -> float | None:
        """Held-out denoising loss with the LoRA, or of the bare base (lora=False)."""
        if self.valset is None:
            return None
        modes = [m.training for m in self.trained]
        for m in self.trained:
            m.eval()
        _lora_enabled(self.trained, lora)
        try:
            with self.acc.autocast():
                return heldout_loss(self.unet, self.noise_scheduler, self.text, self.valset)
        finally:
            _lora_enabled(self.trained, True)
            for m, mode in zip(self.trained, modes):
                m.train(mode)

    def train_step(self, step: int) -> float:
        """One optimizer step (grad_accum micro-batches); the mean loss of this process."""
        import torch

        cfg, acc, unet_w = self.cfg, self.acc, self.wrapped[0]
        encoders_w = self.wrapped[1:] if cfg.train_text_encoder else None
        total = torch.zeros((), device=acc.device)
        for micro in range(cfg.grad_accum):
            b = self.stream.batch(step * cfg.grad_accum + micro, self.latent_shape)
            with acc.accumulate(*self.wrapped):
                if b.drop is not None and b.hidden is None:  # the encoder trains: it sees "" for dropped captions
                    b.ids = [torch.where(b.drop[:, None].cpu(), e, t) for e, t in zip(self.empty_ids, b.ids)]
                hidden, pooled = (b.hidden, b.pooled) if b.hidden is not None else self.text.encode(b.ids, encoders_w)
                if b.drop is not None and self.empty is not None:
                    keep = ~b.drop
                    hidden = torch.where(keep[:, None, None], hidden, self.empty[0].to(hidden))
                    pooled = None if pooled is None else torch.where(keep[:, None], pooled, self.empty[1].to(pooled))
                losses = per_sample_loss(unet_w, self.noise_scheduler, b.latents, b.noise, b.timesteps, hidden, pooled, b.time_ids)
                if cfg.snr_gamma is not None:
                    losses = losses * snr_weights(self.noise_scheduler, b.timesteps, cfg.snr_gamma)
                loss = losses.mean()
                acc.backward(loss)
                if acc.sync_gradients and cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            total += loss.detach()
        self.lr_scheduler.step()
        value = float(total) / cfg.grad_accum
        self.train_tail = (self.train_tail + [value])[-20:]
        return value

    def samples(self, step: int) -> list[Path]:
        import torch

        from mixdiff_cli.core.fsutil import atomic_path

        cfg, paths = self.cfg, []
        with self.acc.autocast(), torch.no_grad():
            for i, prompt in enumerate(cfg.validation_prompts):
                gen = torch.Generator().manual_seed(derive(self.plan.seed, "sample", i))
                image = self.pipe(prompt, num_inference_steps=cfg.validation_inference_steps, height=self.plan.resolution,
                                  width=self.plan.resolution, generator=gen).images[0]
                target = self.plan.output_dir / "samples" / f"step-{step:06d}-{i}.png"
                with atomic_path(target) as tmp:
                    image.save(tmp, format="PNG")
                paths.append(target)
        return paths

    def checkpoint(self, step: int) -> None:
        val = self.validate()
        if val is not None:
            self.history.append({"step": step, "val_loss": val})
        if self.is_main:
            meta = {
                "format": CHECKPOINT_FORMAT, "step": step, "total_steps": self.total, "seed": self.plan.seed,
                "fingerprint": self.fingerprint, "params": [n for n, _ in self.named], "lr_scheduler": self.lr_scheduler.state_dict(),
                "history": self.history, "base_loss": self.base_loss, "train_tail": self.train_tail, "config": self.cfg.to_dict(),
            }
            path = _write_checkpoint(self.plan.output_dir, dict(self.named), self.optimizer.state_dict(), meta, self.cfg.keep)
            shots = self.samples(step) if self.cfg.validation_prompts else []
            self.emit(CheckpointEvent(step, self.total, val, self.base_loss, path, shots))
        self.acc.wait_for_everyone()

    def export(self, lora_loss: float | None) -> Path:
        plan = self.plan
        metadata = lora_metadata(name=plan.name, arch=plan.info.arch, base_sha256=self.base_sha, cfg=self.cfg, steps=self.total,
                                 dataset_hash=self.dataset_hash, resolution=plan.resolution, base_loss=self.base_loss, lora_loss=lora_loss)
        unet = self.acc.unwrap_model(self.wrapped[0])
        encoders = [self.acc.unwrap_model(e) for e in self.wrapped[1:]]
        return _export_lora(plan.output, plan.info.family, unet, self.unet_lora, encoders, self.te_lora, metadata)


def fine_tune(
    catalog_path: str | Path | None,
    data: str | Path,
    name: str,
    config: FineTuneConfig | None = None,
    *,
    base: str | Path | None = None,
    output: str | Path | None = None,
    output_dir: str | Path | None = None,
    register: bool | Registration = True,
    resume: str | Path | None = None,
    stop_after: int | None = None,
    device: str | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> FineTuneResult:
    """Train a LoRA on the captioned images in `data` and register it in the catalog as `name`.

    register: True, a Registration (with its catalog description) or False (write the LoRA only).
    base: train against this diffusers folder instead of the catalog's base (then register=False
    unless it is the same). output: the LoRA file (default experts/NAME.safetensors beside the
    catalog). output_dir: checkpoints and sample images (default runs/NAME beside the catalog).
    resume: "latest" or a checkpoint folder. stop_after: optimizer steps to run in this call before
    saving a checkpoint and returning unfinished (for time-sliced training). on_event receives
    StepEvent / CheckpointEvent / Note on the main process.
    """
    cfg = config or FineTuneConfig()
    registration = Registration() if register is True else register or None
    if stop_after is not None and stop_after < 1:
        raise InvalidConfig("stop-after must be at least 1", "pass the number of steps to run before stopping")
    main = int(os.environ.get("RANK", "0")) == 0  # torchrun and accelerate launch set RANK

    def emit(event: Event) -> None:
        if on_event is not None and main:
            on_event(event)

    plan = _plan(catalog_path, data, name, cfg, base=base, output=output, output_dir=output_dir, register=registration is not None, resume=resume)
    for path, why in plan.ds.skipped:
        emit(Note(f"skipped {path.relative_to(plan.ds.root)}: cannot decode ({why})", "warn"))
    accelerator = _make_accelerator(cfg, device)
    if accelerator.num_processes > 1:  # a seed drawn at random must be the main process's everywhere
        import torch
        from accelerate.utils import broadcast

        plan.seed = int(broadcast(torch.tensor([plan.seed], dtype=torch.int64, device=accelerator.device), from_process=0)[0])
    tr = _Trainer(plan, accelerator, emit)
    start = tr.restore() if plan.ckpt is not None else 0
    tr.base_loss = tr.validate(lora=False)
    end = tr.total if stop_after is None else min(tr.total, start + stop_after)

    for m in tr.trained:
        m.train()
    t0 = time.perf_counter()
    for step in range(start, end):
        loss = tr.train_step(step)
        done = step + 1
        elapsed = time.perf_counter() - t0
        emit(StepEvent(done, tr.total, loss, tr.lr_scheduler.get_last_lr()[0], (done - start) / elapsed if elapsed > 0 else 0.0))
        if done % tr.every == 0 or done == end:
            tr.checkpoint(done)
    seconds = time.perf_counter() - t0

    finished = end == tr.total
    lora_loss = tr.history[-1]["val_loss"] if tr.history and tr.history[-1]["step"] == end else tr.validate()
    result = FineTuneResult(
        name=name, lora_path=None, registered=False, finished=finished, step=end, total_steps=tr.total, seed=plan.seed,
        base_loss=tr.base_loss, lora_loss=lora_loss, train_loss=sum(tr.train_tail) / len(tr.train_tail) if tr.train_tail else None,
        history=tr.history, checkpoint_dir=plan.output_dir, dataset_hash=tr.dataset_hash, n_train=len(plan.train), n_val=len(plan.val),
        skipped=[str(p.relative_to(plan.ds.root)) for p, _ in plan.ds.skipped], train_seconds=seconds,
        steps_per_second=(end - start) / seconds if seconds > 0 else 0.0, main_process=tr.is_main,
    )
    if finished and tr.is_main:
        result.lora_path = tr.export(lora_loss)
        if registration is not None:
            from mixdiff_cli.experts.manage import add_expert

            ds = plan.ds
            add_expert(
                plan.cat.path, str(result.lora_path), name=name, trigger=list(cfg.trigger),
                prompts=list(dict.fromkeys(r.caption for r in ds.records))[:32],  # what the router learns from
                description=registration.description if registration.description is not None else f"LoRA fine-tuned on {len(ds)} images of {ds.root.name} ({tr.total} steps)",
            )
            result.registered = True
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        accelerator.end_training()
    return result
