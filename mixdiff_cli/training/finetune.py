"""Train a LoRA expert on a captioned image folder against the catalog's base, and register it.

The objective is the standard one of diffusers' `train_text_to_image_lora.py`: noise the VAE latents of
an image at a random timestep and regress the UNet's output onto the noise (or the velocity, as the
scheduler's `prediction_type` says), optionally with min-SNR-gamma weighting (Hang et al. 2023,
arXiv:2303.09556). Only PEFT LoRA weights train; latents and text embeddings are computed once.

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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mixdiff_cli import __version__
from mixdiff_cli.training.dataset import Crop, Dataset, load_image, scan_dataset, to_tensor, with_trigger
from mixdiff_cli.core.errors import DuplicateExpert, MixdiffError, UsageError
from mixdiff_cli.core.quiet import quiet_frameworks

if TYPE_CHECKING:
    import torch

TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "attn-ff": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
}
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
MixedPrecision = Literal["no", "fp16", "bf16"]
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
SUPPORTED_PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
CHECKPOINT_FORMAT = "mixdiff-finetune-checkpoint/1"
MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-512/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}
KOHYA_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
VAL_SEED = 20261126  # validation noise/timesteps are fixed across runs and seeds
VAL_EVALS = 64  # (image, timestep) pairs in the validation loss at least


class FineTuneError(MixdiffError):
    pass


class InvalidConfig(UsageError):
    """A fine-tuning setting is out of range (exit 2)."""


class BaseModelError(MixdiffError):
    """The base model is missing or not a trainable Stable Diffusion pipeline."""


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


# --- randomness: every draw is a function of (seed, salt) -----------------------------------------


def _derive(seed: int, *salt: object) -> int:
    digest = hashlib.blake2b(repr((seed, *salt)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(seed: int, *salt: object) -> "torch.Generator":
    import torch

    return torch.Generator().manual_seed(_derive(seed, *salt))


# --- the base model -------------------------------------------------------------------------------


@dataclass
class BaseInfo:
    """What we know about a base from its configs, before loading any weights."""

    path: Path
    family: Literal["sd", "sdxl"]
    arch: str  # sd1, sd2, sdxl
    vae_scale: int
    unet_multiple: int  # latent sides must be multiples of this
    native_resolution: int


def inspect_base(path: str | Path) -> BaseInfo:
    """Check that `path` is a diffusers SD/SDXL folder and read its geometry (configs only)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise BaseModelError(f"base model {path} does not exist", "pass --base with a diffusers pipeline folder, or fix the catalog's base")
    if path.is_file():
        raise BaseModelError(
            f"base {path} is a single-file checkpoint", "fine-tune needs a diffusers folder: convert it with diffusers' from_single_file(...).save_pretrained(DIR)"
        )
    index = path / "model_index.json"
    if not index.is_file():
        raise BaseModelError(f"{path} has no model_index.json", "pass a diffusers pipeline folder (as written by save_pretrained)")
    try:
        cls = json.loads(index.read_text())["_class_name"]
        unet_cfg = json.loads((path / "unet" / "config.json").read_text())
        vae_cfg = json.loads((path / "vae" / "config.json").read_text())
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise BaseModelError(f"cannot read the configs of base {path}: {exc}", "check the folder is a complete diffusers pipeline") from None
    if cls not in SUPPORTED_PIPELINES:
        raise BaseModelError(f"base {path} is a {cls}", "fine-tune trains LoRAs for StableDiffusionPipeline and StableDiffusionXLPipeline bases")
    family = SUPPORTED_PIPELINES[cls]
    arch = "sdxl" if family == "sdxl" else ("sd2" if unet_cfg.get("cross_attention_dim") == 1024 else "sd1")
    vae_scale = 2 ** (len(vae_cfg.get("block_out_channels", [0])) - 1)
    size = unet_cfg.get("sample_size", 64)
    size = size[0] if isinstance(size, (list, tuple)) else size
    unet_multiple = 2 ** (len(unet_cfg.get("block_out_channels", [0])) - 1)
    return BaseInfo(path, family, arch, vae_scale, unet_multiple, int(size) * vae_scale)


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


def _load_pipeline(info: BaseInfo):
    try:
        with quiet_frameworks():
            from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

            if info.family == "sd":
                pipe = StableDiffusionPipeline.from_pretrained(info.path, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            else:
                pipe = StableDiffusionXLPipeline.from_pretrained(info.path)  # float32
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"cannot load base {info.path}: {str(exc).splitlines()[0]}", "check the folder is a complete diffusers pipeline") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Text:
    """Prompt encoding the way diffusers' training scripts do it (SD: last hidden state; SDXL: the
    penultimate hidden states of both encoders concatenated, plus the second encoder's pooled output)."""

    def __init__(self, pipe, family: str):
        self.family = family
        if family == "sd":
            self.tokenizers, self.encoders = [pipe.tokenizer], [pipe.text_encoder]
        else:
            self.tokenizers, self.encoders = [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]

    def tokenize(self, captions: Sequence[str]) -> list["torch.Tensor"]:
        return [
            tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            for tok in self.tokenizers
        ]

    def encode(self, ids: list["torch.Tensor"], encoders: Sequence[Any] | None = None) -> tuple["torch.Tensor", "torch.Tensor | None"]:
        """Token ids per tokenizer -> (hidden (B, T, D), pooled (B, P) or None)."""
        import torch

        encoders = encoders or self.encoders
        if self.family == "sd":
            enc = encoders[0]
            return enc(ids[0].to(_device_of(enc)), return_dict=False)[0], None
        hidden, pooled = [], None
        for enc, tok_ids in zip(encoders, ids):
            out = enc(tok_ids.to(_device_of(enc)), output_hidden_states=True, return_dict=False)
            pooled = out[0]  # CLIPTextModelWithProjection: text_embeds (B, P); the last one wins
            hidden.append(out[-1][-2])  # (B, T, D_i)
        return torch.cat(hidden, dim=-1), pooled


def _device_of(module) -> "torch.device":
    return next(module.parameters()).device


# --- data on the device ---------------------------------------------------------------------------


@dataclass
class _Cache:
    """Per-image tensors computed once (N images). Flipped variants only with random_flip."""

    latents: "torch.Tensor | None"  # (N, C, h, w), None when random crops are encoded per step
    latents_flipped: "torch.Tensor | None"
    hidden: "torch.Tensor | None"  # (N, T, D), None when the text encoder trains
    pooled: "torch.Tensor | None"  # (N, P) SDXL
    ids: list["torch.Tensor"]  # token ids per tokenizer, (N, T)
    time_ids: "torch.Tensor | None"  # (N, 6) SDXL: original size, crop top-left, target size
    time_ids_flipped: "torch.Tensor | None"
    images: list[Any]  # resized (not cropped) PIL images, for random crops
    sizes: list[tuple[int, int]]  # original (h, w)


def _encode_images(vae, pixels: "torch.Tensor", mode: str, generator=None) -> "torch.Tensor":
    """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f)."""
    import torch

    with torch.no_grad():
        dist = vae.encode(pixels.to(_device_of(vae), dtype=vae.dtype)).latent_dist
        z = dist.mean if mode == "mean" else dist.sample(generator)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((z - shift) * vae.config.scaling_factor).float()


def _time_ids(size: tuple[int, int], top: int, left: int, resolution: int) -> list[float]:
    return [size[0], size[1], top, left, resolution, resolution]


def _build_cache(pipe, text: _Text, records, cfg: FineTuneConfig, resolution: int, seed: int, device, chunk: int = 8) -> _Cache:
    import torch
    from PIL import Image

    captions = [with_trigger(r.caption, cfg.trigger) for r in records]
    ids = text.tokenize(captions)
    sizes, resized = [], []
    for rec in records:
        with Image.open(rec.path) as im:
            sizes.append((im.height, im.width))
    cache = _Cache(None, None, None, None, ids, None, None, [], sizes)
    if cfg.crop == "center":
        lat, lat_f = [], []
        for i in range(0, len(records), chunk):
            part = records[i : i + chunk]
            gen = _generator(seed, "latents", i) if cfg.latents == "sample" else None
            lat.append(_encode_images(pipe.vae, to_tensor([load_image(r.path, resolution) for r in part]), cfg.latents, gen))
            if cfg.random_flip:
                imgs = [load_image(r.path, resolution, flip=True) for r in part]
                lat_f.append(_encode_images(pipe.vae, to_tensor(imgs), cfg.latents, gen))
        cache.latents = torch.cat(lat).to(device)
        cache.latents_flipped = torch.cat(lat_f).to(device) if lat_f else None
    else:
        for rec in records:
            with Image.open(rec.path) as im:
                im = im.convert("RGB")
                scale = resolution / min(im.size)
                resized.append(im.resize((max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))), Image.Resampling.BICUBIC))
        cache.images = resized
    if text.family == "sdxl":
        tids, tids_f = [], []
        for (h, w) in sizes:
            scale = resolution / min(h, w)
            rh, rw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
            top, left = round((rh - resolution) / 2), round((rw - resolution) / 2)
            tids.append(_time_ids((h, w), top, left, resolution))
            tids_f.append(_time_ids((h, w), top, rw - left - resolution, resolution))
        cache.time_ids = torch.tensor(tids, dtype=torch.float32, device=device)
        cache.time_ids_flipped = torch.tensor(tids_f, dtype=torch.float32, device=device)
    if not cfg.train_text_encoder:
        hid, pooled = [], []
        with torch.no_grad():
            for i in range(0, len(records), 32):
                h, p = text.encode([t[i : i + 32] for t in ids])
                hid.append(h.float())
                if p is not None:
                    pooled.append(p.float())
        cache.hidden = torch.cat(hid).to(device)
        cache.pooled = torch.cat(pooled).to(device) if pooled else None
    return cache


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

    def __init__(self, cache: _Cache, n: int, cfg: FineTuneConfig, seed: int, num_train_timesteps: int,
                 global_batch: int, rank: int, device, vae, resolution: int):
        self.cache, self.n, self.cfg, self.seed = cache, n, cfg, seed
        self.T, self.G, self.rank, self.device = num_train_timesteps, global_batch, rank, device
        self.vae, self.resolution = vae, resolution
        self._perms: dict[int, "torch.Tensor"] = {}

    def perm(self, epoch: int) -> "torch.Tensor":
        import torch

        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(self.n, generator=_generator(self.seed, "epoch", epoch))
        return self._perms[epoch]

    def indices(self, k: int) -> list[int]:
        start = k * self.G
        return [int(self.perm(p // self.n)[p % self.n]) for p in range(start, start + self.G)]

    def batch(self, k: int, latent_shape: tuple[int, ...]) -> _Batch:
        import torch

        cfg, G = self.cfg, self.G
        gen = _generator(self.seed, "batch", k)
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
            tids.append(_time_ids(self.cache.sizes[i], top, left, self.resolution))
        latents = _encode_images(self.vae, to_tensor(crops), "mean")
        return latents.to(self.device), torch.tensor(tids, dtype=torch.float32, device=self.device)


# --- the objective --------------------------------------------------------------------------------


def _target(scheduler, latents, noise, timesteps):
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise FineTuneError(f"unsupported prediction_type {kind!r} in the base's scheduler", "use a base whose scheduler predicts epsilon, v or sample")


def _per_sample_loss(unet, scheduler, latents, noise, timesteps, hidden, pooled, time_ids) -> "torch.Tensor":
    """Unweighted denoising MSE per sample, (B,)."""
    import torch.nn.functional as F

    noisy = scheduler.add_noise(latents, noise, timesteps)
    added = None if pooled is None else {"text_embeds": pooled, "time_ids": time_ids}
    pred = unet(noisy, timesteps, hidden, added_cond_kwargs=added, return_dict=False)[0]
    loss = F.mse_loss(pred.float(), _target(scheduler, latents, noise, timesteps).float(), reduction="none")
    return loss.mean(dim=tuple(range(1, loss.ndim)))


def _snr_weights(scheduler, timesteps, gamma: float) -> "torch.Tensor":
    """min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v (Hang et al. 2023, Eq. 5)."""
    import torch
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=gamma)
    kind = scheduler.config.prediction_type
    return weights / snr if kind == "epsilon" else weights / (snr + 1) if kind == "v_prediction" else weights


@dataclass
class _ValSet:
    """A fixed held-out batch: M (image, noise, timestep) triples, stratified timesteps."""

    latents: "torch.Tensor"  # (M, C, h, w)
    noise: "torch.Tensor"
    timesteps: "torch.Tensor"
    rows: "torch.Tensor"  # (M,) which image each triple uses
    ids: list["torch.Tensor"]  # token ids per tokenizer, (n, T)
    time_ids: "torch.Tensor | None"  # (n, 6)


def _make_valset(latents: "torch.Tensor", ids, time_ids, num_train_timesteps: int, evals: int = VAL_EVALS) -> _ValSet:
    import torch

    n = latents.shape[0]
    repeats = max(1, math.ceil(evals / n))
    m = n * repeats
    gen = torch.Generator().manual_seed(VAL_SEED)
    rows = torch.arange(n).repeat(repeats)
    strata = (torch.arange(m) + torch.rand(m, generator=gen)) / m  # one timestep per stratum of [0, 1)
    timesteps = (strata[torch.randperm(m, generator=gen)] * num_train_timesteps).long().clamp_(max=num_train_timesteps - 1)
    noise = torch.randn((m, *latents.shape[1:]), generator=gen)
    dev = latents.device
    return _ValSet(latents.index_select(0, rows.to(dev)), noise.to(dev), timesteps.to(dev), rows.to(dev), ids, time_ids)


def _val_loss(unet, scheduler, text: _Text, val: _ValSet, encoders=None, chunk: int = 32) -> float:
    import torch

    with torch.no_grad():
        hidden, pooled = text.encode(val.ids, encoders)
        hidden = hidden.float()
        total = 0.0
        for i in range(0, val.latents.shape[0], chunk):
            rows = val.rows[i : i + chunk]
            h = hidden.index_select(0, rows.to(hidden.device))
            p = None if pooled is None else pooled.float().index_select(0, rows.to(pooled.device))
            t_ids = None if val.time_ids is None else val.time_ids.index_select(0, rows)
            losses = _per_sample_loss(unet, scheduler, val.latents[i : i + chunk], val.noise[i : i + chunk], val.timesteps[i : i + chunk], h, p, t_ids)
            total += float(losses.sum())
    return total / val.latents.shape[0]


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


def _flatten_optimizer(state: dict) -> tuple[dict[str, "torch.Tensor"], dict[str, Any]]:
    """torch optimizer state_dict -> (tensors for safetensors, JSON-able rest). Nothing pickled."""
    import torch

    tensors, scalars = {}, {}
    for pid, slots in state["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, "torch.Tensor"], rest: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, slot = key.split(".", 2)
        state.setdefault(int(pid), {})[slot] = value
    for key, value in rest["scalars"].items():
        pid, slot = key.split(".", 1)
        state.setdefault(int(pid), {})[slot] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def _write_checkpoint(folder: Path, params: dict[str, "torch.Tensor"], optimizer_state: dict, meta: dict, keep: int) -> Path:
    """Write checkpoint-NNNNNN atomically (a hidden sibling folder renamed into place), keep the last `keep`."""
    from safetensors.torch import save_file

    from mixdiff_cli.core.fsutil import fsync_dir

    target = folder / f"checkpoint-{meta['step']:06d}"
    for stale in folder.glob(".checkpoint-*.partial-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder / f".{target.name}.partial-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, tmp / "lora.safetensors")
        tensors, rest = _flatten_optimizer(optimizer_state)
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps({**meta, "optimizer": rest}, indent=1))
        for file in tmp.iterdir():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        fsync_dir(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in _checkpoint_dirs(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _read_checkpoint(path: Path) -> tuple[dict[str, "torch.Tensor"], dict, dict]:
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / "state.json").read_text())
        params = load_file(path / "lora.safetensors")
        opt = _unflatten_optimizer(load_file(path / "optimizer.safetensors"), meta["optimizer"])
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
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
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
    from mixdiff_cli.catalog.schema import check_name, load_catalog

    cfg.validate()
    check_name(name)
    cat = load_catalog(catalog_path) if catalog_path is not None else None
    if register and cat is None:
        raise UsageError("no catalog to register the expert in", "pass --catalog PATH, or --no-register with --base")
    if register and name in cat.names:
        raise DuplicateExpert(f"an expert named {name!r} already exists in {cat.path}", "pass another --name, or remove the old one first")
    root = cat.root if cat is not None else Path.cwd()
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
        self.pipe = pipe = _load_pipeline(info)
        self.unet, self.text = pipe.unet, _Text(pipe, info.family)
        for module in (self.unet, pipe.vae, *self.text.encoders):
            module.requires_grad_(False)
        cast = {} if weight_dtype == torch.float32 else {"dtype": weight_dtype}
        for module in (self.unet, *self.text.encoders):
            module.to(dev, **cast)
        pipe.vae.to(dev)  # float32: it only encodes, once
        self.unet_lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian", target_modules=cfg.target_modules())
        self.te_lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian", target_modules=list(TEXT_TARGETS))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_derive(seed, "lora-init"))
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
        cache = _build_cache(pipe, self.text, plan.train, cfg, plan.resolution, seed, dev)
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
            val_cfg = FineTuneConfig(**{**cfg.to_dict(), "crop": "center", "random_flip": False, "train_text_encoder": True, "latents": "mean"})
            vc = _build_cache(pipe, self.text, plan.val, val_cfg, plan.resolution, seed, dev)
            self.valset = _make_valset(vc.latents, vc.ids, vc.time_ids, T)

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
                return _val_loss(self.unet, self.noise_scheduler, self.text, self.valset)
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
                losses = _per_sample_loss(unet_w, self.noise_scheduler, b.latents, b.noise, b.timesteps, hidden, pooled, b.time_ids)
                if cfg.snr_gamma is not None:
                    losses = losses * _snr_weights(self.noise_scheduler, b.timesteps, cfg.snr_gamma)
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
                gen = torch.Generator().manual_seed(_derive(self.plan.seed, "sample", i))
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
    register: bool = True,
    description: str | None = None,
    resume: str | Path | None = None,
    stop_after: int | None = None,
    device: str | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> FineTuneResult:
    """Train a LoRA on the captioned images in `data` and register it in the catalog as `name`.

    base: train against this diffusers folder instead of the catalog's base (then register=False
    unless it is the same). output: the LoRA file (default experts/NAME.safetensors beside the
    catalog). output_dir: checkpoints and sample images (default runs/NAME beside the catalog).
    resume: "latest" or a checkpoint folder. stop_after: optimizer steps to run in this call before
    saving a checkpoint and returning unfinished (for time-sliced training). on_event receives
    StepEvent / CheckpointEvent / Note on the main process.
    """
    cfg = config or FineTuneConfig()
    if stop_after is not None and stop_after < 1:
        raise InvalidConfig("stop-after must be at least 1", "pass the number of steps to run before stopping")
    main = int(os.environ.get("RANK", "0")) == 0  # torchrun and accelerate launch set RANK

    def emit(event: Event) -> None:
        if on_event is not None and main:
            on_event(event)

    plan = _plan(catalog_path, data, name, cfg, base=base, output=output, output_dir=output_dir, register=register, resume=resume)
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
        if register:
            from mixdiff_cli.experts.manage import add_expert

            ds = plan.ds
            add_expert(
                plan.cat.path, str(result.lora_path), name=name, trigger=list(cfg.trigger),
                prompts=list(dict.fromkeys(r.caption for r in ds.records))[:32],  # what the router learns from
                description=description if description is not None else f"LoRA fine-tuned on {len(ds)} images of {ds.root.name} ({tr.total} steps)",
            )
            result.registered = True
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        accelerator.end_training()
    return result


# --- evaluation on any dataset --------------------------------------------------------------------


@dataclass
class LossReport:
    base: float  # held-out denoising loss of the bare base
    lora: float | None  # the same with the LoRA loaded through plain diffusers
    n_images: int

    @property
    def improvement(self) -> float | None:
        """Relative loss reduction, (base - lora) / base."""
        return None if self.lora is None else (self.base - self.lora) / self.base


def denoising_loss(
    base: str | Path, data: str | Path, lora: str | Path | None = None, *, resolution: int | None = None,
    trigger: Sequence[str] = (), max_images: int | None = None, evals: int = VAL_EVALS, device: str | None = None,
) -> LossReport:
    """The fixed-noise denoising loss of `base` on a captioned folder, with and without a LoRA file
    loaded by diffusers' `load_lora_weights`: how much an expert helps on a domain."""
    import torch

    info = inspect_base(base)
    ds = scan_dataset(data)
    records = ds.records[:max_images] if max_images else ds.records
    resolution = resolution or info.native_resolution
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = _load_pipeline(info)
    pipe.to(dev)
    text = _Text(pipe, info.family)
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    cfg = FineTuneConfig(trigger=list(trigger), train_text_encoder=True)
    cache = _build_cache(pipe, text, records, cfg, resolution, 0, dev)
    valset = _make_valset(cache.latents, cache.ids, cache.time_ids, scheduler.config.num_train_timesteps, evals)
    base_loss = _val_loss(pipe.unet, scheduler, text, valset)
    lora_loss = None
    if lora is not None:
        pipe.load_lora_weights(str(lora), adapter_name="expert")
        lora_loss = _val_loss(pipe.unet, scheduler, text, valset)
    return LossReport(base_loss, lora_loss, len(records))
