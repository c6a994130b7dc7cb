"""The training data stream: which images, noise, timesteps, flips, crops and dropped captions each micro-batch holds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mixdiff_cli.training.config import FineTuneConfig
from mixdiff_cli.training.dataset import to_tensor
from mixdiff_cli.training.encoding import Cache, encode_images, generator

if TYPE_CHECKING:
    import torch

    from mixdiff_cli.families.base import Family


@dataclass
class Batch:
    latents: "torch.Tensor"  # (B, C, h, w)
    noise: "torch.Tensor"
    timesteps: "torch.Tensor"  # (B,) int64
    hidden: "torch.Tensor | None"  # (B, T, D) when cached
    pooled: "torch.Tensor | None"
    micro: "torch.Tensor | None"  # (B, K) the family's micro-conditioning
    ids: list["torch.Tensor"]  # token ids when the text encoder trains
    drop: "torch.Tensor | None" = None  # (B,) bool: captions replaced by "" (caption dropout)


@dataclass(frozen=True)
class Draws:
    """What every random draw of a run depends on, the same on every process."""

    seed: int
    n: int  # training images
    num_train_timesteps: int
    global_batch: int  # images per micro-batch over all processes


class Stream:
    """The infinite training stream: sample position p -> image perm_{p // N}[p % N]; micro-batch k holds
    positions [k*G, (k+1)*G) for a global batch G, and each process takes its slice of them."""

    def __init__(self, cache: Cache, cfg: FineTuneConfig, draws: Draws, rank: int, device: Any, vae: Any, resolution: int,
                 family: Family):
        self.cache, self.cfg, self.family = cache, cfg, family
        self.n, self.seed, self.T, self.G = draws.n, draws.seed, draws.num_train_timesteps, draws.global_batch
        self.rank, self.device, self.vae, self.resolution = rank, device, vae, resolution
        self._perms: dict[int, "torch.Tensor"] = {}

    def perm(self, epoch: int) -> "torch.Tensor":
        import torch

        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(self.n, generator=generator(self.seed, "epoch", epoch))
        return self._perms[epoch]

    def indices(self, k: int) -> list[int]:
        start = k * self.G
        return [int(self.perm(p // self.n)[p % self.n]) for p in range(start, start + self.G)]

    def batch(self, k: int, latent_shape: tuple[int, ...]) -> Batch:
        import torch

        cfg, G = self.cfg, self.G
        gen = generator(self.seed, "batch", k)
        noise = torch.randn((G, *latent_shape), generator=gen)  # (G, C, h, w)
        timesteps = torch.randint(0, self.T, (G,), generator=gen)
        if cfg.noise_offset:
            # https://www.crosslabs.org//blog/diffusion-with-offset-noise
            noise += cfg.noise_offset * torch.randn((G, latent_shape[0], 1, 1), generator=gen)
        flip = torch.rand(G, generator=gen) < 0.5 if cfg.random_flip else torch.zeros(G, dtype=torch.bool)
        crop_u = torch.rand((G, 2), generator=gen) if cfg.crop == "random" else None
        drop = torch.rand(G, generator=gen) < cfg.caption_dropout if cfg.caption_dropout else None  # drawn last: p = 0 changes nothing
        local = slice(self.rank * cfg.batch_size, (self.rank + 1) * cfg.batch_size)
        idx_list = self.indices(k)[local]
        idx = torch.tensor(idx_list, device=self.device)
        flip_l = flip[local].to(self.device)
        c = self.cache
        if c.latents is not None:
            latents = c.latents.index_select(0, idx)
            if c.latents_flipped is not None:
                latents = torch.where(flip_l[:, None, None, None], c.latents_flipped.index_select(0, idx), latents)
            micro = None if c.micro is None else _cached_micro(c, idx, flip_l)
        else:
            latents, boxes = self._random_crops(idx_list, flip[local].tolist(), crop_u[local])
            micro = None if c.micro is None else self._crop_micro(idx_list, boxes)
        return Batch(
            latents=latents,
            noise=noise[local].to(self.device),
            timesteps=timesteps[local].to(self.device),
            hidden=None if c.hidden is None else c.hidden.index_select(0, idx),
            pooled=None if c.pooled is None else c.pooled.index_select(0, idx),
            micro=micro,
            ids=[t.index_select(0, idx.cpu()) for t in c.ids] if c.hidden is None else [],
            drop=None if drop is None else drop[local].to(self.device),
        )

    def _random_crops(self, idx: list[int], flips: list[bool], u: "torch.Tensor") -> tuple["torch.Tensor", list[tuple[int, int]]]:
        """(latents (B, C, h, w) of random crops of the cached images, the (top, left) of each crop as trained)."""
        from PIL import Image

        from mixdiff_cli.training.dataset import crop_box

        crops, boxes = [], []
        for j, i in enumerate(idx):
            im = self.cache.images[i]
            left, top, right, bottom = crop_box(im.size, self.resolution, "random", (float(u[j, 0]), float(u[j, 1])))
            crop = im.crop((left, top, right, bottom))
            if flips[j]:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                left = im.width - right
            crops.append(crop)
            boxes.append((top, left))
        latents = encode_images(self.vae, to_tensor(crops), "mean")
        return latents.to(self.device), boxes

    def _crop_micro(self, idx: list[int], boxes: list[tuple[int, int]]) -> "torch.Tensor":
        """The micro-conditioning (B, K) of the random crops at (top, left) `boxes` of images `idx`."""
        import torch

        rows = [self.family.micro_cond(self.cache.sizes[i], top, left, self.resolution) for i, (top, left) in zip(idx, boxes)]
        return torch.tensor(rows, dtype=torch.float32, device=self.device)


def _cached_micro(cache: Cache, idx: "torch.Tensor", flip: "torch.Tensor") -> "torch.Tensor":
    """The micro-conditioning (B, K) of the cached center crops `idx`, the flipped ones where `flip`."""
    import torch

    return torch.where(flip[:, None], cache.micro_flipped.index_select(0, idx), cache.micro.index_select(0, idx))
