"""What training reads, computed once per image: VAE latents, token ids and (for a frozen text
encoder) caption embeddings, encoded the way diffusers' training scripts do it.

Every random draw is a pure function of (seed, what, index) (`generator`), so a resumed run or another
process draws the same numbers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from mixdiff_cli.training.dataset import Crop, Record, load_image, to_tensor, with_trigger

if TYPE_CHECKING:
    import torch

    from mixdiff_cli.families.base import Family


def derive(seed: int, *salt: object) -> int:
    """A 63-bit seed from (seed, salt): independent streams for every purpose and index."""
    digest = hashlib.blake2b(repr((seed, *salt)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(seed: int, *salt: object) -> torch.Generator:
    """A CPU generator seeded with `derive(seed, *salt)`."""
    import torch

    return torch.Generator().manual_seed(derive(seed, *salt))


def device_of(module: Any) -> torch.device:
    return next(module.parameters()).device


class CaptionEncoder:
    """Caption encoding the way diffusers' training scripts do it, for the pipeline's family
    (`Family.caption_encode`: e.g. SD's last hidden state)."""

    def __init__(self, pipe: Any, family: Family):
        self.family = family
        self.tokenizers, self.encoders = family.caption_modules(pipe)

    def tokenize(self, captions: Sequence[str]) -> list[torch.Tensor]:
        return [
            tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            for tok in self.tokenizers
        ]

    def encode(self, ids: list[torch.Tensor], encoders: Sequence[Any] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids per tokenizer -> (hidden (B, T, D), pooled (B, P) or None)."""
        return self.family.caption_encode(encoders or self.encoders, ids)

    def cond(self, hidden: torch.Tensor, pooled: torch.Tensor | None, micro: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The denoiser conditioning of a batch (`Family.train_cond`)."""
        return self.family.train_cond(hidden, pooled, micro)


@dataclass(frozen=True)
class CacheSpec:
    """How `build_cache` prepares images and captions. The defaults are the held-out set's: center crops,
    posterior means, no flips, token ids only (the text is encoded per model)."""

    trigger: tuple[str, ...] = ()
    crop: Crop = "center"
    latents: Literal["mean", "sample"] = "mean"
    random_flip: bool = False
    cache_text: bool = False  # also encode the captions once (the text encoder stays frozen)


@dataclass
class Cache:
    """Per-image tensors computed once (N images). Flipped variants only with random_flip."""

    latents: torch.Tensor | None  # (N, C, h, w), None when random crops are encoded per step
    latents_flipped: torch.Tensor | None
    hidden: torch.Tensor | None  # (N, T, D), None when the text encoder trains
    pooled: torch.Tensor | None  # (N, P) pooled caption embeddings, where the family has them
    ids: list[torch.Tensor]  # token ids per tokenizer, (N, T)
    micro: torch.Tensor | None  # (N, K) the family's micro-conditioning of the center crops (`Family.micro_cond`)
    micro_flipped: torch.Tensor | None
    images: list[Any]  # resized (not cropped) PIL images, for random crops
    sizes: list[tuple[int, int]]  # original (h, w)


def encode_images(vae: Any, pixels: torch.Tensor, mode: str, gen: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f)."""
    import torch

    with torch.no_grad():
        dist = vae.encode(pixels.to(device_of(vae), dtype=vae.dtype)).latent_dist
        z = dist.mean if mode == "mean" else dist.sample(gen)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((z - shift) * vae.config.scaling_factor).float()


def center_micro(family: Family, sizes: Sequence[tuple[int, int]], resolution: int, device: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The family's micro-conditioning (N, K) of center crops of images of original (h, w) `sizes`,
    unflipped and flipped; (None, None) where the family has none."""
    import torch

    rows, flipped = [], []
    for (h, w) in sizes:
        scale = resolution / min(h, w)
        rh, rw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
        top, left = round((rh - resolution) / 2), round((rw - resolution) / 2)
        rows.append(family.micro_cond((h, w), top, left, resolution))
        flipped.append(family.micro_cond((h, w), top, rw - left - resolution, resolution))
    if not rows or rows[0] is None:
        return None, None
    return torch.tensor(rows, dtype=torch.float32, device=device), torch.tensor(flipped, dtype=torch.float32, device=device)


def build_cache(
    pipe: Any, text: CaptionEncoder, records: Sequence[Record], spec: CacheSpec, resolution: int, seed: int, device: Any, chunk: int = 8
) -> Cache:
    """Latents, token ids, micro-conditioning and (spec.cache_text) caption embeddings of `records`, on `device`."""
    import torch
    from PIL import Image

    captions = [with_trigger(r.caption, spec.trigger) for r in records]
    ids = text.tokenize(captions)
    sizes, resized = [], []
    for rec in records:
        with Image.open(rec.path) as im:
            sizes.append((im.height, im.width))
    cache = Cache(None, None, None, None, ids, None, None, [], sizes)
    if spec.crop == "center":
        lat, lat_f = [], []
        for i in range(0, len(records), chunk):
            part = records[i : i + chunk]
            gen = generator(seed, "latents", i) if spec.latents == "sample" else None
            lat.append(encode_images(pipe.vae, to_tensor([load_image(r.path, resolution) for r in part]), spec.latents, gen))
            if spec.random_flip:
                imgs = [load_image(r.path, resolution, flip=True) for r in part]
                lat_f.append(encode_images(pipe.vae, to_tensor(imgs), spec.latents, gen))
        cache.latents = torch.cat(lat).to(device)
        cache.latents_flipped = torch.cat(lat_f).to(device) if lat_f else None
    else:
        for rec in records:
            with Image.open(rec.path) as im:
                im = im.convert("RGB")
                scale = resolution / min(im.size)
                resized.append(im.resize((max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))), Image.Resampling.BICUBIC))
        cache.images = resized
    cache.micro, cache.micro_flipped = center_micro(text.family, sizes, resolution, device)
    if spec.cache_text:
        hid, pooled = [], []
        with torch.no_grad():
            for i in range(0, len(records), 32):
                h, p = text.encode([t[i : i + 32] for t in ids])
                hid.append(h.float())
                if p is not None:
                    pooled.append(p.float())
        cache.hidden = torch.cat(hid).to(device)
        cache.pooled = torch.cat(pooled).to(device) if pooled else None
    return cache
