"""What the UNet families (SD 1.x, SD 2.x, SDXL) share: the wrapper over `UNet2DConditionModel`'s forward,
whole-model experts, and the conditions on guidance."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixdiff_cli.families.base import Cond, Family

if TYPE_CHECKING:
    import torch

_ARGS = ("sample", "timestep", "encoder_hidden_states")
# a model expert's UNet must agree with the base's on these to blend with it
_SHARED = ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type", "projection_class_embeddings_input_dim")


class UNetFamily(Family):
    """A family whose denoiser is a diffusers `UNet2DConditionModel` (pipeline attribute `unet`)."""

    denoiser = "unet"
    checkpoint_prefix = "model.diffusion_model."  # CompVis/SGM layout
    checkpoint_prefixes = ("model.diffusion_model.", "first_stage_model.", "conditioner.", "cond_stage_model.")
    kohya_prefixes = (("lora_unet_", "unet"), ("lora_te_", "text_encoder"))

    def is_denoiser_config(self, config: Mapping[str, Any]) -> bool:
        return config.get("_class_name") == "UNet2DConditionModel" or ("cross_attention_dim" in config and "block_out_channels" in config)

    def context_width(self) -> int:
        """The cross-attention (text context) width of the family's real checkpoints."""
        return next(iter(self.public.values()))["unet"]["cross_attention_dim"]

    def lora_evidence(self, modules: Sequence[Any], meta: Mapping[str, str], sidecar: Mapping[str, Any]) -> int | None:
        unet = [m for m in modules if m.component == "unet"]
        if self.context_width() in {m.in_features for m in unet if re.search(r"attn2\.to_[kv]$", m.path)}:
            return 1
        return super().lora_evidence(modules, meta, sidecar)

    def checkpoint_evidence(self, header: Mapping[str, dict], meta: Mapping[str, str]) -> int | None:
        for k, t in header.items():
            if re.search(r"attn2\.to_k\.weight$", k) and len(t.get("shape", [])) == 2 and t["shape"][1] == self.context_width():
                return 1
        return super().checkpoint_evidence(header, meta)

    def model_fit(self, theirs: Mapping[str, Any] | None, shapes: Mapping[str, tuple[int, int]], mine: Mapping[str, Any]) -> str | None:
        """Why a whole UNet (its config `theirs`, else its module shapes) cannot stand in for the base's (`mine`)."""
        conv_in = shapes.get("input_blocks.0.0") or shapes.get("conv_in")
        channels = theirs.get("in_channels", 4) if theirs is not None else conv_in[0] if conv_in else None
        if channels is not None and channels != mine.get("in_channels", 4):
            inpainting = " (an inpainting UNet)" if channels == 9 else ""
            return f"model UNet takes {channels} input channels{inpainting}, the base UNet takes {mine.get('in_channels', 4)}"
        if theirs is None:
            return self.denoiser_fit(shapes, mine, "model")
        for key in _SHARED[1:]:
            if theirs.get(key) != mine.get(key):
                return f"model UNet {key} is {theirs.get(key)}, the base UNet's is {mine.get(key)}"
        return None

    def denoiser_fit(self, shapes: Mapping[str, tuple[int, int]], config: Mapping[str, Any], noun: str) -> str | None:
        from mixdiff_cli.families.unet_geometry import unet_fit

        return unet_fit(dict(shapes), dict(config), noun)

    def split(self, args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, Any, Cond, dict[str, Any]]:
        if len(args) > len(_ARGS):
            raise TypeError(f"a UNet call takes at most {len(_ARGS)} positional arguments, got {len(args)}")
        rest = {**dict(zip(_ARGS, args)), **kwargs}
        x, t = rest.pop("sample"), rest.pop("timestep")
        cond: Cond = {"encoder_hidden_states": rest.pop("encoder_hidden_states")}
        cond.update(rest.pop("added_cond_kwargs", None) or {})  # SDXL: text_embeds (B, P), time_ids (B, 6)
        rest.pop("return_dict", None)
        return x, t, cond, rest

    def run(self, model: Any, x: torch.Tensor, t: Any, cond: Cond, rest: Mapping[str, Any]) -> torch.Tensor:
        added = {k: v for k, v in cond.items() if k != "encoder_hidden_states"} or None
        return model(x, t, cond["encoder_hidden_states"], added_cond_kwargs=added, return_dict=False, **rest)[0]

    def output(self, prediction: torch.Tensor, return_dict: bool) -> Any:
        if not return_dict:
            return (prediction,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=prediction)

    def uses_cfg(self, denoiser_config: Mapping[str, Any], guidance: float) -> bool:
        return guidance > 1 and denoiser_config.get("time_cond_proj_dim") is None  # LCM-style UNets embed guidance

    def denoiser_mismatch(self, mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> str | None:
        for key in _SHARED:
            if mine.get(key) != theirs.get(key):
                return f"its UNet has {key}={theirs.get(key)}, the base has {mine.get(key)}"
        return None

    def load_denoiser(self, path: Path, like: Any, dtype: Any) -> Any:
        from diffusers import UNet2DConditionModel

        if not path.is_dir():
            return _unet_from_file(path, like, dtype)
        sub = "unet" if (path / "unet" / "config.json").is_file() else None
        folder = path / sub if sub else path
        # a folder holding only the fp16 variant (diffusion_pytorch_model.fp16.safetensors) loads as that variant
        plain = any((folder / f"diffusion_pytorch_model.{ext}").is_file() for ext in ("safetensors", "safetensors.index.json"))
        return UNet2DConditionModel.from_pretrained(
            path, subfolder=sub, dtype=dtype, use_safetensors=True, local_files_only=True, variant=None if plain else "fp16"
        )

    def decode(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        """As the SD / SDXL pipelines decode: unscaled (or de-normalised where the VAE keeps latent statistics)
        and, for a float16 VAE that asks for it (`force_upcast`), in float32."""
        import torch

        vae, config = pipe.vae, pipe.vae.config
        upcast = vae.dtype == torch.float16 and bool(getattr(config, "force_upcast", False))
        dtype = torch.float32 if upcast else vae.dtype
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            mean, std = (torch.tensor(v, dtype=dtype, device=latents.device).view(1, -1, 1, 1) for v in (mean, std))
            z = latents.to(dtype) * std / config.scaling_factor + mean
        else:
            z = latents.to(dtype) / config.scaling_factor
        if not upcast:
            return vae.decode(z, return_dict=False)[0]
        vae.to(torch.float32)
        try:
            return vae.decode(z, return_dict=False)[0]
        finally:
            vae.to(torch.float16)

    def checkpoint_state(self, denoiser: Mapping[str, Any], config: Mapping[str, Any], texts: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        from mixdiff_cli.families.unet_checkpoint import checkpoint_state

        return checkpoint_state(self.name, denoiser, config, texts)



def _unet_from_file(path: Path, like: Any, dtype: Any) -> Any:
    """A UNet from one .safetensors file: diffusers key names load directly, original SD names convert."""
    import tempfile

    import torch
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        keys = set(fh.keys())
        if keys <= set(like.state_dict()):
            with torch.device("meta"):  # no float32 UNet first: each tensor goes straight into the engine's dtype
                unet = UNet2DConditionModel.from_config(like.config)
            unet.load_state_dict({k: fh.get_tensor(k).to(dtype) for k in keys}, strict=True, assign=True)
            return unet
    with tempfile.TemporaryDirectory() as folder:  # from_single_file wants the config as a folder
        like.save_config(Path(folder) / "unet")
        return UNet2DConditionModel.from_single_file(str(path), config=folder, subfolder="unet", dtype=dtype, local_files_only=True)
