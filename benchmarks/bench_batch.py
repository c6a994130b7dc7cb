"""Batch throughput: `run_batch` on 64 prompts over 4 route sets vs plain diffusers on one LoRA.

Both sides make the same number of images (same size, steps, batch size, one generator per image) and
write each as a PNG; runs alternate (A B A B ...) and the best run of each side is compared (the
least disturbed by other work on the machine; medians are printed too). The ratio
(mixdiff images/s / diffusers images/s) should be >= 0.95: routing, grouping, expert switches and
manifest fsyncs together may cost at most 5%. mixdiff runs twice: as it runs by default on CPU
(`exact`, images independent of batch size bit for bit) and with exact=False, to show what that costs. Two ratios are printed: by
wall-clock time, and by this process's CPU time, which other load on a shared machine does not skew.

    python benchmarks/bench_batch.py [--steps 10] [--batch-size 4] [--repeats 4] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROUTES = {"reds": "red", "blues": "blue", "greens": "green", "golds": "gold"}
THINGS = ["cat", "dog", "tree", "house", "car", "bird", "star", "circle",
          "fish", "horse", "flower", "mountain", "river", "castle", "robot", "dragon"]


def prompts() -> list[str]:
    """64 prompts, 16 per route set; interleaved so that grouping has work to do."""
    return [f"a {word} {thing}" for thing in THINGS for word in ROUTES.values()]


def build(root: Path) -> tuple[Path, Path, dict[str, Path]]:
    """Tiny SD from configs, four LoRAs and a catalog whose trigger words pick one expert per prompt."""
    from mixdiff_cli.experts.manage import add_expert, init_catalog
    from mixdiff_cli.testing import build_tiny_sd, make_lora

    base = build_tiny_sd(root / "sd")
    catalog = root / "experts.yaml"
    init_catalog(catalog, base=str(base))
    loras = {}
    for seed, (name, word) in enumerate(ROUTES.items(), start=100):
        loras[name] = make_lora(base, root / f"{name}.safetensors", seed=seed, scale=0.02)
        add_expert(catalog, str(loras[name]), name=name, prompts=[f"a {word} thing"], trigger=[word])
    return base, catalog, loras


def plain_diffusers(base: Path, lora: Path, texts: list[str], out: Path, steps: int, batch_size: int, seed: int):
    """The baseline a user would write: one pipeline, one LoRA, batches, one generator per image, PNGs."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora), adapter_name="one")

    def run() -> tuple[float, float]:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        t0, c0 = time.perf_counter(), time.process_time()
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
            images = pipe(chunk, num_inference_steps=steps, generator=gens).images
            for i, image in enumerate(images):
                image.save(out / f"{start + i:05d}.png")
        return time.perf_counter() - t0, time.process_time() - c0

    return run


def mixdiff_batch(catalog: Path, prompt_file: Path, out: Path, steps: int, batch_size: int, seed: int, engine, exact: bool):
    from mixdiff_cli.sampling.batch import BatchSettings, run_batch
    from mixdiff_cli.sampling.options import GenerationOptions

    def run() -> tuple[float, float]:
        shutil.rmtree(out, ignore_errors=True)
        t0, c0 = time.perf_counter(), time.process_time()
        result = run_batch(catalog, prompt_file, out, GenerationOptions(batch_size=batch_size, seed=seed, steps=steps), BatchSettings(exact=exact), engine=engine)
        assert result.written == len(prompts()) and result.exit_code == 0
        return time.perf_counter() - t0, time.process_time() - c0

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch

    from mixdiff_cli.sampling.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    texts = prompts()
    with tempfile.TemporaryDirectory(prefix="mixdiff-bench-batch-") as tmp:
        root = Path(tmp)
        base, catalog, loras = build(root)
        prompt_file = root / "prompts.txt"
        prompt_file.write_text("\n".join(texts) + "\n")
        engine = Engine(catalog, device="cpu", max_loaded=1)  # every run activates each of the 4 sets (loads them)
        sides = {
            "diffusers": plain_diffusers(base, loras["reds"], texts, root / "plain", args.steps, args.batch_size, 0),
            "mixdiff": mixdiff_batch(catalog, prompt_file, root / "ours", args.steps, args.batch_size, 0, engine, exact=True),
            "mixdiff_inexact": mixdiff_batch(catalog, prompt_file, root / "fast", args.steps, args.batch_size, 0, engine, exact=False),
        }
        for run in sides.values():
            run()  # warm-up (first-call allocations, LoRA loads)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, run in sides.items():
                engine.loads.clear()
                times[name].append(run())
        loads = len(engine.loads)

    n = len(texts)
    wall = {k: n / min(t for t, _ in v) for k, v in times.items()}  # images/s, best run
    cpu = {k: n / min(c for _, c in v) for k, v in times.items()}  # images per CPU-second, best run
    median = {k: n / statistics.median(c for _, c in v) for k, v in times.items()}
    ratio = lambda table, k: round(table[k] / table["diffusers"], 3)  # noqa: E731
    report = {
        "images": n, "route_sets": len(ROUTES), "steps": args.steps, "batch_size": args.batch_size,
        "threads": torch.get_num_threads(), "repeats": args.repeats, "target": 0.95, "expert_loads_per_run": loads,
        "images_per_s": {k: round(v, 3) for k, v in wall.items()},
        "images_per_cpu_s": {k: round(v, 3) for k, v in cpu.items()},
        "ratio_wall": {k: ratio(wall, k) for k in ("mixdiff", "mixdiff_inexact")},
        "ratio_cpu": {k: ratio(cpu, k) for k in ("mixdiff", "mixdiff_inexact")},
        "ratio_cpu_median": {k: ratio(median, k) for k in ("mixdiff", "mixdiff_inexact")},
        "seconds_wall_cpu": {k: [[round(t, 2), round(c, 2)] for t, c in v] for k, v in times.items()},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    labels = {"diffusers": "plain diffusers, one LoRA", "mixdiff": "mixdiff run_batch (exact)",
              "mixdiff_inexact": "mixdiff run_batch (exact=False)"}
    print(f"batch: {n} prompts over {len(ROUTES)} route sets, {args.steps} steps, batch size {args.batch_size}, "
          f"{report['threads']} threads, best of {args.repeats} alternating runs, {loads} expert loads per mixdiff run")
    for k, label in labels.items():
        print(f"  {label:<34}: {wall[k]:.2f} images/s, {cpu[k]:.2f} per CPU-s  (wall, cpu s: {report['seconds_wall_cpu'][k]})")
    for k in ("mixdiff", "mixdiff_inexact"):
        print(f"  ratio {labels[k]:<28}: {report['ratio_wall'][k]:.3f} wall, {report['ratio_cpu'][k]:.3f} CPU time "
              f"({report['ratio_cpu_median'][k]:.3f} median)  target >= 0.95")
    return 0


if __name__ == "__main__":
    sys.exit(main())
