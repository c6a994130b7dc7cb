"""`mixdiff fine-tune`: train a LoRA expert on a captioned image folder and register it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from mixdiff_cli.cli._common import CatalogOpt, DeviceOpt, SeedOpt
from mixdiff_cli.cli._errors import command
from mixdiff_cli.cli._output import out

LrScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
EXAMPLES = """
Examples:

  mixdiff fine-tune ./watercolors --name watercolor --trigger wtrclr --steps 1500

  mixdiff fine-tune ./data --name stripes --rank 4 --lr 1e-3 --steps 300 --resolution 32

  mixdiff fine-tune ./data --name stripes --resume latest        # continue a killed run

  accelerate launch --multi_gpu --num_processes 2 -m mixdiff_cli fine-tune ./data --name x
"""


def register(app: typer.Typer) -> None:
    @command(app, "fine-tune", help="Train a LoRA expert on a folder of captioned images and register it in the catalog.\n" + EXAMPLES)
    def fine_tune_cmd(
        data: Annotated[Path, typer.Argument(help="Folder of images with IMAGE.txt captions, or with a metadata.jsonl (file_name, text).", show_default=False)],
        name: Annotated[str, typer.Option("--name", "-n", help="Expert name (also the LoRA file name).", show_default=False)],
        catalog: CatalogOpt = None,
        base: Annotated[Optional[str], typer.Option(help="Train against this diffusers folder instead of the catalog's base.")] = None,
        output: Annotated[Optional[Path], typer.Option("--output", "-o", help="LoRA file. Default: experts/NAME.safetensors beside the catalog.")] = None,
        output_dir: Annotated[Optional[Path], typer.Option(help="Checkpoints and samples. Default: runs/NAME beside the catalog.")] = None,
        no_register: Annotated[bool, typer.Option("--no-register", help="Write the LoRA but do not add it to the catalog.")] = False,
        description: Annotated[Optional[str], typer.Option(help="Catalog description.")] = None,
        trigger: Annotated[Optional[list[str]], typer.Option("--trigger", help="Trigger word prepended to every caption and recorded (repeatable).")] = None,
        resolution: Annotated[Optional[int], typer.Option(help="Training size in pixels. Default: the base's native size.")] = None,
        crop: Annotated[Literal["center", "random"], typer.Option(help="How images are cropped square after resizing.")] = "center",
        random_flip: Annotated[bool, typer.Option("--random-flip", help="Mirror images at random.")] = False,
        rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
        alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha. Default: the rank (scale 1).")] = None,
        target: Annotated[str, typer.Option(help="UNet layers: attn (to_q,to_k,to_v,to_out.0), attn-ff (+ feed-forward), or names.")] = "attn",
        train_text_encoder: Annotated[bool, typer.Option("--train-text-encoder", help="Also train a LoRA on the text encoder(s).")] = False,
        steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (default 500 unless --epochs).")] = None,
        epochs: Annotated[Optional[float], typer.Option(help="Passes over the training images, instead of --steps.")] = None,
        lr: Annotated[float, typer.Option("--lr", help="Learning rate (AdamW).")] = 1e-4,
        lr_scheduler: Annotated[LrScheduler, typer.Option(help="Learning-rate schedule (diffusers.optimization.get_scheduler).")] = "constant",
        warmup: Annotated[int, typer.Option(help="Learning-rate warm-up steps.")] = 0,
        batch_size: Annotated[int, typer.Option(help="Images per step and process.")] = 1,
        grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
        gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Trade compute for memory.")] = False,
        mixed_precision: Annotated[Literal["no", "fp16", "bf16"], typer.Option(help="fp16 needs CUDA.")] = "no",
        snr_gamma: Annotated[Optional[float], typer.Option(help="Min-SNR loss weighting (5.0 is usual).")] = None,
        noise_offset: Annotated[float, typer.Option(help="Offset noise strength (e.g. 0.05).")] = 0.0,
        caption_dropout: Annotated[float, typer.Option(help="Fraction of captions trained as \"\" (e.g. 0.1), so the expert also learns its domain unconditionally.")] = 0.0,
        seed: SeedOpt = None,
        validation_split: Annotated[float, typer.Option(help="Fraction of images held out for the validation loss.")] = 0.1,
        validation_prompt: Annotated[Optional[list[str]], typer.Option("--validation-prompt", help="Render this prompt at each checkpoint (repeatable).")] = None,
        checkpoint_every: Annotated[Optional[int], typer.Option(help="Steps between checkpoints. Default: 5 per run.")] = None,
        keep: Annotated[int, typer.Option(help="Checkpoints kept.")] = 2,
        resume: Annotated[Optional[str], typer.Option(help="'latest' or a checkpoint folder: continue a stopped run.")] = None,
        stop_after: Annotated[Optional[int], typer.Option(help="Stop after this many steps of this run (a checkpoint is saved).")] = None,
        device: DeviceOpt = None,
    ) -> None:
        from mixdiff_cli.catalog.discovery import find_catalog
        from mixdiff_cli.core.errors import CatalogNotFound
        from mixdiff_cli.training.config import FineTuneConfig, FineTuneJob, Registration
        from mixdiff_cli.training.finetune import fine_tune

        cfg = FineTuneConfig(
            rank=rank, alpha=alpha, target=target, train_text_encoder=train_text_encoder, steps=steps, epochs=epochs, lr=lr,
            lr_scheduler=lr_scheduler, warmup=warmup, batch_size=batch_size, grad_accum=grad_accum,
            gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision, snr_gamma=snr_gamma,
            noise_offset=noise_offset, caption_dropout=caption_dropout, seed=seed, resolution=resolution, crop=crop, random_flip=random_flip,
            trigger=list(trigger or []), validation_split=validation_split, validation_prompts=list(validation_prompt or []),
            checkpoint_every=checkpoint_every, keep=keep,
        )
        try:
            catalog_path = find_catalog(catalog, for_write=not no_register)
        except CatalogNotFound:
            if not (no_register and base):
                raise
            catalog_path = None
        with _Progress() as progress:
            job = FineTuneJob(
                catalog_path, data, name, cfg, base=base, output=output, output_dir=output_dir,
                register=False if no_register else Registration(description), resume=resume, stop_after=stop_after, device=device,
            )
            result = fine_tune(job, on_event=progress.on_event)
        if not result.main_process:
            return
        if out.json:
            out.data(result.to_dict())
            return
        if result.base_loss is not None and result.lora_loss is not None:
            out.info(f"held-out loss: base {result.base_loss:.4f} -> LoRA {result.lora_loss:.4f} ({result.n_val} held-out image(s))")
        if not result.finished:
            out.info(f"stopped at step {result.step}/{result.total_steps}")
            out.hint(f"continue with: mixdiff fine-tune {data} --name {name} --resume latest")
            return
        out.result(str(result.lora_path))
        if result.registered:
            out.hint(f"registered as expert '{name}'; see it with: mixdiff experts show {name}")


class _Progress:
    """A rich progress bar on stderr (human mode only) fed by fine_tune's events."""

    def __init__(self) -> None:
        self.bar = None
        self.task = None

    def __enter__(self) -> "_Progress":
        if out.mode == "human" and os.environ.get("RANK", "0") == "0":  # one bar under torchrun/accelerate
            import sys

            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]fine-tune"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[sps]} steps/s"), TimeRemainingColumn(),
                console=Console(file=sys.stderr), transient=False,
            )
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def on_event(self, event) -> None:
        from mixdiff_cli.training.report import CheckpointEvent, Note, StepEvent

        if isinstance(event, Note):
            from rich.markup import escape

            out.warn(event.text) if event.level == "warn" else out.info(escape(event.text))  # paths are the user's text
            return
        if self.bar is None:
            return
        if isinstance(event, StepEvent):
            fields = {"loss": f"{event.loss:.4f}", "lr": f"{event.lr:.2e}", "sps": f"{event.steps_per_second:.1f}"}
            if self.task is None:
                self.task = self.bar.add_task("train", total=event.total, completed=event.step, **fields)
            else:
                self.bar.update(self.task, completed=event.step, **fields)
        elif isinstance(event, CheckpointEvent):
            losses = "" if event.val_loss is None else f": held-out loss {event.val_loss:.4f} (base {event.base_loss:.4f})"
            self.bar.console.print(f"step {event.step}/{event.total}{losses}  [dim]{event.path.name}[/dim]")
