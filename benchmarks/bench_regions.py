"""A canvas of N native-size tiles beside N separate native-size generations of the same prompt and expert,
side by side in one process on the embedded demo (one engine, experts loaded before timing, runs
interleaved so that a busy machine slows both alike).

Target (regions issue): the canvas costs at most 1.1x the N separate generations.
Usage: python benchmarks/bench_regions.py [--runs 3] [--steps 12]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a landscape at daytime with the sun above green grass"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from mixdiff_cli.catalog.discovery import packaged_catalog_path
    from mixdiff_cli.core.quiet import quiet_frameworks
    from mixdiff_cli.sampling.canvas import generate_canvas
    from mixdiff_cli.sampling.engine import Engine
    from mixdiff_cli.sampling.generate import generate_images
    from mixdiff_cli.sampling.options import GenerationOptions
    from mixdiff_cli.sampling.regions import CanvasOptions

    cat = packaged_catalog_path()
    engine = Engine(cat, device="cpu")
    native = 64
    cases = [  # (label, canvas width, tile overlap px, tiles)
        ("4 tiles, no overlap (256x64)", 4 * native, 0, 4),
        ("5 tiles, 16 px overlap (256x64)", 4 * native, 16, 5),
    ]
    opts = GenerationOptions(seed=0, steps=args.steps, experts=("landscapes",))
    with tempfile.TemporaryDirectory() as tmp, quiet_frameworks():
        out = Path(tmp)

        def separate(n: int) -> float:
            start = time.perf_counter()
            for i in range(n):  # N generations, one image each
                generate_images(cat, PROMPT, opts.updated(seed=i), out_dir=out / "plain", engine=engine)
            return time.perf_counter() - start

        def canvas(width: int, overlap: int) -> float:
            start = time.perf_counter()
            generate_canvas(engine, None, [f"0:1,0:1={PROMPT} --expert landscapes"], opts.updated(width=width),
                            CanvasOptions(tile_overlap=overlap), out_dir=out / "canvas")
            return time.perf_counter() - start

        separate(1), canvas(2 * native, 0)  # warm-up: experts loaded, kernels chosen
        for label, width, overlap, n in cases:
            ours, theirs = [], []
            for _ in range(args.runs):
                ours.append(canvas(width, overlap))
                theirs.append(separate(n))
            a, b = statistics.median(ours), statistics.median(theirs)
            print(f"{label}: canvas {a:.2f} s, {n} separate generations {b:.2f} s, ratio {a / b:.3f} "
                  f"(median of {args.runs}, {args.steps} steps; target <= 1.1)")


if __name__ == "__main__":
    main()
