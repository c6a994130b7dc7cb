"""`mixdiff generate PROMPT` on the embedded demo at the default settings, as a user runs it (a fresh
process each time: imports, model load, routing, 30 DDIM steps, PNG write), beside the same image made
by a plain diffusers script (from_pretrained + load_lora_weights of the routed expert, the catalog's guidance) in a fresh process.

Target (demo issue): at most 10 s per image on this machine's CPU.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from _timing import timed  # benchmarks/ is on sys.path when a benchmark runs as a script

ROOT = Path(__file__).resolve().parents[1]
RUNS = 3
PROMPT = "a landscape at daytime with the sun above green grass"  # what `make demo` renders

PLAIN = """
import sys, torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float32, local_files_only=True)
pipe.set_progress_bar_config(disable=True)
pipe.load_lora_weights(sys.argv[2], adapter_name="expert")
image = pipe(sys.argv[3], num_inference_steps=30, guidance_scale=float(sys.argv[5]), generator=torch.Generator().manual_seed(0)).images[0]
image.save(sys.argv[4])
"""


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from mixdiff_cli.catalog.discovery import packaged_catalog_path
    from mixdiff_cli.catalog.schema import load_catalog

    cat_path = packaged_catalog_path()
    cat = load_catalog(cat_path)
    mixdiff = str(Path(sys.executable).with_name("mixdiff"))
    with tempfile.TemporaryDirectory() as tmp:
        ours = timed([mixdiff, "--quiet", "generate", PROMPT, "--catalog", str(cat_path), "--seed", "0", "--out", tmp], RUNS)
        plain = timed([sys.executable, "-c", PLAIN, str(cat.resolve(cat.base.source)),
                       str(cat.resolve(cat.expert("landscapes").source)), PROMPT, str(Path(tmp) / "plain.png"),
                       str(cat.base.guidance or 7.5)], RUNS)
    print(f"mixdiff generate (demo, defaults, fresh process): {ours:.2f} s per image (median of {RUNS}; target <= 10 s)")
    print(f"plain diffusers script, same model and expert  : {plain:.2f} s per image")
    print(f"ratio mixdiff / plain diffusers: {ours / plain:.3f}")


if __name__ == "__main__":
    main()
