"""The original (CompVis / SGM) single-file checkpoint layout of the UNet families, written from diffusers
state dicts: the inverse of what `from_single_file` reads. Used to make checkpoint fixtures."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from mixdiff_cli.families.unet_geometry import diffusers_to_sgm

# where each family's text encoders live in its single file: (component, prefix, layout)
CLIP, OPENCLIP = "clip", "openclip"
TEXT_LAYOUT = {
    "sd1": (("text_encoder", "cond_stage_model.transformer.", CLIP),),
    "sd2": (("text_encoder", "cond_stage_model.model.", OPENCLIP),),
    "sdxl": (("text_encoder", "conditioner.embedders.0.transformer.", CLIP), ("text_encoder_2", "conditioner.embedders.1.model.", OPENCLIP)),
}


def openclip_text(prefix: str, state: Mapping[str, Any]) -> dict[str, Any]:
    """A transformers CLIP text encoder's weights under OpenCLIP's names: q/k/v packed into `attn.in_proj_weight`."""
    import torch

    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {}
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[f"{dst}attn.out_proj.{kind}"] = state[f"{src}self_attn.out_proj.{kind}"]
            out[f"{dst}ln_1.{kind}"], out[f"{dst}ln_2.{kind}"] = state[f"{src}layer_norm1.{kind}"], state[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"], out[f"{dst}mlp.c_proj.{kind}"] = state[f"{src}mlp.fc1.{kind}"], state[f"{src}mlp.fc2.{kind}"]
    out[f"{prefix}token_embedding.weight"] = state["embeddings.token_embedding.weight"]
    out[f"{prefix}positional_embedding"] = state["embeddings.position_embedding.weight"]
    out[f"{prefix}ln_final.weight"], out[f"{prefix}ln_final.bias"] = state["final_layer_norm.weight"], state["final_layer_norm.bias"]
    if "text_projection.weight" in state:
        out[f"{prefix}text_projection"] = state["text_projection.weight"].T
    return out


def checkpoint_state(family: str, unet_state: Mapping[str, Any], unet_config: Mapping[str, Any], texts: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """`model.diffusion_model.<SGM name>` for the UNet, and each text encoder in `texts` under its family's
    prefix (the VAE's `first_stage_model.` keys are left out: nothing here reads them)."""
    out = {}
    for key, value in unet_state.items():
        module, _, leaf = key.rpartition(".")
        out[f"model.diffusion_model.{diffusers_to_sgm(module, dict(unet_config))}.{leaf}"] = value
    for component, prefix, layout in TEXT_LAYOUT[family]:
        if component not in texts:
            continue
        if layout == OPENCLIP:
            out |= openclip_text(prefix, texts[component])
        else:
            out |= {f"{prefix}text_model.{k.removeprefix('text_model.')}": v for k, v in texts[component].items()}
    return out
