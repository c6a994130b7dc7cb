"""Fusing a route's LoRAs into the base weights where that pays, and giving the base back bit for bit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    import torch



# Fusing a LoRA on CPU (Engine._fuse_pays): always when its layers average at most this many base-weight
# elements (a LoRA layer's fixed per-call cost dominates there); else when what the run's unfused LoRA layers
# would cost passes the fuse. Both costs measured on SD 1.5 geometry, one thread (benchmarks/bench_scale.py
# --sections speed fused): a fuse 0.40 s for 267M targeted weights; unfused, a rank-32 LoRA (13.6M
# parameters) adds 0.22 s to a denoiser call over 2 x 1024 latent tokens (256 px with CFG).
_CPU_FUSE_MAX_PER_LAYER = 400_000


_CPU_FUSE_S_PER_WEIGHT = 1.5e-9


_CPU_LORA_S_PER_PARAM_TOKEN = 7.9e-12



def _plus_delta(module: Any, adapter: str, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`weight` + the LoRA layer's delta for `adapter` (PEFT's get_delta_weight: scale * B @ A), written into
    `out` (a tensor like `weight`), or into `weight` itself when `out` is None. Linear and 1x1 conv layers
    take one addmm (one pass over the weight, no delta tensor); the rest (3x3 convs, half precision on CPU)
    PEFT's own delta."""
    import torch

    a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    flat = weight.dim() == 2 or weight.shape[2:] == (1, 1)
    exact_dtype = a.dtype == b.dtype == weight.dtype and (weight.dtype == torch.float32 or weight.device.type != "cpu")
    if flat and exact_dtype and not getattr(module, "fan_in_fan_out", False):
        w2, b2, a2 = weight.flatten(1), b.flatten(1), a.flatten(1)
        if out is None:
            w2.addmm_(b2, a2, alpha=module.scaling[adapter])
            return weight
        torch.addmm(w2, b2, a2, alpha=module.scaling[adapter], out=out.view(w2.shape))
        return out
    delta = module.get_delta_weight(adapter).to(weight.dtype)
    return weight.add_(delta) if out is None else torch.add(weight, delta, out=out)


class Fusion:
    """Fused routes (a part of `Engine`): one addmm per layer into reused buffers; `unfuse` swaps the base back."""

    def _fuse(self, adapters: list[str], tokens: int | None = None) -> None:
        """Fuse `adapters` (at their set_adapters weights) into the base UNet where that pays (`_fuse_pays`),
        and keep them fused after the run: the next run of the same route (the next image of a prompt file,
        the next batch) starts fused and pays nothing. `unfuse` gives the base weights back bit for bit
        before the adapter state changes (another route, an adapter loaded or evicted, `plan`).

        Where `fuse_lora` adds in place (W += get_delta_weight, PEFT's merge), this swaps each targeted W
        for a buffer holding W + scale * B @ A (one addmm: a single pass over W) while those LoRA layers are off, and
        keeps W itself: no float drift ((W + dW) - dW != W), and an unfuse is a pointer swap. The price is
        one copy of the targeted weights, made at the first fuse and reused by every later one
        (`_fuse_buffer`; `unfuse(release=True)` frees it)."""
        import torch
        from peft.tuners.lora.layer import LoraLayer

        key = (tuple(adapters), self._active_key, self.fuse)
        if self._fusion is not None and self._fusion[0] == key:
            return
        self.unfuse()
        if not adapters:
            return
        if self._lora_layers is None:
            self._lora_layers = [m for m in self.denoiser.modules() if isinstance(m, LoraLayer)]
        layers = [m for m in self._lora_layers if any(a in m.lora_A for a in adapters)]
        vanilla = all(not getattr(m, "lora_variant", {}).get(a) and not m.lora_bias.get(a) for m in layers for a in adapters)
        if not layers or not vanilla or not self._fuse_pays(layers, adapters, tokens):  # DoRA and LoRA biases: run unfused
            return
        saved: list[tuple[Any, Any]] = []
        self._fusion = (key, saved, layers)
        try:
            with torch.no_grad():
                for module in layers:
                    weight = module.get_base_layer().weight
                    buffer = self._fuse_buffer(weight)
                    fused = None
                    for adapter in adapters:  # ((W + d1) + d2): the order fuse_lora adds in
                        if adapter in module.lora_A:
                            fused = _plus_delta(module, adapter, weight.data, out=buffer) if fused is None else _plus_delta(module, adapter, fused)
                    saved.append((weight, weight.data))
                    weight.data = fused
                    module.enable_adapters(False)  # only the fused layers (what unet.disable_adapters does, on fewer)
        except BaseException:  # out of memory half way: the base as it was
            self.unfuse()
            raise

    def _fuse_buffer(self, weight: Any) -> Any:
        """The tensor `weight`'s fused copies are written into, made once: a fresh allocation per fuse costs
        more than the fuse (page faults on ~1 GB for SD 1.5 in float32: 1.7-9 s on this CPU, against ~0.4 s
        into a reused buffer; benchmarks/bench_scale.py)."""
        import torch

        buffer = self._fuse_buffers.get(weight)
        if buffer is None or buffer.shape != weight.shape or buffer.dtype != weight.dtype or buffer.device != weight.device:
            buffer = self._fuse_buffers[weight] = torch.empty_like(weight.data, memory_format=torch.contiguous_format)
        return buffer

    def unfuse(self, release: bool = False) -> None:
        """The base UNet's own weights back (bit for bit) and its LoRA layers on, if a route is fused;
        `release`: also free the buffers fuses write into (one copy of the targeted weights)."""
        if release:
            self.unfuse()
            self._fuse_buffers.clear()
            return
        if self._fusion is None:
            return
        _, saved, layers = self._fusion
        self._fusion = None
        for weight, original in saved:
            weight.data = original
        for module in layers:
            module.enable_adapters(True)

    @property
    def fused(self) -> tuple[str, ...]:
        """The adapters fused into the base UNet now (empty: none)."""
        return self._fusion[0][0] if self._fusion is not None else ()

    def _fuse_pays(self, layers: list[Any], adapters: Sequence[str] = (), tokens: int | None = None) -> bool:
        """Whether fusing `adapters` beats running their LoRA `layers` unfused (`self.fuse`: auto, always,
        never) for a run of `tokens` latent tokens through the UNet (samples x calls x latent pixels; None:
        not known).

        auto: never in bfloat16 (its 8-bit mantissa rounds W + dW: 4-9/255 off the unfused image, against
        < 1/255 in float16 and ~1e-6 in float32). On an accelerator always (a fuse is milliseconds there). On
        CPU a fuse is one addmm over the targeted weights (0.40 s for SD 1.5's 267M on one thread), against
        ~60 us per LoRA layer per UNet call unfused at 64 px, growing with the tokens (0.22 s a call for
        SD 1.5's rank-32 LoRA at 256 px with CFG; constants above): small layers (the tiny test models)
        always pay; SD 1.5 pays at 256 px from 2 steps on, not at 64 px for one 10-step image (there the
        fuse is ~30 steps of what this model puts on the LoRA layers). A fused route stays fused for its next images, which then run
        at the bare UNet's speed."""
        import torch

        if self.fuse != "auto":
            return self.fuse == "always"
        if self.dtype == torch.bfloat16:
            return False
        if self.device.type != "cpu":
            return True
        weights = sum(m.get_base_layer().weight.numel() for m in layers)
        if weights <= _CPU_FUSE_MAX_PER_LAYER * len(layers):
            return True
        lora = sum(m.lora_A[a].weight.numel() + m.lora_B[a].weight.numel() for m in layers for a in adapters if a in m.lora_A)
        return tokens is not None and tokens * lora * _CPU_LORA_S_PER_PARAM_TOKEN >= weights * _CPU_FUSE_S_PER_WEIGHT
