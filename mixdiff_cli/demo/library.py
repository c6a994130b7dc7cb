"""A synthetic LoRA library of any size, for routing quality and catalog speed at scale (tests, benchmarks).

Each file is what kohya's sd-scripts writes, down to the metadata the router reads: `ss_tag_frequency`
({dataset: {tag: count}}), `ss_output_name`, `ss_base_model_version`; some files also carry modelspec
title and description, an A1111 sidecar `NAME.json` (activation text, description) and a preview
`NAME.preview.png`. Tensors are tiny (rank 1 on two SD 1.x cross-attention projections): routing reads
headers and metadata only, and these files are never used to generate.

Every LoRA has a concept: a made-up instance token (its trigger, in every training caption, as kohya
users do it), a subject, a style, a setting and two details, drawn from shared pools so that many
LoRAs share each tag, and generic tags most character LoRAs carry ("1girl", "solo", "masterpiece").
Held-out prompts are built from a LoRA's own tags, never its whole caption: two or three of its
distinctive tags, maybe one of its generic tags, sometimes an unrelated detail, sometimes the trigger token.

    folder = build_library(tmp / "lib", n_experts=500)   # lib/loras/**.safetensors, lib/heldout.jsonl
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixdiff_cli import families

SUBJECTS = (
    "knight samurai witch pirate robot dragon fox wolf cat owl mermaid angel demon vampire elf dwarf wizard "
    "astronaut cowboy ninja princess soldier detective chef dancer monk golem phoenix unicorn kraken sphinx "
    "android cyborg goblin fairy mecha tiger panda rabbit deer whale"
).split()
STYLES = (
    "watercolor oil-painting ink-wash pixel-art cel-shading low-poly ukiyo-e art-nouveau art-deco baroque "
    "impressionism cubism pop-art vaporwave synthwave steampunk cyberpunk gothic chibi claymation charcoal "
    "pastel linocut stained-glass mosaic origami papercut graffiti blueprint noir"
).split()
SETTINGS = (
    "forest desert ocean city-street castle spaceship jungle mountains snowfield swamp library cathedral "
    "market harbor subway rooftop volcano canyon meadow ruins laboratory temple arena garden bazaar"
).split()
DETAILS = (
    "red-hair blue-eyes scarf armor cape glasses hat umbrella lantern sword staff book flowers feathers "
    "tattoo crown mask wings tail horns chains ribbon gloves boots necklace earrings backpack camera guitar "
    "headphones coat kimono hoodie"
).split()
GENERIC = ("1girl", "solo", "masterpiece", "best quality", "highres", "looking at viewer", "simple background")
SYLLABLES = "ka ri mo ze lu ta ven or bi sa no qu el dra fi ga ho ji ki la".split()
# two cross-attention projections of SD 1.x's first transformer block, rank 1: the arch reads as sd1 from shapes
_MODULES = tuple(families.get("sd1").kohya_stem("unet", f"down_blocks.0.attentions.0.transformer_blocks.0.attn2.{p}", {}) for p in ("to_k", "to_v"))
_PNG = bytes.fromhex(  # a 1x1 PNG
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000" "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201b3cd5f4a0000000049454e44ae426082"
)


@dataclass
class Concept:
    """One synthetic LoRA: its file stem (= expert name after import), trigger token and tag counts."""

    stem: str
    token: str
    subject: str
    style: str
    setting: str
    details: tuple[str, str]
    generic: tuple[str, ...]
    images: int

    def tags(self) -> dict[str, int]:
        """kohya's tag counts over the training captions: the token in every one, the rest in fewer."""
        words = lambda t: t.replace("-", " ")  # noqa: E731
        counts = {self.token: self.images}
        for tag, share in ((self.subject, 0.95), (self.style, 0.9), (self.setting, 0.7), (self.details[0], 0.6), (self.details[1], 0.5)):
            counts[words(tag)] = max(1, round(share * self.images))
        for i, tag in enumerate(self.generic):
            counts[tag] = self.images if i == 0 and tag == "1girl" else max(1, round((0.8 - 0.1 * i) * self.images))
        return counts


def _token(rng: random.Random, taken: set[str], syllables: int) -> str:
    while True:
        token = "".join(rng.choice(SYLLABLES) for _ in range(syllables))
        if token not in taken:
            taken.add(token)
            return token


def concepts(n_experts: int, seed: int = 0) -> list[Concept]:
    """`n_experts` distinct concepts (no two share subject, style and setting)."""
    rng = random.Random(seed)
    out, tokens, combos = [], set(), set()
    while len(out) < n_experts:
        subject, style, setting = rng.choice(SUBJECTS), rng.choice(STYLES), rng.choice(SETTINGS)
        if (subject, style, setting) in combos:
            continue
        combos.add((subject, style, setting))
        token = _token(rng, tokens, 3 if n_experts <= 2000 else 4)  # 20^3 = 8,000 tokens
        generic = tuple(rng.sample(GENERIC[:2], rng.randint(0, 2)) + rng.sample(GENERIC[2:], 2))
        details = tuple(rng.sample(DETAILS, 2))
        out.append(Concept(f"{token}-{subject}-{style}", token, subject, style, setting, details, generic, rng.randint(12, 60)))  # type: ignore[arg-type]
    return out


def write_lora(path: Path, concept: Concept, extras: dict[str, str] | None = None) -> Path:
    """A kohya-format LoRA file with `concept`'s metadata and tiny zero tensors."""
    from safetensors.numpy import save_file

    tensors = {}
    for module in _MODULES:
        tensors[f"{module}.lora_down.weight"] = np.zeros((1, 768), dtype=np.float16)
        tensors[f"{module}.lora_up.weight"] = np.zeros((320, 1), dtype=np.float16)
        tensors[f"{module}.alpha"] = np.ones((), dtype=np.float16)
    metadata = {
        "ss_network_module": "networks.lora", "ss_network_dim": "1", "ss_network_alpha": "1.0",
        "ss_base_model_version": "sd_v1", "ss_output_name": concept.stem, "ss_num_train_images": str(concept.images),
        "ss_tag_frequency": json.dumps({f"10_{concept.token}": concept.tags()}), **(extras or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def heldout_prompts(concept: Concept, rng: random.Random, n: int) -> list[str]:
    """`n` prompts built from the concept's tags: two or three of its distinctive ones, maybe one of its
    generic ones, now and then an unrelated detail (noise) or the trigger token."""
    prompts = []
    words = lambda t: t.replace("-", " ")  # noqa: E731
    for _ in range(n):
        distinct = rng.sample([concept.subject, concept.style, concept.setting, *concept.details], rng.randint(2, 3))
        parts = [words(t) for t in distinct] + rng.sample(concept.generic, rng.randint(0, 1))
        if rng.random() < 0.3:
            parts.append(words(rng.choice(DETAILS)))
        if rng.random() < 0.2:
            parts.append(concept.token)
        rng.shuffle(parts)
        prompts.append(", ".join(dict.fromkeys(parts)))
    return prompts


def build_library(folder: str | Path, n_experts: int = 500, seed: int = 0, prompts_per_expert: int = 2) -> Path:
    """Write `n_experts` synthetic kohya LoRAs under `folder`/loras (in 8 subfolders), a tenth with an A1111
    sidecar, a fifth with modelspec title and description, a tenth with a preview; and `folder`/heldout.jsonl
    ({"prompt", "expert"} lines, the expert named after its file). Returns `folder`."""
    folder = Path(folder)
    rng = random.Random(seed + 1)
    lines = []
    for i, c in enumerate(concepts(n_experts, seed)):
        path = folder / "loras" / f"pack-{i % 8}" / f"{c.stem}.safetensors"
        extras = {}
        if i % 5 == 1:
            extras = {"modelspec.title": f"{c.token.title()} {c.subject} ({c.style})", "modelspec.description": f"{c.style} {c.subject}, {c.setting}"}
        write_lora(path, c, extras)
        if i % 10 == 3:
            side = {"activation text": c.token, "description": f"{c.subject} in {c.style.replace('-', ' ')} style", "preferred weight": 0.8}
            path.with_suffix(".json").write_text(json.dumps(side))
        if i % 10 == 7:
            path.with_name(f"{c.stem}.preview.png").write_bytes(_PNG)
        lines += [json.dumps({"prompt": p, "expert": c.stem}) for p in heldout_prompts(c, rng, prompts_per_expert)]
    (folder / "heldout.jsonl").write_text("\n".join(lines) + "\n")
    return folder
