"""No near-zero experts: `generate -k 2` on a prompt whose second expert is under the floor costs what
top-1 costs, measured side by side on the embedded demo (CPU, one warm engine, interleaved runs).

    python benchmarks/bench_floor.py [--reps 5] [--steps 12] [--json]

Prints three medians of process CPU time per image and two ratios: k=2 routed / top-1 (target ~1.0:
the floor leaves the second expert out, so no forward runs for it) and, for scale, a real two-expert
noise blend (both members pinned at 0.5) / top-1. Also checks that the k=2 image equals top-1's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "a red circle on a white background"  # shapes p ~ 1.0, the next expert far under the floor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from mixdiff_cli.catalog.discovery import packaged_catalog_path
    from mixdiff_cli.catalog.schema import load_catalog
    from mixdiff_cli.routing.router import FLOOR, load_router
    from mixdiff_cli.sampling.engine import Engine
    from mixdiff_cli.sampling.generate import generate_images
    from mixdiff_cli.sampling.options import GenerationOptions

    torch.set_num_threads(1)
    cat = load_catalog(packaged_catalog_path())
    route = load_router(cat).route([PROMPT], top_k=2, abstain=False)[0]
    probs = sorted(route.probs.values(), reverse=True)
    base = GenerationOptions(seed=1, steps=args.steps)
    engine = Engine.from_options(cat, base)
    runs = {
        "top1": base.updated(top_k=1),
        "k2_routed": base.updated(top_k=2),
        "k2_pinned": base.updated(experts=("shapes:0.5", "stripes:0.5")),  # a blend the floor keeps: two forwards
    }
    out = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    images: dict[str, Path] = {}
    for rep in range(args.reps + 1):  # the first round warms up
        for name, opts in runs.items():
            c0 = time.process_time()
            made = generate_images(cat, PROMPT, opts, out_dir=out / name, engine=engine)
            if rep:
                cpu[name].append(time.process_time() - c0)
            images[name] = made.paths[0]
    med = {k: statistics.median(v) for k, v in cpu.items()}
    same = bool(np.array_equal(np.asarray(Image.open(images["top1"])), np.asarray(Image.open(images["k2_routed"]))))
    result = {
        "prompt": PROMPT, "steps": args.steps, "reps": args.reps, "floor": FLOOR,
        "second_over_top": probs[1] / probs[0], "k2_chosen": [n for n, _ in route.chosen],
        "cpu_s": med, "ratio_k2_routed_over_top1": med["k2_routed"] / med["top1"],
        "ratio_k2_pinned_over_top1": med["k2_pinned"] / med["top1"], "k2_image_equals_top1": same,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{PROMPT!r}: second expert at {result['second_over_top']:.2e} of the top (floor {FLOOR}); k=2 chooses {result['k2_chosen']}")
    for k, v in med.items():
        print(f"  {k:10s} {v:.3f} s CPU per image (median of {args.reps})")
    print(f"  k=2 routed / top-1: {result['ratio_k2_routed_over_top1']:.3f} (target ~1.0); image equal to top-1's: {same}")
    print(f"  two pinned experts (noise blend) / top-1: {result['ratio_k2_pinned_over_top1']:.3f} (what the floor saves)")


if __name__ == "__main__":
    main()
