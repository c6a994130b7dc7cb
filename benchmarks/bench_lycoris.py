"""What a LyCORIS LoHa costs against a plain LoRA of the same effective rank, at real SD 1.5 geometry
(random weights, float16 files, built once into $MIXDIFF_SCALE_CACHE), side by side in one run.

    python benchmarks/bench_lycoris.py [--reps 3] [--steps 2] [--reduced] [--json]

A LoHa of dimension 16 x 16 on every Transformer2DModel layer is rewritten at load into an exact LoRA of
rank 256 (`catalog.lycoris`); the plain LoRA is a kohya file of rank 256 on the same layers. Printed:
the expert load (LRU miss: read, rewrite, attach) of each and their ratio, and top-1 per denoiser call
(the engine fuses a lone LoRA into the weights for the run either way) and its ratio. Medians of
interleaved repetitions, process CPU time, one BLAS thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

from bench_scale import CACHE, TRANSFORMER, build_lora, build_pipeline  # noqa: E402

DIM = 16  # LoHa dimension: effective rank 16 x 16 = 256


def build_loha(base: Path, out: Path, dim: int = DIM, seed: int = 0) -> Path:
    """A random float16 LoHa for every TRANSFORMER layer of `base`'s UNet, kohya-named, made on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    config = UNet2DConditionModel.load_config(base / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in TRANSFORMER) or not hasattr(module, "weight"):
            continue
        fout, flat = module.weight.shape[0], module.weight[0].numel()
        stem = "lora_unet_" + name.replace(".", "_")
        for side in ("1", "2"):
            state[f"{stem}.hada_w{side}_a"] = (torch.randn(fout, dim, generator=gen) * 0.05).half()
            state[f"{stem}.hada_w{side}_b"] = (torch.randn(dim, flat, generator=gen) / flat**0.5).half()
        state[f"{stem}.alpha"] = torch.tensor(float(dim)).half()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, out, metadata={"ss_network_module": "lycoris.kohya", "ss_network_dim": str(dim)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--reduced", action="store_true", help="channels and depth cut ~10x (a quick check of the script)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from mixdiff_cli.core.quiet import quiet_frameworks
    from mixdiff_cli.experts.manage import add_expert, init_catalog
    from mixdiff_cli.sampling.engine import Engine, Request
    from mixdiff_cli.testing import cached

    torch.set_num_threads(1)
    root = CACHE / f"lycoris-sd15{'-reduced' if args.reduced else ''}"
    with quiet_frameworks():
        base = cached(CACHE / f"sd15{'-reduced' if args.reduced else ''}", "base", lambda d: build_pipeline(d, "sd15", args.reduced))
        files = cached(root, "files", lambda d: [build_loha(base, d / "loha.safetensors"),
                                                 build_lora(base, d / "lora256.safetensors", "kohya", DIM * DIM, seed=1)])

        def catalog(d: Path) -> None:
            init_catalog(d / "experts.yaml", base=str(base))
            for name in ("loha", "lora256"):
                add_expert(d / "experts.yaml", str(files / f"{name}.safetensors"), name=name, prompts=[f"a {name} picture"])

        engine = Engine(cached(root, "catalog", catalog) / "experts.yaml", device="cpu")
        names = ("loha", "lora256")
        load: dict[str, list[float]] = {n: [] for n in names}
        call: dict[str, list[float]] = {n: [] for n in names}
        for rep in range(args.reps + 1):  # the first round warms up
            for name in names:
                for other in engine.loaded:
                    engine.evict(other)
                c0 = time.process_time()
                engine.ensure_loaded([name])
                t_load = time.process_time() - c0
                c0 = time.process_time()
                engine.generate([Request("a photo of a red cat", seed=1, steps=args.steps, width=64, height=64)], [name], output_type="np")
                t_call = (time.process_time() - c0) / args.steps
                if rep:
                    load[name].append(t_load)
                    call[name].append(t_call)
    med = lambda d: {k: round(statistics.median(v), 4) for k, v in d.items()}  # noqa: E731
    result = {
        "geometry": "sd15-reduced" if args.reduced else "sd15", "loha_dim": DIM, "lora_rank": DIM * DIM, "reps": args.reps,
        "file_mib": {n: round((files / f"{n}.safetensors").stat().st_size / 2**20, 1) for n in names},
        "load_s": med(load), "per_step_s": med(call),
    }
    result["load_ratio"] = round(result["load_s"]["loha"] / result["load_s"]["lora256"], 3)
    result["per_step_ratio"] = round(result["per_step_s"]["loha"] / result["per_step_s"]["lora256"], 3)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['geometry']}: LoHa {DIM}x{DIM} ({result['file_mib']['loha']} MiB) vs kohya LoRA rank {DIM * DIM} "
          f"({result['file_mib']['lora256']} MiB), {args.reps} reps")
    print(f"  load (LRU miss)         LoHa {result['load_s']['loha']:.3f} s, LoRA {result['load_s']['lora256']:.3f} s: ratio {result['load_ratio']}")
    print(f"  top-1 per step (64 px)  LoHa {result['per_step_s']['loha']:.3f} s, LoRA {result['per_step_s']['lora256']:.3f} s: ratio {result['per_step_ratio']}")


if __name__ == "__main__":
    main()
