"""Training speed of `mixdiff fine-tune` against a minimal diffusers-style LoRA loop, and peak memory.

Both train the same rank-4 LoRA (to_q, to_k, to_v, to_out.0) of the tiny SD fixture on the same 64
captioned images with cached latents and text embeddings, through accelerate, AdamW, gradient
clipping and a constant schedule. The minimal loop is what diffusers' train_text_to_image_lora.py does
per step, minus the VAE/text encoder calls it repeats every step. Each run is its own process (so peak
RSS is per run); runs alternate so that machine load hits both alike.

    python benchmarks/bench_finetune.py [--steps 150] [--rounds 3] [--batch-size 4] [--resolution 64]

Steps/s are timed from optimizer step 1 to the last (start-up, caching and step 1 excluded), in wall
time and in CPU time. Prints one table and a JSON line; target: ratio >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RANK, LR, SEED = 4, 1e-4, 0


def _fixtures(work: Path) -> tuple[Path, Path]:
    from mixdiff_cli.demo.data import write_dataset
    from mixdiff_cli.testing import build_tiny_sd

    base, data = work / "sd", work / "shapes"
    if not base.exists():
        build_tiny_sd(base)
    if not data.exists():
        write_dataset("shapes", data, 64, seed=0)
    return base, data


def _peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _Clock:
    """Wall and CPU time at optimizer step 1 and at the last step (so start-up and step 1 do not count)."""

    def __init__(self, steps: int):
        self.steps, self.marks = steps, {}

    def tick(self, step: int) -> None:
        if step in (1, self.steps):
            self.marks[step] = (time.perf_counter(), time.process_time())

    def rates(self) -> dict:
        (w0, c0), (w1, c1) = self.marks[1], self.marks[self.steps]
        return {"steps_per_second": (self.steps - 1) / (w1 - w0), "cpu_steps_per_second": (self.steps - 1) / (c1 - c0)}


def worker_mixdiff(base: Path, data: Path, work: Path, args) -> dict:
    """What `mixdiff fine-tune DATA --name bench --base BASE --no-register ...` runs: the library call
    the command makes, with a step callback (the CLI's is its progress bar) for the clock."""
    from mixdiff_cli.training.config import FineTuneConfig, FineTuneJob
    from mixdiff_cli.training.finetune import fine_tune
    from mixdiff_cli.training.report import StepEvent

    out = work / f"run-{os.getpid()}"
    clock = _Clock(args.steps)
    cfg = FineTuneConfig(rank=RANK, lr=LR, seed=SEED, steps=args.steps, batch_size=args.batch_size, resolution=args.resolution,
                         validation_split=0, checkpoint_every=args.steps)
    fine_tune(FineTuneJob(None, data, "bench", cfg, base=base, register=False, output=out / "bench.safetensors", output_dir=out / "run"),
              on_event=lambda e: clock.tick(e.step) if isinstance(e, StepEvent) else None)
    return {**clock.rates(), "peak_mb": _peak_mb()}


def worker_minimal(base: Path, data: Path, work: Path, args) -> dict:
    """The loop of diffusers' train_text_to_image_lora.py with latents/embeddings computed once."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    from mixdiff_cli.training.dataset import load_image, scan_dataset, to_tensor

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for m in (unet, vae, te):
        m.requires_grad_(False)
        m.to(accelerator.device)
    torch.manual_seed(SEED)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer, num_warmup_steps=0, num_training_steps=args.steps)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    records = scan_dataset(data).records
    with torch.no_grad():
        latents = torch.cat([vae.encode(to_tensor([load_image(r.path, args.resolution) for r in records[i : i + 8]]).to(accelerator.device)).latent_dist.mean
                             for i in range(0, len(records), 8)]) * vae.config.scaling_factor
        ids = tok([r.caption for r in records], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        hidden = te(ids.to(accelerator.device))[0]
    unet, optimizer = accelerator.prepare(unet, optimizer)
    unet.train()
    gen = torch.Generator().manual_seed(SEED)
    clock = _Clock(args.steps)
    for step in range(args.steps):
        idx = torch.randint(0, len(records), (args.batch_size,), generator=gen).to(accelerator.device)
        with accelerator.accumulate(unet):
            z = latents[idx]
            noise = torch.randn(z.shape, generator=gen).to(z.device)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (z.shape[0],), generator=gen).to(z.device)
            pred = unet(noise_scheduler.add_noise(z, noise, t), t, hidden[idx], return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        loss.detach().item()  # diffusers logs the loss every step
        clock.tick(step + 1)
    return {**clock.rates(), "peak_mb": _peak_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mixdiff-bench-finetune")
    parser.add_argument("--worker", choices=["mixdiff", "minimal"])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    base, data = _fixtures(args.work)
    if args.worker:
        fn = worker_mixdiff if args.worker == "mixdiff" else worker_minimal
        print(json.dumps(fn(base, data, args.work, args)))
        return

    runs: dict[str, list[dict]] = {"mixdiff": [], "minimal": []}
    for _ in range(args.rounds):
        for kind in ("minimal", "mixdiff"):
            cmd = [sys.executable, __file__, "--worker", kind, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--resolution", str(args.resolution), "--work", str(args.work)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
            runs[kind].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    # On a shared CPU, wall time carries other people's load: the best run is the least disturbed one,
    # and CPU time (single-threaded runs) does not see the load at all.
    best = {k: max(r["steps_per_second"] for r in v) for k, v in runs.items()}
    cpu = {k: max(r["cpu_steps_per_second"] for r in v) for k, v in runs.items()}
    peak = {k: max(r["peak_mb"] for r in v) for k, v in runs.items()}
    ratio, cpu_ratio = best["mixdiff"] / best["minimal"], cpu["mixdiff"] / cpu["minimal"]
    print(f"fine-tune benchmark: tiny SD, rank {RANK}, batch {args.batch_size}, {args.resolution}px, {args.steps} steps x {args.rounds} rounds, {device}")
    print(f"{'':8} {'steps/s best':>13} {'all runs (wall)':>22} {'steps/CPU-s':>12} {'peak ' + ('GPU MB' if cuda else 'RSS MB'):>12}")
    for k in ("mixdiff", "minimal"):
        all_runs = ", ".join(f"{r['steps_per_second']:.2f}" for r in runs[k])
        print(f"{k:8} {best[k]:13.2f} {all_runs:>22} {cpu[k]:12.2f} {peak[k]:12.0f}")
    print(f"ratio mixdiff/minimal: wall {ratio:.3f}, CPU time {cpu_ratio:.3f} (target >= 0.95)")
    print(json.dumps({"bench": "finetune", "ratio": ratio, "cpu_ratio": cpu_ratio, "steps_per_second": best,
                      "cpu_steps_per_second": cpu, "peak_mb": peak, "device": device}))


if __name__ == "__main__":
    main()
