"""Start-up: `mixdiff experts list` wall time (target < 0.3 s), beside `import torch, diffusers` for scale."""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = 7


def timed(cmd: list[str]) -> float:
    samples = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cat = Path(tmp) / "experts.yaml"
        cat.write_text("version: 1\nbase: null\nrouter: null\nexperts: []\n")
        mixdiff = str(Path(sys.executable).with_name("mixdiff"))
        listing = timed([mixdiff, "experts", "list", "--catalog", str(cat)])
        helptext = timed([mixdiff, "--help"])
        python = timed([sys.executable, "-c", "pass"])
        heavy = timed([sys.executable, "-c", "import torch, diffusers"])
    print(f"mixdiff experts list : {listing:.3f} s (median of {RUNS}; target < 0.3 s)")
    print(f"mixdiff --help       : {helptext:.3f} s")
    print(f"python -c pass       : {python:.3f} s")
    print(f"import torch,diffusers: {heavy:.3f} s")
    print(f"ratio experts list / import torch+diffusers: {listing / heavy:.3f}")


if __name__ == "__main__":
    main()
