"""Prompt encoding with the base pipeline's own text encoder(s): the conditioning the pipeline wants and
the pooled vector the router reads, from one encoder pass.

The router vector is CLIP's pooled text feature: SD 1.x/2.x `text_encoder(...).pooler_output` (N, D);
SDXL the second encoder's projected `text_embeds` (N, P), which SDXL also feeds its UNet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from mixdiff_cli.catalog.schema import Catalog


@dataclass
class Encoded:
    """Encoded prompts (row i = prompt i). Negatives are None when encoded for routing only."""

    prompt_embeds: torch.Tensor  # (N, L, D) encoder_hidden_states for the cond half
    router: torch.Tensor  # (N, D) pooled text feature, from the bare (adapter-free) encoders
    pooled_prompt_embeds: torch.Tensor | None = None  # (N, P) SDXL text_embeds
    negative_prompt_embeds: torch.Tensor | None = None  # (N, L, D)
    negative_pooled_prompt_embeds: torch.Tensor | None = None  # (N, P) SDXL

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def take(self, index: Sequence[int]) -> Encoded:
        """Rows `index` of every field."""
        import torch

        idx = torch.as_tensor(list(index), dtype=torch.long, device=self.prompt_embeds.device)
        pick = lambda t: None if t is None else t.index_select(0, idx.to(t.device))  # noqa: E731
        return replace(
            self,
            prompt_embeds=pick(self.prompt_embeds),
            router=pick(self.router),
            pooled_prompt_embeds=pick(self.pooled_prompt_embeds),
            negative_prompt_embeds=pick(self.negative_prompt_embeds),
            negative_pooled_prompt_embeds=pick(self.negative_pooled_prompt_embeds),
        )

    def pipeline_kwargs(self) -> dict[str, Any]:
        """What a diffusers text-to-image pipeline takes instead of `prompt` / `negative_prompt`."""
        kwargs = {"prompt_embeds": self.prompt_embeds, "negative_prompt_embeds": self.negative_prompt_embeds}
        if self.pooled_prompt_embeds is not None:
            kwargs["pooled_prompt_embeds"] = self.pooled_prompt_embeds
            kwargs["negative_pooled_prompt_embeds"] = self.negative_pooled_prompt_embeds
        return kwargs


def is_sdxl(pipe: Any) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def _text_encoders(pipe: Any) -> list[Any]:
    return [te for te in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if te is not None]


def _lora_enabled(model: Any) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(not m.disable_adapters for m in model.modules() if isinstance(m, BaseTunerLayer))


@contextlib.contextmanager
def bare_text_encoders(pipe: Any) -> Iterator[None]:
    """Disable any LoRA layers in the pipeline's text encoders for the duration (the router sees the base);
    encoders whose adapters were already disabled stay so."""
    from diffusers.loaders.lora_base import disable_lora_for_text_encoder, enable_lora_for_text_encoder

    adapted = [te for te in _text_encoders(pipe) if getattr(te, "peft_config", None) and _lora_enabled(te)]
    for te in adapted:
        disable_lora_for_text_encoder(te)
    try:
        yield
    finally:
        for te in adapted:
            enable_lora_for_text_encoder(te)


@contextlib.contextmanager
def _capture_pooler(text_encoder: Any) -> Iterator[list[torch.Tensor]]:
    """Record `pooler_output` of every call of an SD 1.x text encoder (encode_prompt discards it)."""
    seen: list[torch.Tensor] = []

    def hook(module: Any, args: Any, output: Any) -> None:
        seen.append(output.pooler_output if hasattr(output, "pooler_output") else output[1])

    handle = text_encoder.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def encode(
    pipe: Any,
    prompts: Sequence[str],
    negatives: Sequence[str | None] | None = None,
    *,
    device: Any = None,
) -> Encoded:
    """Encode `prompts` (and `negatives`, one per prompt; None = the pipeline's default negative) in one
    text-encoder pass with the pipeline's own `encode_prompt`; the router vector comes from the same pass.

    Encoders with LoRA layers are used as they are: wrap the call in `bare_text_encoders` for routing.
    """
    import torch

    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to encode")
    device = device or pipe._execution_device
    # SD 1.x encodes a missing negative as ""; SDXL (force_zeros_for_empty_prompt) uses zeros instead.
    zero_negative = is_sdxl(pipe) and bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))
    neg = None if negatives is None else [("" if n is None and not zero_negative else n) for n in negatives]
    if neg is not None and len(neg) != len(prompts):
        raise ValueError(f"{len(neg)} negative prompts for {len(prompts)} prompts")

    texts = list(dict.fromkeys(prompts + [n for n in (neg or []) if n is not None]))  # unique, in order
    row = {text: i for i, text in enumerate(texts)}
    with torch.no_grad():
        if is_sdxl(pipe):
            embeds, _, pooled, _ = pipe.encode_prompt(
                texts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            router = pooled
        else:
            with _capture_pooler(pipe.text_encoder) as seen:
                embeds, _ = pipe.encode_prompt(texts, device, 1, False)
            pooled, router = None, seen[0]

    def rows(items: Sequence[str | None], table: torch.Tensor | None) -> torch.Tensor | None:
        if table is None:
            return None
        out = [table[row[t]] if t is not None else torch.zeros_like(table[0]) for t in items]
        return torch.stack(out)

    enc = Encoded(
        prompt_embeds=rows(prompts, embeds),
        router=rows(prompts, router),
        pooled_prompt_embeds=rows(prompts, pooled),
    )
    if neg is not None:
        enc.negative_prompt_embeds = rows(neg, embeds)
        enc.negative_pooled_prompt_embeds = rows(neg, pooled)
    return enc


def router_vectors(pipe: Any, prompts: Sequence[str]) -> torch.Tensor:
    """(N, D) pooled vectors of the bare text encoder(s), what the router reads."""
    with bare_text_encoders(pipe):
        return encode(pipe, prompts).router


def load_text_encoders(catalog: Catalog, device: str | None = None, dtype: str | None = None) -> Any:
    """The base's tokenizer(s) and text encoder(s) only (no UNet, no VAE), as a pipeline object whose
    `encode_prompt` works. For `mixdiff route`."""
    from mixdiff_cli.core.runtime import pick_device, pick_dtype
    from mixdiff_cli.models.pipeline import load_base

    dev = pick_device(device)
    return load_base(catalog, dev, pick_dtype(dtype, dev), text_only=True)
