"""SDXL (stabilityai/stable-diffusion-xl-base-1.0 and its fine-tunes): two CLIP text encoders, pooled text
embeddings and size/crop micro-conditioning (`time_ids`) beside the cross-attention context."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixdiff_cli.families.base import Cond
from mixdiff_cli.families.sd1 import _CLIP_L, _SD_UNET
from mixdiff_cli.families.unet import UNetFamily

if TYPE_CHECKING:
    import torch


class SDXL(UNetFamily):
    name, label = "sdxl", "SDXL"
    pipelines = ("StableDiffusionXLPipeline",)
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    modelspec_architecture, kohya_base_version = "stable-diffusion-xl-v1-base/lora", "sdxl_base_v1-0"
    modelspec_prefix, kohya_prefix = "stable-diffusion-xl", "sdxl"
    kohya_prefixes = (("lora_unet_", "unet"), ("lora_te2_", "text_encoder_2"), ("lora_te1_", "text_encoder"), ("lora_te_", "text_encoder"))

    def claims_config(self, denoiser_config: Mapping[str, Any]) -> bool:
        return denoiser_config.get("addition_embed_type") == "text_time"

    def lora_evidence(self, modules: Sequence[Any], meta: Mapping[str, str], sidecar: Mapping[str, Any]) -> int | None:
        """Keys: a second text encoder, several transformer blocks per attention (SD 1.x/2.x have exactly
        one), or SGM block names (kohya names them for SDXL only)."""
        unet = [m for m in modules if m.component == "unet"]
        if any(m.component == "text_encoder_2" for m in modules):
            return 0
        if any(int(k) >= 1 for m in unet for k in re.findall(r"transformer_blocks\.(\d+)", m.path)):
            return 0
        if any(m.path.startswith(("input_blocks.", "middle_block.", "output_blocks.")) for m in unet):
            return 0
        return super().lora_evidence(modules, meta, sidecar)

    def checkpoint_evidence(self, header: Mapping[str, dict], meta: Mapping[str, str]) -> int | None:
        if any(k.startswith(("model.diffusion_model.label_emb", "conditioner.embedders.1", "add_embedding.")) for k in header):
            return 0
        return super().checkpoint_evidence(header, meta)
    public = {
        # stabilityai/stable-diffusion-xl-base-1.0
        "sdxl": {
            "unet": {**_SD_UNET, "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
                     "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
                     "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                     "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
                     "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True},
            "text_encoder": _CLIP_L,
            "text_encoder_2": {"architectures": ["CLIPTextModelWithProjection"], "hidden_size": 1280, "intermediate_size": 5120,
                               "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280, "hidden_act": "gelu",
                               "max_position_embeddings": 77, "vocab_size": 49408},
            "scheduler": {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                          "beta_schedule": "scaled_linear", "interpolation_type": "linear", "num_train_timesteps": 1000,
                          "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading"},
        },
    }  # fmt: skip

    def load_single_file(self, path: Path, dtype: Any) -> Any:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline.from_single_file(str(path), dtype=dtype, local_files_only=True)

    def encode(self, pipe: Any, texts: list[str], device: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The router vector is the second encoder's projected `text_embeds` (N, P), which the UNet reads too."""
        embeds, _, pooled, _ = pipe.encode_prompt(texts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}, pooled

    def zero_negative(self, pipe: Any) -> bool:
        return bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))

    def denoiser_cond(self, fields: Mapping[str, torch.Tensor]) -> Cond:
        return {"encoder_hidden_states": fields["prompt_embeds"], "text_embeds": fields["pooled_prompt_embeds"]}

    def caption_encode(self, encoders: Sequence[Any], ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The penultimate hidden states of both encoders concatenated (B, T, D1 + D2), the second's pooled (B, P)."""
        import torch

        hidden, pooled = [], None
        for enc, tok_ids in zip(encoders, ids):
            out = enc(tok_ids.to(next(enc.parameters()).device), output_hidden_states=True, return_dict=False)
            pooled = out[0]  # CLIPTextModelWithProjection: text_embeds (B, P); the last one wins
            hidden.append(out[-1][-2])  # (B, T, D_i)
        return torch.cat(hidden, dim=-1), pooled

    def micro_cond(self, size: tuple[int, int], top: int, left: int, resolution: int) -> list[float] | None:
        """`time_ids`: original size, crop top-left, target size."""
        return [size[0], size[1], top, left, resolution, resolution]

    def train_cond(self, hidden: torch.Tensor, pooled: torch.Tensor | None, micro: torch.Tensor | None) -> Cond:
        return {"encoder_hidden_states": hidden, "text_embeds": pooled, "time_ids": micro}

    def lora_writer(self) -> Any:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def build_tiny(self, folder: Path, seed: int, words: Iterable[str]) -> None:
        from mixdiff_cli.families.unet_tiny import build_sdxl

        build_sdxl(folder, seed, words)

    def kohya_stem(self, component: str, module: str, denoiser_config: Mapping[str, Any], original: bool = True) -> str:
        """sd-scripts names SDXL's UNet modules by their original SGM blocks (`input_blocks_4_1_...`)."""
        if component == self.denoiser and original:
            from mixdiff_cli.families.unet_geometry import diffusers_to_sgm

            module = diffusers_to_sgm(module, dict(denoiser_config))
        return super().kohya_stem(component, module, denoiser_config)

    def tile_cond(self, box: tuple[int, int, int, int], canvas: tuple[int, int], like: torch.Tensor) -> Cond:
        """`time_ids` (1, 6): original size (the canvas), crop top-left (the tile's corner), target size (the tile)."""
        import torch

        y0, x0, h, w = box
        return {"time_ids": torch.tensor([[canvas[0], canvas[1], y0, x0, h, w]], dtype=like.dtype, device=like.device)}
