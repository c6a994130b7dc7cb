"""Prompt encoding with the base pipeline's own text encoder(s): the conditioning the pipeline wants and
the vector the router reads, from one encoder pass. What each family encodes is its own
(`Family.encode`): e.g. CLIP's pooled feature is the router vector of the SD families."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from mixdiff_cli.catalog.model import Catalog


@dataclass
class Encoded:
    """Encoded prompts (row i = prompt i): the pipeline's text kwargs of the cond half (`fields`, e.g.
    `prompt_embeds` (N, L, D)) and of the negatives (`negatives`, the same names; None when encoded for
    routing only). Each field reads as an attribute too: `enc.prompt_embeds`, `enc.negative_prompt_embeds`."""

    fields: dict[str, torch.Tensor]
    router: torch.Tensor  # (N, D) the router's vector, from the bare (adapter-free) encoders
    negatives: dict[str, torch.Tensor] | None = None

    def __getattr__(self, name: str) -> Any:
        fields = self.__dict__.get("fields") or {}
        if name in fields:
            return fields[name]
        if name.startswith("negative_") and name.removeprefix("negative_") in fields:
            return (self.__dict__.get("negatives") or {}).get(name.removeprefix("negative_"))
        raise AttributeError(name)

    def __len__(self) -> int:
        return self.router.shape[0]

    def take(self, index: Sequence[int]) -> Encoded:
        """Rows `index` of every field."""
        from mixdiff_cli.families.base import take

        rows = list(index)
        return replace(self, fields=take(self.fields, rows), router=take({"r": self.router}, rows)["r"],
                       negatives=None if self.negatives is None else take(self.negatives, rows))

    def pipeline_kwargs(self) -> dict[str, Any]:
        """What a diffusers text-to-image pipeline takes instead of `prompt` / `negative_prompt`."""
        negatives = self.negatives or {}
        return {**self.fields, **{f"negative_{k}": negatives.get(k) for k in self.fields}}


def _lora_enabled(model: Any) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(not m.disable_adapters for m in model.modules() if isinstance(m, BaseTunerLayer))


@contextlib.contextmanager
def bare_text_encoders(pipe: Any) -> Iterator[None]:
    """Disable any LoRA layers in the pipeline's text encoders for the duration (the router sees the base);
    encoders whose adapters were already disabled stay so."""
    from diffusers.loaders.lora_base import disable_lora_for_text_encoder, enable_lora_for_text_encoder

    from mixdiff_cli.families import of_pipeline

    adapted = [te for te in of_pipeline(pipe).encoders(pipe) if getattr(te, "peft_config", None) and _lora_enabled(te)]
    for te in adapted:
        disable_lora_for_text_encoder(te)
    try:
        yield
    finally:
        for te in adapted:
            enable_lora_for_text_encoder(te)


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

    from mixdiff_cli.families import of_pipeline

    family = of_pipeline(pipe)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to encode")
    device = device or pipe._execution_device
    # a missing negative is the encoding of "", or zeros where the family says so
    zero_negative = family.zero_negative(pipe)
    neg = None if negatives is None else [("" if n is None and not zero_negative else n) for n in negatives]
    if neg is not None and len(neg) != len(prompts):
        raise ValueError(f"{len(neg)} negative prompts for {len(prompts)} prompts")

    texts = list(dict.fromkeys(prompts + [n for n in (neg or []) if n is not None]))  # unique, in order
    row = {text: i for i, text in enumerate(texts)}
    with torch.no_grad():
        fields, router = family.encode(pipe, texts, device)

    def rows(items: Sequence[str | None], table: torch.Tensor) -> torch.Tensor:
        return torch.stack([table[row[t]] if t is not None else torch.zeros_like(table[0]) for t in items])

    return Encoded(
        fields={k: rows(prompts, v) for k, v in fields.items()},
        router=rows(prompts, router),
        negatives=None if neg is None else {k: rows(neg, v) for k, v in fields.items()},
    )


def router_vectors(pipe: Any, prompts: Sequence[str]) -> torch.Tensor:
    """(N, D) pooled vectors of the bare text encoder(s), what the router reads."""
    with bare_text_encoders(pipe):
        return encode(pipe, prompts).router


def load_text_encoders(catalog: Catalog, device: str | None = None, dtype: str | None = None) -> Any:
    """The base's tokenizer(s) and text encoder(s) only (no denoiser, no VAE), as a pipeline object whose
    `encode_prompt` works. For `mixdiff route`."""
    from mixdiff_cli.core.runtime import pick_device, pick_dtype
    from mixdiff_cli.models.pipeline import load_base

    dev = pick_device(device)
    return load_base(catalog, dev, pick_dtype(dtype, dev), text_only=True)
