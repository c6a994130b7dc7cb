"""Batch-invariant CPU kernels: an image's bytes do not depend on which images share its batch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


class _Cover:
    """The modules patched so far; `add` covers one more (a model expert loaded mid-run)."""

    def __init__(self) -> None:
        self.patched: list[Any] = []
        self.sliced: list[Any] = []

    def add(self, model: Any) -> None:
        from torch import nn

        if model is None:
            return
        if hasattr(model, "enable_slicing") and hasattr(model, "use_slicing"):
            if not model.use_slicing:
                model.enable_slicing()
                self.sliced.append(model)
            return
        for module in model.modules():
            dims = (2,) if isinstance(module, nn.Linear) else (3, 4, 5) if isinstance(module, (nn.Conv2d, nn.GroupNorm)) else ()
            if dims and "forward" not in module.__dict__:
                module.forward = _per_sample(module.forward, dims)
                self.patched.append(module)

    def close(self) -> None:
        for module in self.patched:
            del module.forward
        for model in self.sliced:
            model.disable_slicing()
        self.patched, self.sliced = [], []


def _per_sample(forward: Callable[..., Any], dims: tuple[int, ...]) -> Callable[..., Any]:
    import torch

    def run(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x.dim() not in dims:
            return forward(x, *args, **kwargs)
        # (B, ...) -> B calls on (1, ...), each contiguous: a batch of one often arrives channels-last
        return torch.cat([forward(x[i : i + 1].contiguous(), *args, **kwargs) for i in range(x.shape[0])])

    return run


@contextlib.contextmanager
def batch_invariant(*models: Any) -> Iterator[_Cover]:
    """Make each image independent of which other images share its batch (used on CPU).

    CPU kernels give a sample different last bits depending on its batch: BLAS takes gemv for one row
    and gemm for several (the time-embedding and `time_emb_proj` linears see (B, C)), oneDNN picks
    convolution algorithms by batch size and memory format, and GroupNorm splits its reductions by
    batch x groups. For the duration, 2-D `nn.Linear` inputs run row by row and `nn.Conv2d` /
    `nn.GroupNorm` (also the (B, C, HW) GroupNorm inside attention) sample by sample on contiguous
    inputs; attention and token-wise linears stay batched (their rows are already independent). A VAE
    (anything with `enable_slicing`) decodes one image at a time instead, which is cheaper. Yields the
    cover, whose `add` takes in a model loaded later.
    """
    cover = _Cover()
    try:
        for model in models:
            cover.add(model)
        yield cover
    finally:
        cover.close()
