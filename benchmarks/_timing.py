"""Wall time of whole commands, for the benchmarks that time what a user waits for."""

from __future__ import annotations

import statistics
import subprocess
import time


def timed(cmd: list[str], runs: int) -> float:
    """Median wall seconds of `runs` runs of `cmd` (each a fresh process; a failure raises)."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)
