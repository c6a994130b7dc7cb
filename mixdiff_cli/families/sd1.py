"""SD 1.x (runwayml/stable-diffusion-v1-5 and its fine-tunes): one CLIP-L text encoder, a 512 px UNet."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixdiff_cli.families.base import Cond
from mixdiff_cli.families.unet import UNetFamily

if TYPE_CHECKING:
    import torch


class SD1(UNetFamily):
    name, label = "sd1", "SD 1.x"
    pipelines = ("StableDiffusionPipeline",)
    text_encoders = ("text_encoder",)
    context_dim = 768  # the UNet's cross-attention width, what tells SD 1.x from SD 2.x

    def matches(self, pipeline: str, denoiser_config: Mapping[str, Any]) -> bool:
        return pipeline in self.pipelines and denoiser_config.get("cross_attention_dim") != SD2.context_dim

    def load_single_file(self, path: Path, dtype: Any) -> Any:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_single_file(str(path), dtype=dtype, local_files_only=True)

    def encode(self, pipe: Any, texts: list[str], device: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The router vector is CLIP's `pooler_output` (N, D), which `encode_prompt` computes and discards."""
        with _capture_pooler(pipe.text_encoder) as seen:
            embeds, _ = pipe.encode_prompt(texts, device, 1, False)
        return {"prompt_embeds": embeds}, seen[0]

    def denoiser_cond(self, fields: Mapping[str, torch.Tensor]) -> Cond:
        return {"encoder_hidden_states": fields["prompt_embeds"]}


class SD2(SD1):
    name, label = "sd2", "SD 2.x"
    context_dim = 1024  # OpenCLIP ViT-H

    def matches(self, pipeline: str, denoiser_config: Mapping[str, Any]) -> bool:
        return pipeline in self.pipelines and denoiser_config.get("cross_attention_dim") == self.context_dim


@contextlib.contextmanager
def _capture_pooler(text_encoder: Any) -> Iterator[list[torch.Tensor]]:
    """Record `pooler_output` of every call of a CLIP text encoder."""
    seen: list[torch.Tensor] = []

    def hook(module: Any, args: Any, output: Any) -> None:
        seen.append(output.pooler_output if hasattr(output, "pooler_output") else output[1])

    handle = text_encoder.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()
