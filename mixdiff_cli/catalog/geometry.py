"""The geometry of a base model: its UNet, text-encoder and scheduler configs, from which the shape of
every module a LoRA may target is derived. Reads JSON configs only (no torch).

The public configs of the real checkpoints are kept literally, as their ``config.json`` files on the
Hub say (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1,
stabilityai/stable-diffusion-xl-base-1.0), so that a file can be checked against a real base without
its weights; ``tests/test_compat.py`` builds each on the meta device and compares every module.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

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

PUBLIC: dict[str, dict[str, dict]] = {
    # runwayml/stable-diffusion-v1-5
    "sd15": {
        "unet": {**_SD_UNET, "attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64},
        "text_encoder": _CLIP_L,
        "scheduler": {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                      "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1, "num_train_timesteps": 1000,
                      "prediction_type": "epsilon"},
    },
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
PUBLIC_ARCH = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}


@dataclass
class Geometry:
    """What a file must fit: the base UNet's config, its text encoders' configs and its prediction type."""

    unet: dict
    text_encoders: dict[str, dict] = field(default_factory=dict)  # "text_encoder" / "text_encoder_2" -> config
    prediction_type: str | None = None  # "epsilon" | "v_prediction" | "sample"; None: not known


def public_geometry(name: str) -> Geometry:
    """The geometry of a public checkpoint ("sd15", "sd21", "sdxl")."""
    cfg = PUBLIC[name]
    return Geometry(cfg["unet"], {k: v for k, v in cfg.items() if k.startswith("text_encoder")}, cfg["scheduler"]["prediction_type"])


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def read_geometry(folder: Path) -> Geometry | None:
    """The geometry of a diffusers pipeline folder from its config files; None without a UNet config."""
    unet = _json(folder / "unet" / "config.json")
    if unet is None:
        return None
    encoders = {name: cfg for name in ("text_encoder", "text_encoder_2") if (cfg := _json(folder / name / "config.json"))}
    scheduler = _json(folder / "scheduler" / "scheduler_config.json") or {}
    return Geometry(unet, encoders, scheduler.get("prediction_type", "epsilon" if scheduler else None))


def text_module_shape(path: str, cfg: dict) -> tuple[int, int] | None:
    """(in, out) features of a Linear in a transformers CLIP text model with config ``cfg``; None: no such module.

    Paths may keep the ``text_model.`` level that transformers 4 (and every kohya file) has.
    """
    path = path.removeprefix("text_model.")
    hidden, inner = cfg["hidden_size"], cfg["intermediate_size"]
    if path == "text_projection":  # CLIPTextModelWithProjection only (SDXL's text_encoder_2)
        with_projection = "CLIPTextModelWithProjection" in (cfg.get("architectures") or [])
        return (hidden, cfg.get("projection_dim") or hidden) if with_projection else None
    m = re.match(r"encoder\.layers\.(\d+)\.(.+)$", path)
    if not m or int(m.group(1)) >= cfg["num_hidden_layers"]:
        return None
    linears = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden), "self_attn.v_proj": (hidden, hidden),
               "self_attn.out_proj": (hidden, hidden), "mlp.fc1": (hidden, inner), "mlp.fc2": (inner, hidden)}  # fmt: skip
    return linears.get(m.group(2))
