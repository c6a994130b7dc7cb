"""Catalog commands at library scale: 10, 1,000 and 10,000 experts, each command a fresh process (issue 12).

Builds a synthetic kohya LoRA library once (`mixdiff_cli.demo.library`: real safetensors headers and
metadata, tiny tensors) in $MIXDIFF_BENCH_CACHE (default /tmp/mixdiff-bench-catalog), imports the first
N files into one catalog per size with `mixdiff add-expert FOLDER`, and warms each catalog's index and
prototype cache (untimed). Then times, interleaved across sizes (10, 1000, 10000, 10, ...):

    experts list --json    the whole catalog as JSON
    experts show NAME      one entry
    add-expert FILE        one new LoRA into the catalog (removed again, untimed, after each run)
    route PROMPT           words encoder (no model: nothing to exclude), warm prototype cache

and, in a fresh process per size, the route itself: loading the catalog and its router and one
decision, the prompt's encoding excluded ("route core"). Prints the best and median wall seconds, the
median CPU seconds, and the ratios 10,000 / 10 experts per command (target: at most 2x; judged on the
medians, which a busy machine moves less than the best runs).

    python benchmarks/bench_catalog.py [--sizes 10,1000,10000] [--runs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from _timing import timed  # benchmarks/ is on sys.path when a benchmark runs as a script

CACHE = Path(os.environ.get("MIXDIFF_BENCH_CACHE", "/tmp/mixdiff-bench-catalog"))
VERSION = "1"  # bump to rebuild the cached library and catalogs
PROMPT = "wolf, steampunk, cathedral"
MIXDIFF = str(Path(sys.executable).with_name("mixdiff"))
CORE = """
import sys, time
import numpy as np
from mixdiff_cli.catalog.schema import load_catalog
from mixdiff_cli.routing.encoders import WordsEncoder
vec = WordsEncoder()([sys.argv[2]])[0]          # the prompt's encoding, outside the timing
t = time.perf_counter()
from mixdiff_cli.routing.router import load_router
router = load_router(load_catalog(sys.argv[1]), "words")
route = router.decide(vec, sys.argv[2])
print(time.perf_counter() - t, route.chosen[0][0])
"""


def _env() -> dict[str, str]:
    # the catalog index lives in the user's data folder: the benchmark's own; one BLAS thread as bench_router
    return {**os.environ, "MIXDIFF_HOME": str(CACHE / "home"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _mixdiff(*args: str) -> str:
    done = subprocess.run([MIXDIFF, *args], check=True, capture_output=True, text=True, env=_env())
    return done.stdout


def build(sizes: list[int]) -> dict[int, Path]:
    """One synthetic library and one warm catalog per size, built once into CACHE."""
    from mixdiff_cli.demo.library import build_library, concepts, write_lora

    root = CACHE / f"v{VERSION}"
    extra = root / "extra" / "bench-extra-lora.safetensors"
    if not extra.is_file():
        write_lora(extra, concepts(1, seed=7)[0])
    catalogs = {}
    for n in sizes:
        library, cat = root / f"library-{n}", root / f"catalog-{n}" / "experts.yaml"
        if not cat.is_file():
            print(f"building a synthetic library of {n:,} LoRAs and importing it into {cat} ...", flush=True)
            for folder in (library, cat.parent):
                shutil.rmtree(folder, ignore_errors=True)
            build_library(library, n, prompts_per_expert=1)
            _mixdiff("init", "--catalog", str(cat))
            _mixdiff("add-expert", str(library / "loras"), "--catalog", str(cat))  # the whole folder, one write
        _mixdiff("experts", "list", "--json", "--catalog", str(cat))  # warm: the index
        _mixdiff("route", PROMPT, "--encoder", "words", "--catalog", str(cat))  # warm: the prototype cache
        catalogs[n] = cat
    return catalogs


def _cpu() -> float:
    """User + system CPU seconds of this process's finished children (less sensitive to a busy machine than wall time)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def commands(cat: Path, name: str, extra: Path) -> dict[str, list[str]]:
    return {
        "experts list --json": [MIXDIFF, "experts", "list", "--json", "--catalog", str(cat)],
        "experts show": [MIXDIFF, "experts", "show", name, "--catalog", str(cat)],
        "add-expert (one file)": [MIXDIFF, "add-expert", str(extra), "--name", "bench-extra", "--catalog", str(cat)],
        "route (warm prototypes)": [MIXDIFF, "route", PROMPT, "--encoder", "words", "--catalog", str(cat)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,1000,10000", help="catalog sizes, comma-separated")
    parser.add_argument("--runs", type=int, default=5, help="runs per command and size (interleaved)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    catalogs = build(sizes)
    extra = CACHE / f"v{VERSION}" / "extra" / "bench-extra-lora.safetensors"
    names = {n: json.loads(_mixdiff("experts", "list", "--json", "--catalog", str(cat)))[n // 2]["name"] for n, cat in catalogs.items()}
    samples: dict[str, dict[int, list[float]]] = {}
    cpu: dict[str, dict[int, list[float]]] = {}  # user + system seconds of the same runs
    old_env = dict(os.environ)
    os.environ.update(_env())  # timed() runs children with this process's environment
    try:
        for _ in range(args.runs):
            for n, cat in catalogs.items():
                for what, cmd in commands(cat, names[n], extra).items():
                    before = _cpu()
                    samples.setdefault(what, {}).setdefault(n, []).append(timed(cmd, 1))
                    cpu.setdefault(what, {}).setdefault(n, []).append(_cpu() - before)
                    if what.startswith("add-expert"):
                        _mixdiff("experts", "remove", "bench-extra", "--catalog", str(cat))
                out = subprocess.run([sys.executable, "-c", CORE, str(cat), PROMPT], check=True, capture_output=True, text=True)
                samples.setdefault("route core (in process, encoder excluded)", {}).setdefault(n, []).append(float(out.stdout.split()[0]))
    finally:
        os.environ.clear()
        os.environ.update(old_env)
    small, big = sizes[0], sizes[-1]
    print(f"\nseconds per command: wall best / median of {args.runs} fresh processes (interleaved across sizes), then CPU median")
    print(f"{'command':<42}" + "".join(f"{n:>22,}" for n in sizes) + f"{f'{big:,} / {small:,}':>26}")
    report = {}
    worst = 0.0
    for what, by_size in samples.items():
        best = {n: min(v) for n, v in by_size.items()}
        median = {n: statistics.median(v) for n, v in by_size.items()}
        used = {n: statistics.median(v) for n, v in cpu.get(what, {}).items()}
        ratio = best[big] / best[small]
        worst = max(worst, median[big] / median[small]) if not what.startswith("route core") else worst
        report[what] = {"best": best, "median": median, "cpu": used, "ratio_best": ratio, "ratio_median": median[big] / median[small],
                        "ratio_cpu": used[big] / used[small] if used else None}
        cells = "".join(f"{best[n]:>8.3f} /{median[n]:>6.3f} /{used[n]:>6.3f}" if used else f"{best[n]:>8.3f} /{median[n]:>6.3f}        " for n in sizes)
        cpu_ratio = f", cpu {used[big] / used[small]:.2f}x" if used else ""
        print(f"{what:<42}{cells}   {ratio:>5.2f}x (median {median[big] / median[small]:.2f}x{cpu_ratio})")
    print(f"worst command ratio {big:,} / {small:,} experts (medians): {worst:.2f}x, target <= 2x: {'OK' if worst <= 2 else 'OVER'}")
    if args.json:
        args.json.write_text(json.dumps({"sizes": sizes, "runs": args.runs, "commands": report}, indent=2))


if __name__ == "__main__":
    main()
