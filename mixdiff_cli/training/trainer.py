"""One process's training state: the base with its LoRA, the optimizer, the data stream and the held-out batch."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mixdiff_cli.models.pipeline import load_pipeline
from mixdiff_cli.training.config import TARGET_PRESETS, TEXT_TARGETS, FineTuneConfig, FineTuneError, InvalidConfig
from mixdiff_cli.training.encoding import CaptionEncoder, build_cache, derive
from mixdiff_cli.training.export import Provenance, base_hash, export_lora, lora_metadata
from mixdiff_cli.training.loss import heldout_loss, make_heldout, per_sample_loss, snr_weights
from mixdiff_cli.training.plan import Plan
from mixdiff_cli.training.report import CheckpointEvent, Event, Note
from mixdiff_cli.training.resume import CHECKPOINT_FORMAT, CheckpointError, check_same_run, run_fingerprint, save_state
from mixdiff_cli.training.stream import Batch, Draws, Stream


def _lora_enabled(models, flag: bool) -> None:
    """Switch every PEFT LoRA layer of `models` on or off (what diffusers' enable/disable_adapters do)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in models:
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(flag)


def make_accelerator(cfg: FineTuneConfig, device: str | None):
    """An accelerate `Accelerator` for `cfg`'s mixed precision and gradient accumulation on `device`."""
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


def _total_steps(cfg: FineTuneConfig, n_train: int, global_batch: int) -> int:
    """Optimizer steps of the run: `steps`, else from `epochs`, else 500."""
    if cfg.steps is not None:
        return cfg.steps
    if cfg.epochs is not None:
        return max(1, math.ceil(cfg.epochs * n_train / (global_batch * cfg.grad_accum)))
    return 500


def _named_trainable(trained: list[Any], prefixes: list[str]) -> list[tuple[str, Any]]:
    """The trainable parameters of (denoiser, text encoders...), named by their pipeline components (`unet.*`, ...)."""
    return [(f"{pre}.{n}", p) for pre, mod in zip(prefixes, trained) for n, p in mod.named_parameters() if p.requires_grad]


class Trainer:
    """The base with its LoRA, the optimizer, the cached data and the held-out batch, on one process."""

    def __init__(self, plan: Plan, accelerator, emit: Callable[[Event], None]):
        self.plan, self.cfg, self.acc, self.emit = plan, plan.cfg, accelerator, emit
        cfg = plan.cfg
        self.is_main = accelerator.is_main_process
        global_batch = cfg.batch_size * accelerator.num_processes
        self.total = _total_steps(cfg, len(plan.train), global_batch)
        self.every = cfg.checkpoint_every or max(1, math.ceil(self.total / 5))
        self.dataset_hash = plan.ds.hash()
        self.base_sha = base_hash(plan.info.path)
        self.fingerprint = run_fingerprint(
            cfg, plan.seed, total_steps=self.total, resolution=plan.resolution, global_batch=global_batch,
            dataset_sha256=self.dataset_hash, base_sha256=self.base_sha, name=plan.name,
        )
        if plan.ckpt is not None:
            check_same_run(plan.ckpt[2], self.fingerprint, plan.ckpt_path)
        self._load_model()
        optimizer = self._make_optimizer()
        self._load_data(global_batch)
        # the learning-rate scheduler is stepped by hand, once per optimizer step: not prepared
        prepared = accelerator.prepare(*self.trained, optimizer)
        self.wrapped, self.optimizer = list(prepared[:-1]), prepared[-1]
        self.history: list[dict[str, float]] = []
        self.train_tail: list[float] = []
        self.base_loss: float | None = None

    def _load_model(self) -> None:
        """The base, frozen in the compute dtype, with LoRA layers in float32 (as diffusers' scripts)."""
        import torch

        cfg, dev = self.cfg, self.acc.device
        weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
        self.pipe = pipe = load_pipeline(self.plan.info.path, safety_checker=False)
        family = self.plan.info.family
        self.unet, self.text = getattr(pipe, family.denoiser), CaptionEncoder(pipe, family)
        for module in (self.unet, pipe.vae, *self.text.encoders):
            module.requires_grad_(False)
        cast = {} if weight_dtype == torch.float32 else {"dtype": weight_dtype}
        for module in (self.unet, *self.text.encoders):
            module.to(dev, **cast)
        pipe.vae.to(dev)  # float32: it only encodes, once
        self._add_lora()

    def _add_lora(self) -> None:
        """Inject the (seeded) LoRA layers into the UNet and, with train_text_encoder, the text encoders."""
        import torch
        from peft import LoraConfig

        cfg = self.cfg
        self.unet_lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian", target_modules=cfg.target_modules())
        self.te_lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian", target_modules=list(TEXT_TARGETS))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive(self.plan.seed, "lora-init"))
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

    def _make_optimizer(self) -> Any:
        """The trained modules' LoRA parameters in float32, AdamW over them, the LR and noise schedulers."""
        import torch
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import cast_training_params

        cfg = self.cfg
        self.trained = [self.unet, *(self.text.encoders if cfg.train_text_encoder else [])]
        cast_training_params(self.trained, dtype=torch.float32)
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            for enc in self.trained[1:]:
                enc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.named = _named_trainable(self.trained, self.plan.info.family.lora_prefixes())
        self.params = [p for _, p in self.named]
        optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup, num_training_steps=self.total)
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        if self.noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise FineTuneError(f"the base's scheduler predicts {self.noise_scheduler.config.prediction_type!r}", "use a base that predicts epsilon, v or sample")
        return optimizer

    def _load_data(self, global_batch: int) -> None:
        """The training cache and stream, the "" embeddings for caption dropout, the held-out set; once."""
        import torch

        plan, cfg, pipe, dev = self.plan, self.cfg, self.pipe, self.acc.device
        T = self.noise_scheduler.config.num_train_timesteps
        cache = build_cache(pipe, self.text, plan.train, cfg.cache_spec(), plan.resolution, plan.seed, dev)
        side = plan.resolution // plan.info.vae_scale
        self.latent_shape = (pipe.vae.config.latent_channels, side, side)
        draws = Draws(plan.seed, len(plan.train), T, global_batch)
        self.stream = Stream(cache, cfg, draws, self.acc.process_index, dev, pipe.vae, plan.resolution, plan.info.family)
        self.empty_ids = self.text.tokenize([""])  # what a dropped caption becomes
        self.empty = None
        if cfg.caption_dropout and cache.hidden is not None:  # cached embeddings: the frozen encoder's "" once
            with torch.no_grad():
                self.empty = self.text.encode(self.empty_ids)
        self.valset = None
        if plan.val:
            self.valset = make_heldout(pipe, self.text, plan.val, plan.resolution, dev, T, trigger=cfg.trigger)

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

    def _condition(self, b: Batch, encoders_w: list[Any] | None) -> dict[str, Any]:
        """The micro-batch's caption embeddings, "" where its captions are dropped."""
        import torch

        if b.drop is not None and b.hidden is None:  # the encoder trains: it sees "" for dropped captions
            b.ids = [torch.where(b.drop[:, None].cpu(), e, t) for e, t in zip(self.empty_ids, b.ids)]
        hidden, pooled = (b.hidden, b.pooled) if b.hidden is not None else self.text.encode(b.ids, encoders_w)
        if b.drop is not None and self.empty is not None:
            keep = ~b.drop
            hidden = torch.where(keep[:, None, None], hidden, self.empty[0].to(hidden))
            pooled = None if pooled is None else torch.where(keep[:, None], pooled, self.empty[1].to(pooled))
        return self.text.cond(hidden, pooled, b.micro)

    def train_step(self, step: int) -> float:
        """One optimizer step (grad_accum micro-batches); the mean loss of this process."""
        import torch

        cfg, acc, unet_w = self.cfg, self.acc, self.wrapped[0]
        encoders_w = self.wrapped[1:] if cfg.train_text_encoder else None
        total = torch.zeros((), device=acc.device)
        for micro in range(cfg.grad_accum):
            b = self.stream.batch(step * cfg.grad_accum + micro, self.latent_shape)
            with acc.accumulate(*self.wrapped):
                cond = self._condition(b, encoders_w)
                losses = per_sample_loss(self.text.family, unet_w, self.noise_scheduler, b.latents, b.noise, b.timesteps, cond)
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
        """Render the validation prompts with the LoRA into samples/step-NNNNNN-I.png."""
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
        """Validate, and on the main process write the resume state and render the samples."""
        val = self.validate()
        if val is not None:
            self.history.append({"step": step, "val_loss": val})
        if self.is_main:
            meta = {
                "format": CHECKPOINT_FORMAT, "step": step, "total_steps": self.total, "seed": self.plan.seed,
                "fingerprint": self.fingerprint, "params": [n for n, _ in self.named], "lr_scheduler": self.lr_scheduler.state_dict(),
                "history": self.history, "base_loss": self.base_loss, "train_tail": self.train_tail, "config": self.cfg.to_dict(),
            }
            path = save_state(self.plan.output_dir, dict(self.named), self.optimizer.state_dict(), meta, self.cfg.keep)
            shots = self.samples(step) if self.cfg.validation_prompts else []
            self.emit(CheckpointEvent(step, self.total, val, self.base_loss, path, shots))
        self.acc.wait_for_everyone()

    def export(self, lora_loss: float | None) -> Path:
        """Write the trained LoRA with its provenance header to the plan's output file."""
        plan = self.plan
        prov = Provenance(plan.name, plan.info.arch, self.base_sha, self.dataset_hash, plan.resolution, self.total)
        metadata = lora_metadata(prov, self.cfg, self.base_loss, lora_loss)
        unet = self.acc.unwrap_model(self.wrapped[0])
        encoders = [self.acc.unwrap_model(e) for e in self.wrapped[1:]]
        return export_lora(plan.output, plan.info.family, unet, self.unet_lora, encoders, self.te_lora, metadata)
