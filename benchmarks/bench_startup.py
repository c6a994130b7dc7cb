"""Start-up: `mixdiff experts list` wall time (target < 0.3 s), beside `import torch, diffusers` for scale."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from _timing import timed  # benchmarks/ is on sys.path when a benchmark runs as a script

RUNS = 7


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cat = Path(tmp) / "experts.yaml"
        cat.write_text("version: 1\nbase: null\nrouter: null\nexperts: []\n")
        mixdiff = str(Path(sys.executable).with_name("mixdiff"))
        listing = timed([mixdiff, "experts", "list", "--catalog", str(cat)], RUNS)
        helptext = timed([mixdiff, "--help"], RUNS)
        python = timed([sys.executable, "-c", "pass"], RUNS)
        heavy = timed([sys.executable, "-c", "import torch, diffusers"], RUNS)
    print(f"mixdiff experts list : {listing:.3f} s (median of {RUNS}; target < 0.3 s)")
    print(f"mixdiff --help       : {helptext:.3f} s")
    print(f"python -c pass       : {python:.3f} s")
    print(f"import torch,diffusers: {heavy:.3f} s")
    print(f"ratio experts list / import torch+diffusers: {listing / heavy:.3f}")


if __name__ == "__main__":
    main()
