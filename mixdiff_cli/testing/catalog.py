"""A ready catalog over the tiny SD model with three random LoRA experts: the stand-in default before the demo
model exists, and a playground. Built through the public catalog API."""

from __future__ import annotations

from pathlib import Path

from mixdiff_cli.testing.loras import make_lora
from mixdiff_cli.testing.pipelines import build_tiny_sd

EXPERTS = {
    "shapes": (["a red circle on a blue background", "a green square", "a yellow triangle shape"], ["shape"]),
    "watercolor": (["a watercolor painting of a river", "soft watercolor sky at sunset"], ["watercolor"]),
    "pixel": (["pixel art castle", "a pixel art robot in a city"], ["pixel"]),
}


def build_tiny_catalog(folder: str | Path, seed: int = 0) -> Path:
    """`folder/experts.yaml` over `folder/base`, written whole or not at all; idempotent."""
    from mixdiff_cli.core.quiet import quiet_frameworks

    folder = Path(folder)
    catalog = folder / "experts.yaml"
    if catalog.is_file():
        return catalog
    with quiet_frameworks():
        return _build(folder, catalog, seed)


def _build(folder: Path, catalog: Path, seed: int) -> Path:
    from mixdiff_cli.experts.manage import add_expert, init_catalog

    base = folder / "base"
    if not (base / "model_index.json").is_file():
        build_tiny_sd(base, seed=seed)
    for i, name in enumerate(EXPERTS):
        make_lora(base, folder / "experts" / f"{name}.safetensors", "diffusers", seed=seed + i + 1, scale=0.05)
    tmp = folder / ".experts.yaml.building"
    tmp.unlink(missing_ok=True)
    init_catalog(tmp, base=str(base))
    for name, (prompts, trigger) in EXPERTS.items():
        add_expert(tmp, str(folder / "experts" / f"{name}.safetensors"), name=name, prompts=prompts, trigger=trigger,
                   description=f"tiny random {name} LoRA (a stand-in, not trained)")
    tmp.rename(catalog)
    return catalog
