"""Engine benchmarks on the tiny SD 1.x model (CPU, float32), each ratio measured side by side in one run.

    python benchmarks/bench_engine.py [--quick] [--json]

Ratios (targets): top-1 mixdiff / plain diffusers with the same LoRA (<= 1.03); peak RSS with 32
experts in the catalog / with 1 (<= 1.05, separate processes); noise blend k=2 / top-1 (<= 1.6);
merge k=2 / top-1 (<= 1.05); two disjoint timestep bands / top-1 (<= 1.03); a 20% band overlap / the
price predicted from top-1 and noise k=2 on those steps only (~1.0); router decision per prompt, text
encoder excluded (< 1 ms).

Times come from interleaved repetitions (A B A B ...): the median process CPU time (`cpu`; robust when
other jobs share the cores), the median wall time (`wall`), the fastest CPU time (`best`), and `pair`: the
median over repetitions of the ratio of two runs made in the same repetition, seconds apart (bands
right after top-1, top-1 right after plain; on a shared machine whose speed drifts by +-10% between
minutes, the steadiest); one intra-op thread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "a photo of a red cat"
CACHE = Path(os.environ.get("MIXDIFF_BENCH_CACHE", "/tmp/mixdiff-bench"))


def fixtures() -> dict[str, Path]:
    """Tiny SD pipeline, two LoRAs, built once into CACHE."""
    from mixdiff_cli.testing import build_tiny_sd, cached, make_lora

    base = cached(CACHE, "sd", build_tiny_sd)
    loras = cached(CACHE, "loras", lambda d: [make_lora(base, d / f"l{i}.safetensors", seed=i, scale=0.01) for i in range(2)])
    return {"base": base, "l0": loras / "l0.safetensors", "l1": loras / "l1.safetensors"}


def make_catalog(folder: Path, base: Path, lora: Path, n: int) -> Path:
    """A catalog with `n` experts (copies of one LoRA under distinct names)."""
    from mixdiff_cli.experts.manage import add_expert, init_catalog

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    path = folder / "experts.yaml"
    init_catalog(path, base=str(base))
    for i in range(n):
        copy = folder / f"e{i:02d}.safetensors"
        shutil.copyfile(lora, copy)
        add_expert(path, str(copy), name=f"e{i:02d}", prompts=[f"style number {i}"])
    return path


def interleaved(runs: dict[str, Callable[[], object]], reps: int) -> dict[str, dict[str, Any]]:
    """Median CPU and wall seconds, the fastest CPU seconds and every CPU sample (`samples`, one per
    repetition) per call of each function, calls interleaved."""
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    wall: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(reps):
        for name, fn in runs.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return {k: {"cpu": statistics.median(cpu[k]), "wall": statistics.median(wall[k]), "best": min(cpu[k]), "samples": cpu[k]}
            for k in runs}


def bench_speed(fx: dict[str, Path], steps: int, reps: int) -> dict[str, float]:
    import torch

    from mixdiff_cli.sampling.engine import Engine, Request
    from mixdiff_cli.testing import load_pipeline

    torch.set_num_threads(1)
    cat = make_catalog(CACHE / "cat2", fx["base"], fx["l0"], 0)
    from mixdiff_cli.experts.manage import add_expert

    add_expert(cat, str(fx["l0"]), name="l0")
    add_expert(cat, str(fx["l1"]), name="l1")
    engine = Engine(cat)
    plain = load_pipeline(fx["base"])
    plain.load_lora_weights(str(fx["l0"]), adapter_name="l0")
    plain.set_adapters(["l0"])

    def req():
        return [Request(PROMPT, seed=1, steps=steps)]

    runs = {
        "plain": lambda: plain(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(1)).images,
        "top1": lambda: engine.generate(req(), [("l0", 1.0)]),
        # timestep bands: two disjoint halves (each step runs one expert; right after top-1, for `pair`)
        "bands2": lambda: engine.generate(req(), ["l0@:0.5", "l1@0.5:"]),
        "noise2": lambda: engine.generate(req(), [("l0", 0.5), ("l1", 0.5)], blend="noise"),
        "merge2": lambda: engine.generate(req(), [("l0", 0.5), ("l1", 0.5)], blend="merge"),
        "overlap": lambda: engine.generate(req(), ["l0@:0.6", "l1@0.4:"]),  # 20% of the run overlapped
    }
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 32, 32, generator=gen)
    ctx = torch.randn(4, 77, engine.denoiser.config.cross_attention_dim, generator=gen)
    with torch.no_grad():  # plain diffusers' UNet with its one LoRA, at batch 2 (one image + CFG) and 4
        runs["unet_b2"] = lambda: plain.unet(x[:2], 10, ctx[:2])
        runs["unet_b4"] = lambda: plain.unet(x, 10, ctx)
        t = interleaved(runs, reps)
    out = {f"{k}_{m}_s": round(v[m], 4) for k, v in t.items() for m in ("cpu", "wall", "best")}
    pairs = {"top1_over_plain": ("top1", "plain"), "bands2_over_top1": ("bands2", "top1"), "noise2_over_top1": ("noise2", "top1"),
             "merge2_over_top1": ("merge2", "top1"), "unet_batch4_over_batch2": ("unet_b4", "unet_b2")}
    for key, (a, b) in pairs.items():
        out[f"{key}_pair"] = round(statistics.median(x / y for x, y in zip(t[a]["samples"], t[b]["samples"])), 3)
    for m in ("cpu", "wall", "best"):
        out[f"top1_over_plain_{m}"] = round(t["top1"][m] / t["plain"][m], 3)
        out[f"noise2_over_top1_{m}"] = round(t["noise2"][m] / t["top1"][m], 3)
        out[f"merge2_over_top1_{m}"] = round(t["merge2"][m] / t["top1"][m], 3)
        out[f"bands2_over_top1_{m}"] = round(t["bands2"][m] / t["top1"][m], 3)
        # an overlap should cost noise-blend prices on its 20% of the steps only: 0.8 top-1 + 0.2 noise k=2
        out[f"overlap_over_predicted_{m}"] = round(t["overlap"][m] / (0.8 * t["top1"][m] + 0.2 * t["noise2"][m]), 3)
        # the compute floor of a k=2 noise blend: the same UNet on twice the batch (CFG halves x 2)
        out[f"unet_batch4_over_batch2_{m}"] = round(t["unet_b4"][m] / t["unet_b2"][m], 3)
    assert engine.loads == ["l0", "l1"], engine.loads  # adapters loaded once, never per image
    return out


def _rss_child(catalog: str, steps: int) -> None:
    """Subprocess body: one engine, one image with expert e00; print peak RSS (KiB)."""
    import resource

    import torch

    from mixdiff_cli.sampling.engine import Engine, Request

    torch.set_num_threads(1)
    engine = Engine(catalog)
    engine.generate([Request(PROMPT, seed=1, steps=steps)], ["e00"])
    print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "loads": engine.loads}))


def bench_rss(fx: dict[str, Path], steps: int, reps: int) -> dict[str, float]:
    cats = {n: make_catalog(CACHE / f"cat{n}", fx["base"], fx["l0"], n) for n in (1, 32)}
    peaks: dict[int, list[int]] = {1: [], 32: []}
    for _ in range(reps):
        for n, cat in cats.items():
            proc = subprocess.run([sys.executable, __file__, "--rss-child", str(cat), "--steps", str(steps)],
                                  capture_output=True, text=True, check=True)
            data = json.loads(proc.stdout.strip().splitlines()[-1])
            assert data["loads"] == ["e00"], data
            peaks[n].append(data["maxrss_kib"])
    one, many = statistics.median(peaks[1]), statistics.median(peaks[32])
    return {"rss_1_expert_mib": round(one / 1024, 1), "rss_32_experts_mib": round(many / 1024, 1), "rss_32_over_1": round(many / one, 3)}


def bench_router(fx: dict[str, Path], n: int) -> dict[str, float]:
    """Router decision per prompt on precomputed base-encoder vectors (the text encoder excluded)."""
    try:
        from mixdiff_cli.routing.router import load_router
    except ImportError:
        return {}
    from mixdiff_cli.catalog.schema import load_catalog
    from mixdiff_cli.models.text import load_text_encoders, router_vectors

    cat = load_catalog(make_catalog(CACHE / "cat8", fx["base"], fx["l0"], 8))
    text = load_text_encoders(cat, device="cpu")
    router = load_router(cat, pipe=text)
    prompts = [f"style number {i % 8} of a red cat" for i in range(n)]
    vecs = router_vectors(text, prompts)
    for v, p in zip(vecs[:10], prompts):
        router.decide(v, p, top_k=2)
    t0 = time.perf_counter()
    for v, p in zip(vecs, prompts):
        router.decide(v, p, top_k=2)
    per = (time.perf_counter() - t0) / n
    return {"router_decide_ms": round(per * 1000, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repetitions")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 7, --quick 3)")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (8 if args.quick else 20)
    if args.rss_child:
        _rss_child(args.rss_child, steps)
        return
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    fx = fixtures()
    results: dict[str, float] = {"steps": steps}
    results.update(bench_speed(fx, steps, reps=args.reps or (3 if args.quick else 7)))
    results.update(bench_rss(fx, steps, reps=1 if args.quick else 3))
    results.update(bench_router(fx, n=200 if args.quick else 2000))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    targets = {"top1_over_plain_cpu": "<= 1.03", "rss_32_over_1": "<= 1.05", "noise2_over_top1_cpu": "<= 1.6",
               "merge2_over_top1_cpu": "<= 1.05", "bands2_over_top1_pair": "<= 1.03", "router_decide_ms": "< 1"}
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value}" + (f"   (target {targets[key]})" if key in targets else ""))


if __name__ == "__main__":
    main()
