"""SD 1.x (runwayml/stable-diffusion-v1-5 and its fine-tunes): one CLIP-L text encoder, a 512 px UNet."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixdiff_cli.families.base import Cond
from mixdiff_cli.families.unet import UNetFamily

if TYPE_CHECKING:
    import torch

# The public configs of the real checkpoints, kept literally as their config.json files on the Hub say, so
# that a file can be checked against a real base without its weights (tests/test_compat.py builds each on
# the meta device and compares every module).
_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
_SD_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "down_block_types": _SD_DOWN, "downsample_padding": 1, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "out_channels": 4, "up_block_types": _SD_UP,
}  # fmt: skip
_CLIP_L = {
    "architectures": ["CLIPTextModel"], "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
    "num_hidden_layers": 12, "projection_dim": 768, "hidden_act": "quick_gelu", "max_position_embeddings": 77,
    "vocab_size": 49408,
}  # fmt: skip
_DDIM = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "num_train_timesteps": 1000}  # fmt: skip


class SD1(UNetFamily):
    name, label = "sd1", "SD 1.x"
    pipelines = ("StableDiffusionPipeline",)
    text_encoders = ("text_encoder",)
    context_dim = 768  # the UNet's cross-attention width, what tells SD 1.x from SD 2.x
    modelspec_architecture, kohya_base_version = "stable-diffusion-v1/lora", "sd_v1"
    modelspec_prefix, kohya_prefix = "stable-diffusion-v1", "sd_v1"
    public = {
        # runwayml/stable-diffusion-v1-5
        "sd15": {
            "unet": {**_SD_UNET, "attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64},
            "text_encoder": _CLIP_L,
            "scheduler": {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                          "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1, "num_train_timesteps": 1000,
                          "prediction_type": "epsilon"},
        },
    }  # fmt: skip

    def matches(self, pipeline: str, denoiser_config: Mapping[str, Any]) -> bool:
        return pipeline in self.pipelines and denoiser_config.get("cross_attention_dim") != SD2.context_dim

    def claims_config(self, denoiser_config: Mapping[str, Any]) -> bool:
        cross = denoiser_config.get("cross_attention_dim")
        cross = cross[-1] if isinstance(cross, (list, tuple)) else cross
        return denoiser_config.get("addition_embed_type") != "text_time" and (cross == SD2.context_dim) == (self.context_dim == SD2.context_dim)

    def assemble(self, **components: Any) -> Any:
        """Without a safety checker unless one is given."""
        components = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False, **components}
        return super().assemble(**components)

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

    def caption_encode(self, encoders: Sequence[Any], ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The last hidden state (B, T, D)."""
        enc = encoders[0]
        return enc(ids[0].to(next(enc.parameters()).device), return_dict=False)[0], None

    def lora_writer(self) -> Any:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def build_tiny(self, folder: Path, seed: int, words: Iterable[str]) -> None:
        from mixdiff_cli.families.unet_tiny import build_sd1

        build_sd1(folder, seed, words)


class SD2(SD1):
    name, label = "sd2", "SD 2.x"
    context_dim = 1024  # OpenCLIP ViT-H
    modelspec_architecture, kohya_base_version = "stable-diffusion-v2-512/lora", "sd_v2"
    modelspec_prefix, kohya_prefix = "stable-diffusion-v2", "sd_v2"
    public = {
        # stabilityai/stable-diffusion-2-1 (768-v: v-prediction)
        "sd21": {
            "unet": {**_SD_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "sample_size": 96,
                     "dual_cross_attention": False, "num_class_embeds": None, "only_cross_attention": False,
                     "upcast_attention": True, "use_linear_projection": True},
            "text_encoder": {"architectures": ["CLIPTextModel"], "hidden_size": 1024, "intermediate_size": 4096,
                             "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512, "hidden_act": "gelu",
                             "max_position_embeddings": 77, "vocab_size": 49408},
            "scheduler": {**_DDIM, "prediction_type": "v_prediction"},
        },
    }  # fmt: skip

    def matches(self, pipeline: str, denoiser_config: Mapping[str, Any]) -> bool:
        return pipeline in self.pipelines and denoiser_config.get("cross_attention_dim") == self.context_dim

    def from_metadata(self, meta: Mapping[str, str], sidecar: Mapping[str, Any]) -> bool:
        return super().from_metadata(meta, sidecar) or meta.get("ss_v2") == "True"

    def lora_evidence(self, modules: Sequence[Any], meta: Mapping[str, str], sidecar: Mapping[str, Any]) -> int | None:
        found = super().lora_evidence(modules, meta, sidecar)
        if found is None and self.context_dim in {m.in_features for m in modules if m.component == "text_encoder" and m.path.endswith("q_proj")}:
            return 3  # an OpenCLIP-H text encoder LoRA
        return found

    def checkpoint_evidence(self, header: Mapping[str, dict], meta: Mapping[str, str]) -> int | None:
        if any(k.startswith("cond_stage_model.model.") for k in header):  # OpenCLIP text encoder
            return 0
        return super().checkpoint_evidence(header, meta)

    def build_tiny(self, folder: Path, seed: int, words: Iterable[str]) -> None:
        raise NotImplementedError("no tiny SD 2.x pipeline; build SD 1.x and set its scheduler to v_prediction")


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
