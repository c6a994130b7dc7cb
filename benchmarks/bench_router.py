"""Router decision time per prompt, text encoder excluded (target: under 1 ms).

Times `Router.decide` (one prompt per call: gate, softmax, trigger words, top-k, the Route object) and
`Router.decide_many` (a batch of 64) on gates of realistic sizes: D = 768 (SD 1.x CLIP-L pooled),
1280 (SDXL text_embeds), 4096 (the words encoder); E = 8 and 32 experts each with a trigger word;
linear and one-hidden-layer (256) gates. Vectors are precomputed, so no encoder runs. BLAS runs on
one thread unless OMP_NUM_THREADS/OPENBLAS_NUM_THREADS say otherwise.

    python benchmarks/bench_router.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# One BLAS thread, set before numpy/torch load: these matrix products are tiny, and on a busy machine
# multi-threaded BLAS makes a batch of 64 decisions up to 100x slower (measured; see the report).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")


def make_router(dim: int, experts: int, hidden: int, seed: int = 0):
    import torch

    from mixdiff_cli.routing.encoders import WordsEncoder
    from mixdiff_cli.routing.gate import Gate
    from mixdiff_cli.routing.router import Router

    g = torch.Generator().manual_seed(seed)
    gate = Gate(
        mean=torch.randn(dim, generator=g) * 0.1, weight=torch.randn(experts, dim, generator=g), bias=torch.randn(experts, generator=g) * 0.1,
        scale=20.0,
        w1=torch.randn(hidden, dim, generator=g) / dim**0.5 if hidden else None,
        b1=torch.zeros(hidden) if hidden else None,
        w2=torch.randn(dim, hidden, generator=g) * 0.01 if hidden else None,
    )
    names = [f"expert-{i}" for i in range(experts)]
    return Router(names, gate, WordsEncoder(), kind="trained", triggers={n: [f"trig{i}"] for i, n in enumerate(names)})


def per_prompt_us(fn, n_prompts: int, repeats: int) -> tuple[float, float]:
    """(best, median) over `repeats` runs of the time per prompt, in microseconds. The best run is the
    cost itself (timeit's advice); the median shows what a busy machine adds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) / n_prompts * 1e6)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer configurations and repeats")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    configs = [(768, 8, 0), (768, 32, 0), (1280, 32, 256), (4096, 32, 0)]
    if args.quick:
        configs = configs[:2]
    repeats = 5 if args.quick else 15
    prompts = [f"a photo of subject {i} in some style" for i in range(64)]
    worst = worst_median = 0.0
    print("us per prompt, best / median of runs of 64 prompts")
    print(f"{'D':>5} {'E':>3} {'hidden':>6} {'top-k':>5}  {'decide':>15}  {'decide_many(64)':>15}")
    for dim, experts, hidden in configs:
        router = make_router(dim, experts, hidden)
        vecs = torch.randn(len(prompts), dim, generator=torch.Generator().manual_seed(1))
        for k in (1, 2):
            router.decide(vecs[0], prompts[0], top_k=k)  # warm-up
            single = per_prompt_us(lambda: [router.decide(v, p, top_k=k) for v, p in zip(vecs, prompts)], len(prompts), repeats)
            batched = per_prompt_us(lambda: router.decide_many(vecs, prompts, top_k=k), len(prompts), repeats)
            worst, worst_median = max(worst, single[0]), max(worst_median, single[1])
            print(f"{dim:>5} {experts:>3} {hidden:>6} {k:>5}  {single[0]:>6.1f} / {single[1]:>6.1f}  {batched[0]:>6.1f} / {batched[1]:>6.1f}")
    verdict = "OK" if worst < 1000 else "OVER"
    print(f"router decision per prompt (text encoder excluded, one decide call): worst configuration {worst / 1000:.3f} ms "
          f"(median {worst_median / 1000:.3f} ms), target < 1 ms: {verdict}")


if __name__ == "__main__":
    main()
