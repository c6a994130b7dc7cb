"""The denoising objective of diffusers' `train_text_to_image_lora.py` and the fixed held-out set it is
measured on: fine-tune's validation loss, `denoising_loss` and `mixdiff evaluate experts` all use these.

Noise the latents at timestep t, predict with the UNet, regress onto the noise (or the velocity, or the
sample, as the scheduler's `prediction_type` says); min-SNR-gamma weighting is Hang et al. (2023),
arXiv:2303.09556, Eq. 5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixdiff_cli.models.pipeline import BaseModelError
from mixdiff_cli.training.encoding import CacheSpec, CaptionEncoder, build_cache

if TYPE_CHECKING:
    import torch

    from mixdiff_cli.families.base import Family
    from mixdiff_cli.training.dataset import Record

VAL_SEED = 20261126  # validation noise/timesteps are fixed across runs and seeds
VAL_EVALS = 64  # (image, timestep) pairs in the validation loss at least


def prediction_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should output: the noise, the velocity or the clean latents."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise BaseModelError(f"unsupported prediction_type {kind!r} in the base's scheduler", "use a base whose scheduler predicts epsilon, v or sample")


def per_sample_loss(family: Family, denoiser: Any, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    cond: dict[str, torch.Tensor], dtype: Any = None) -> torch.Tensor:
    """Unweighted denoising MSE per sample, (B,), of `denoiser` called through its family's wrapper on `cond`
    (`CaptionEncoder.cond`); it sees the noisy latents in `dtype` (None: as they are)."""
    import torch.nn.functional as F

    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = family.run(denoiser, noisy if dtype is None else noisy.to(dtype), timesteps, cond, {})
    loss = F.mse_loss(pred.float(), prediction_target(scheduler, latents, noise, timesteps).float(), reduction="none")
    return loss.mean(dim=tuple(range(1, loss.ndim)))


def snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v (Hang et al. 2023, Eq. 5)."""
    import torch
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=gamma)
    kind = scheduler.config.prediction_type
    return weights / snr if kind == "epsilon" else weights / (snr + 1) if kind == "v_prediction" else weights


@dataclass
class HeldoutSet:
    """A fixed held-out batch: M (image, noise, timestep) triples, stratified timesteps."""

    latents: torch.Tensor  # (M, C, h, w)
    noise: torch.Tensor
    timesteps: torch.Tensor
    rows: torch.Tensor  # (M,) which image each triple uses
    ids: list[torch.Tensor]  # token ids per tokenizer, (n, T)
    micro: torch.Tensor | None  # (n, K) the family's micro-conditioning


def heldout_set(latents: torch.Tensor, ids: list[torch.Tensor], micro: torch.Tensor | None, num_train_timesteps: int,
                evals: int = VAL_EVALS) -> HeldoutSet:
    """At least `evals` triples over the n images (each image equally often), from the fixed VAL_SEED."""
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
    return HeldoutSet(latents.index_select(0, rows.to(dev)), noise.to(dev), timesteps.to(dev), rows.to(dev), ids, micro)


def make_heldout(pipe: Any, text: CaptionEncoder, records: Sequence[Record], resolution: int, device: Any,
                 num_train_timesteps: int, *, trigger: Sequence[str] = (), evals: int = VAL_EVALS) -> HeldoutSet:
    """The held-out set of captioned `records`: center crops, posterior-mean latents, token ids kept."""
    cache = build_cache(pipe, text, list(records), CacheSpec(trigger=tuple(trigger)), resolution, 0, device)
    return heldout_set(cache.latents, cache.ids, cache.micro, num_train_timesteps, evals)


def heldout_losses(unet: Any, scheduler: Any, text: CaptionEncoder, val: HeldoutSet, *, encoders: Sequence[Any] | None = None,
                   chunk: int = 32, dtype: Any = None) -> list[torch.Tensor]:
    """Per-triple denoising MSE of `val`, one (chunk,) tensor per chunk in order, without gradients; the
    UNet's inputs in `dtype` (None: float32)."""
    import torch

    out = []
    with torch.no_grad():
        hidden, pooled = text.encode(val.ids, encoders)
        hidden = hidden.float()
        for i in range(0, val.latents.shape[0], chunk):
            rows = val.rows[i : i + chunk]
            h = hidden.index_select(0, rows.to(hidden.device))
            p = None if pooled is None else pooled.float().index_select(0, rows.to(pooled.device))
            micro = None if val.micro is None else val.micro.index_select(0, rows)
            if dtype is not None:
                h, p, micro = (None if x is None else x.to(dtype) for x in (h, p, micro))
            out.append(per_sample_loss(text.family, unet, scheduler, val.latents[i : i + chunk], val.noise[i : i + chunk],
                                       val.timesteps[i : i + chunk], text.cond(h, p, micro), dtype))
    return out


def heldout_loss(unet: Any, scheduler: Any, text: CaptionEncoder, val: HeldoutSet, encoders: Sequence[Any] | None = None, chunk: int = 32) -> float:
    """The mean denoising MSE over `val` (chunk sums added in order, as fine-tune has always reported it)."""
    total = 0.0
    for losses in heldout_losses(unet, scheduler, text, val, encoders=encoders, chunk=chunk):
        total += float(losses.sum())
    return total / val.latents.shape[0]


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
    from diffusers import DDPMScheduler

    from mixdiff_cli.core.runtime import pick_device
    from mixdiff_cli.models.pipeline import inspect_base, load_pipeline
    from mixdiff_cli.training.dataset import scan_dataset

    info = inspect_base(base)
    ds = scan_dataset(data)
    records = ds.records[:max_images] if max_images else ds.records
    resolution = resolution or info.native_resolution
    dev = pick_device(device)
    pipe = load_pipeline(info.path, device=dev, safety_checker=False)
    text = CaptionEncoder(pipe, info.family)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    valset = make_heldout(pipe, text, records, resolution, dev, scheduler.config.num_train_timesteps, trigger=trigger, evals=evals)
    base_loss = heldout_loss(pipe.unet, scheduler, text, valset)
    lora_loss = None
    if lora is not None:
        pipe.load_lora_weights(str(lora), adapter_name="expert")
        lora_loss = heldout_loss(pipe.unet, scheduler, text, valset)
    return LossReport(base_loss, lora_loss, len(records))
