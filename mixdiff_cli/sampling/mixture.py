"""The mixture of experts as a denoiser over denoisers: a module with the base denoiser's forward signature
that blends its experts' predictions, eps(x_t) = sum_i w_i(t, x) * eps_i(x_t, t, cond_i). Any diffusers
pipeline samples from it unchanged (schedulers, classifier-free guidance, micro-conditioning): the
family's wrapper (`Family.split` / `run` / `output`) turns the pipeline's call into (x, t, cond) and back,
so nothing here knows which model family it blends.

What to blend is data (`Blend`), set on the module for a sampling run (`Mixture.routed`):
- LoRA experts on the base run in ONE batched forward of the base denoiser, each slice of the batch with
  its own adapter, each adapter adding its LoRA output to its contiguous slice (`adapter_slices_hooks`);
- full-model experts run on their own denoisers;
- a single slice (top-1, merge, bare base) is a plain forward of the base with the adapters the
  caller activated, at no extra cost.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mixdiff_cli.families.base import Family, cat, repeat

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
ACTIVE = None  # a slice that runs the base with whatever adapters are active (set_adapters)


@contextlib.contextmanager
def adapter_names_hooks(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[int]:
    """Route sample i of every forward of `model` through adapter `adapter_names[i]` (`__base__` = none).

    Registers PEFT's `_adapter_names_pre_forward_hook` on each LoRA layer (what `PeftModel.generate(...,
    adapter_names=)` does); yields the number of hooked layers; always removes the hooks.
    """
    from functools import partial

    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.lora.model import _adapter_names_pre_forward_hook

    hook = partial(_adapter_names_pre_forward_hook, adapter_names=list(adapter_names))
    handles = []
    try:
        for module in model.modules():
            if isinstance(module, LoraLayer):
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def adapter_slices_hooks(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[int]:
    """`adapter_names_hooks` for a batch laid out in runs, each adapter's samples together (the mixture's
    layout): each LoRA layer computes its base output once and adds every adapter's LoRA output to a
    contiguous slice of it (views), where PEFT's mixed batch gathers and scatters samples by index.

    The base output comes from PEFT's own mixed-batch forward with every sample on `__base__`, so no layer
    state changes. LoRA variants (DoRA) keep PEFT's hooks. Yields the number of hooked layers; always unhooks.
    """
    from functools import partial
    from itertools import groupby

    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.lora.model import _adapter_names_pre_forward_hook

    runs, start = [], 0  # (first sample, end, adapter)
    for name, group in groupby(adapter_names):
        size = len(list(group))
        runs.append((start, start + size, name))
        start += size
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if any(getattr(m, "lora_variant", {}).get(name) for m in layers for *_, name in runs):
        with adapter_names_hooks(model, adapter_names) as hooked:
            yield hooked
        return

    def add_slices(module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]  # (B, ...) the layer's input; output (B, ...) its base layer's
        for first, end, name in runs:
            if name in module.lora_A:
                lora_A = module.lora_A[name]
                lora = module.lora_B[name](lora_A(module.lora_dropout[name](x[first:end].to(lora_A.weight.dtype))))
                output[first:end] += (lora * module.scaling[name]).to(output.dtype)
        return output

    base_only = partial(_adapter_names_pre_forward_hook, adapter_names=[BASE] * start)
    handles = []
    try:
        for module in layers:
            handles.append(module.register_forward_pre_hook(base_only, with_kwargs=True))
            handles.append(module.register_forward_hook(add_slices))
        yield len(layers)
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Blend:
    """One route as the denoiser sees it.

    `slices`: the base denoiser's batch is repeated once per slice; a slice names a LoRA adapter, `__base__`
    (the bare base) or ACTIVE (None: the adapters set active by the caller, e.g. merged in weight space).
    `models`: names of full-model experts (keys of `Mixture.models`).
    `weights`: one per slice, then one per model.
    `conditioning`: optional per-member overrides of the denoiser's conditioning (`Family.denoiser_cond`;
    members whose LoRA also adapts the text encoder), same batch layout as what the pipeline passes.
    """

    slices: list[str | None] = field(default_factory=lambda: [ACTIVE])
    models: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=lambda: [1.0])
    conditioning: list[Mapping[str, torch.Tensor] | None] | None = None

    def __post_init__(self) -> None:
        if len(self.weights) != len(self.slices) + len(self.models):
            raise ValueError(f"{len(self.weights)} weights for {len(self.slices)} slices and {len(self.models)} models")
        if ACTIVE in self.slices and len(self.slices) > 1:
            raise ValueError("an ACTIVE slice cannot share a batched forward with named adapters")
        if not self.slices and not self.models:
            raise ValueError("a blend needs at least one member")

    @property
    def single(self) -> bool:
        """One member: a plain forward, exactly what the pipeline would do without the mixture."""
        return len(self.slices) + len(self.models) == 1 and not self.conditioning

    def weights_at(self, timestep: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """(k, 1, 1, 1, 1) mixing weights, broadcast over (k, B, C, H, W).

        Constant for now; a timestep- or region-dependent route returns (k, B, 1, H, W) here.
        """
        return torch.tensor(self.weights, dtype=sample.dtype, device=sample.device).view(-1, 1, 1, 1, 1)


class Mixture(nn.Module):
    """A drop-in for the base denoiser: same forward, same `config`/`dtype`/`device` and attributes."""

    def __init__(self, base: nn.Module, family: Family, models: Mapping[str, nn.Module] | None = None):
        super().__init__()
        self.base = base
        self.family = family
        # full-model experts by expert name: a plain dict, not a ModuleDict, whose keys may not be Module
        # attributes (an expert may be called `half` or `to`); the engine places and parks them itself
        self.models: dict[str, nn.Module] = dict(models or {})
        self.blend: Blend | None = None
        self._hooks: contextlib.ExitStack | None = None
        self._hooked: tuple[str, ...] = ()

    # attributes pipelines read from their denoiser
    @property
    def config(self) -> Any:
        return self.base.config

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def device(self) -> torch.device:
        return self.base.device

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None:
                raise
            return getattr(base, name)  # add_embedding, encoder_hid_proj, ...

    def denoisers(self) -> list[nn.Module]:
        """The base and every model expert's denoiser."""
        return [self.base, *self.models.values()]

    @contextlib.contextmanager
    def routed(self, blend: Blend) -> Iterator[Mixture]:
        """Blend with `blend` for the duration (one sampling run); per-sample hooks are removed after."""
        self.blend = blend
        try:
            yield self
        finally:
            self.blend = None
            self._unhook()

    def switch(self, blend: Blend) -> None:
        """Blend with `blend` from the next forward on (a timestep band's boundary, within one run)."""
        self._unhook()
        self.blend = blend

    def _hook(self, names: tuple[str, ...]) -> None:
        """Keep per-sample adapter hooks for this batch layout (re-registered only when it changes)."""
        if names == self._hooked:
            return
        self._unhook()
        stack = contextlib.ExitStack()
        stack.enter_context(adapter_slices_hooks(self.base, names))
        self._hooks, self._hooked = stack, names

    def _unhook(self) -> None:
        if self._hooks is not None:
            self._hooks.close()
        self._hooks, self._hooked = None, ()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        blend = self.blend
        if blend is None or blend.single:
            model = self.base if blend is None or blend.slices else self.models[blend.models[0]]
            return model(*args, **kwargs)
        family = self.family
        x, t, cond, rest = family.split(args, kwargs)
        batch = x.shape[0]  # B: images x (uncond, cond) halves
        override = blend.conditioning or [None] * (len(blend.slices) + len(blend.models))
        member = [{**cond, **o} if o is not None else cond for o in override]  # each member's conditioning
        eps: list[torch.Tensor] = []  # k x (B, C, H, W)
        m = len(blend.slices)
        if m:
            if m > 1:
                self._hook(tuple(name for name in blend.slices for _ in range(batch)))
            batched = cat(member[:m]) if any(o is not None for o in override[:m]) else repeat(cond, m)
            out = family.run(self.base, _repeat(x, m), _repeat(t, m), batched, rest)  # (m*B, C, H, W)
            eps.extend(out.chunk(m))
        for j, name in enumerate(blend.models):
            eps.append(family.run(self.models[name], x, t, member[m + j], rest))
        weights = blend.weights_at(t if isinstance(t, torch.Tensor) else torch.tensor(t), x)
        mixed = (torch.stack(eps) * weights).sum(0)  # (k, B, C, H, W) -> (B, C, H, W)
        return family.output(mixed, kwargs.get("return_dict", True))


def _repeat(x: Any, m: int) -> Any:
    """(B, ...) -> (m*B, ...): the batch repeated m times; non-tensors and 0-d tensors pass through."""
    if not isinstance(x, torch.Tensor) or x.ndim == 0 or m == 1:
        return x
    return x.repeat(m, *([1] * (x.ndim - 1)))
