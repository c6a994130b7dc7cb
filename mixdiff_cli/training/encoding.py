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
    """Prompt encoding the way diffusers' training scripts do it (SD: last hidden state; SDXL: the
    penultimate hidden states of both encoders concatenated, plus the second encoder's pooled output)."""

    def __init__(self, pipe: Any, family: str):
        self.family = family
        if family == "sd":
            self.tokenizers, self.encoders = [pipe.tokenizer], [pipe.text_encoder]
        else:
            self.tokenizers, self.encoders = _sdxl_text_modules(pipe)

    def tokenize(self, captions: Sequence[str]) -> list[torch.Tensor]:
        return [
            tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            for tok in self.tokenizers
        ]

    def encode(self, ids: list[torch.Tensor], encoders: Sequence[Any] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids per tokenizer -> (hidden (B, T, D), pooled (B, P) or None)."""
        encoders = encoders or self.encoders
        if self.family == "sd":
            enc = encoders[0]
            return enc(ids[0].to(device_of(enc)), return_dict=False)[0], None
        return _sdxl_encode(encoders, ids)


def _sdxl_text_modules(pipe: Any) -> tuple[list[Any], list[Any]]:
    """SDXL's two (tokenizer, text encoder) pairs: ([tokenizer, tokenizer_2], [text_encoder, text_encoder_2])."""
    return [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]


def _sdxl_encode(encoders: Sequence[Any], ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL: penultimate hidden states of both encoders concatenated (B, T, D1 + D2), the second's pooled (B, P)."""
    import torch

    hidden, pooled = [], None
    for enc, tok_ids in zip(encoders, ids):
        out = enc(tok_ids.to(device_of(enc)), output_hidden_states=True, return_dict=False)
        pooled = out[0]  # CLIPTextModelWithProjection: text_embeds (B, P); the last one wins
        hidden.append(out[-1][-2])  # (B, T, D_i)
    return torch.cat(hidden, dim=-1), pooled


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
    pooled: torch.Tensor | None  # (N, P) SDXL
    ids: list[torch.Tensor]  # token ids per tokenizer, (N, T)
    time_ids: torch.Tensor | None  # (N, 6) SDXL: original size, crop top-left, target size
    time_ids_flipped: torch.Tensor | None
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


def time_ids(size: tuple[int, int], top: int, left: int, resolution: int) -> list[float]:
    """SDXL's micro-conditioning: original size, crop top-left, target size."""
    return [size[0], size[1], top, left, resolution, resolution]


def sdxl_center_time_ids(sizes: Sequence[tuple[int, int]], resolution: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL time ids (N, 6) of center crops of images of original (h, w) `sizes`, unflipped and flipped."""
    import torch

    tids, tids_f = [], []
    for (h, w) in sizes:
        scale = resolution / min(h, w)
        rh, rw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
        top, left = round((rh - resolution) / 2), round((rw - resolution) / 2)
        tids.append(time_ids((h, w), top, left, resolution))
        tids_f.append(time_ids((h, w), top, rw - left - resolution, resolution))
    return torch.tensor(tids, dtype=torch.float32, device=device), torch.tensor(tids_f, dtype=torch.float32, device=device)


def build_cache(
    pipe: Any, text: CaptionEncoder, records: Sequence[Record], spec: CacheSpec, resolution: int, seed: int, device: Any, chunk: int = 8
) -> Cache:
    """Latents, token ids, SDXL time ids and (spec.cache_text) caption embeddings of `records`, on `device`."""
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
    if text.family == "sdxl":
        cache.time_ids, cache.time_ids_flipped = sdxl_center_time_ids(sizes, resolution, device)
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
