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

import os
import time
from collections.abc import Callable

from mixdiff_cli.training.config import FineTuneJob
from mixdiff_cli.training.export import register_expert
from mixdiff_cli.training.plan import Plan, make_plan
from mixdiff_cli.training.report import Event, FineTuneResult, Note, StepEvent
from mixdiff_cli.training.trainer import Trainer, make_accelerator


def _share_seed(plan: Plan, accelerator) -> None:
    """A seed drawn at random must be the main process's everywhere."""
    import torch
    from accelerate.utils import broadcast

    plan.seed = int(broadcast(torch.tensor([plan.seed], dtype=torch.int64, device=accelerator.device), from_process=0)[0])


def _run_steps(tr: Trainer, start: int, end: int, emit: Callable[[Event], None]) -> float:
    """Optimizer steps [start, end), a checkpoint every `tr.every` and at the end; the seconds they took."""
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
    return time.perf_counter() - t0


def _result(tr: Trainer, start: int, end: int, seconds: float) -> FineTuneResult:
    """The run's numbers (not yet exported or registered)."""
    plan = tr.plan
    lora_loss = tr.history[-1]["val_loss"] if tr.history and tr.history[-1]["step"] == end else tr.validate()
    return FineTuneResult(
        name=plan.name, lora_path=None, registered=False, finished=end == tr.total, step=end, total_steps=tr.total, seed=plan.seed,
        base_loss=tr.base_loss, lora_loss=lora_loss, train_loss=sum(tr.train_tail) / len(tr.train_tail) if tr.train_tail else None,
        history=tr.history, checkpoint_dir=plan.output_dir, dataset_hash=tr.dataset_hash, n_train=len(plan.train), n_val=len(plan.val),
        skipped=[str(p.relative_to(plan.ds.root)) for p, _ in plan.ds.skipped], train_seconds=seconds,
        steps_per_second=(end - start) / seconds if seconds > 0 else 0.0, main_process=tr.is_main,
    )


def fine_tune(job: FineTuneJob, on_event: Callable[[Event], None] | None = None) -> FineTuneResult:
    """Train a LoRA on the captioned images in `job.data` and register it in the catalog as `job.name`
    (see FineTuneJob); `on_event` receives StepEvent / CheckpointEvent / Note on the main process."""
    main = int(os.environ.get("RANK", "0")) == 0  # torchrun and accelerate launch set RANK

    def emit(event: Event) -> None:
        if on_event is not None and main:
            on_event(event)

    plan = make_plan(job)
    for path, why in plan.ds.skipped:
        emit(Note(f"skipped {path.relative_to(plan.ds.root)}: cannot decode ({why})", "warn"))
    accelerator = make_accelerator(plan.cfg, job.device)
    if accelerator.num_processes > 1:
        _share_seed(plan, accelerator)
    tr = Trainer(plan, accelerator, emit)  # the last of the checks: options, data and base are good from here on
    start = tr.restore() if plan.ckpt is not None else 0
    emit(Note(f"training on {len(plan.train)} image(s) of {plan.ds.root}, {len(plan.val)} held out for the validation loss"))
    tr.base_loss = tr.validate(lora=False)
    end = tr.total if job.stop_after is None else min(tr.total, start + job.stop_after)
    seconds = _run_steps(tr, start, end, emit)
    result = _result(tr, start, end, seconds)
    if result.finished and tr.is_main:
        result.lora_path = tr.export(result.lora_loss)
        if plan.registration is not None:
            register_expert(plan, result.lora_path, plan.registration, tr.total)
            result.registered = True
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        accelerator.end_training()
    return result
