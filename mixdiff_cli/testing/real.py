"""Real geometry without weights: public bases built on the meta device from their families' configs, and
header-only safetensors files of real size (a LoRA, a single-file checkpoint) whose data is a sparse hole."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

from mixdiff_cli import families
from mixdiff_cli.testing.loras import ATTN, TEXT_ATTN


def write_header_only(path: str | Path, tensors: Mapping[str, tuple[str, list[int]]], metadata: Mapping[str, str] | None = None,
                      values: Mapping[str, bytes] | None = None) -> Path:
    """A valid safetensors file of `{name: (dtype, shape)}` whose data section is a sparse hole (zeros),
    except `values` (raw little-endian bytes of small tensors, e.g. alphas). Real-size files cost a header."""
    from mixdiff_cli.catalog.headers import DTYPE_BITS

    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = DTYPE_BITS[dtype]
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size // 8]}
        offset += size // 8
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads its header to 8 bytes
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, data in (values or {}).items():
            f.seek(8 + len(raw) + header[name]["data_offsets"][0])
            f.write(data)
        f.truncate(8 + len(raw) + offset)
    return path


def public(name: str) -> tuple[families.Family, dict[str, dict]]:
    """A public base ("sd15", "sd21", "sdxl", ...): its family and its configs by component."""
    from mixdiff_cli.catalog.geometry import public_configs

    family, configs = public_configs()[name]
    return families.get(family), configs


def real_state(name: str) -> dict[str, dict]:
    """A public base's denoiser and text encoders as meta-device tensors (shapes, no memory), built by
    diffusers and transformers from the classes and configs its family keeps: component -> state dict."""
    import diffusers
    import torch
    import transformers
    from accelerate import init_empty_weights

    family, configs = public(name)
    out = {}
    with init_empty_weights():
        config = configs[family.denoiser]
        out[family.denoiser] = getattr(diffusers, config["_class_name"]).from_config(config).state_dict()
        for component in family.text_encoders:
            if component in configs:
                cls = getattr(transformers, configs[component]["architectures"][0])
                state = cls(cls.config_class(**{k: v for k, v in configs[component].items() if k != "architectures"})).state_dict()
                # transformers 5 names CLIPTextModel's keys without "text_model."
                out[component] = {k.removeprefix("text_model."): v for k, v in state.items() if v.dtype != torch.long}
    return out


def write_real_lora(name: str, out_path: str | Path, layout: str, rank: int = 4, alpha: float = 2.0) -> Path:
    """A header-only LoRA on every attention projection of a public base's denoiser and text encoders, in the
    kohya (`kohya`) or diffusers-script (`diffusers-script`) layout, fp16 with real alpha scalars."""
    family, configs = public(name)
    tensors: dict[str, tuple[str, list[int]]] = {}
    values = {}
    for component, state in real_state(name).items():
        for key, value in state.items():
            module = key.removesuffix(".weight")
            if not key.endswith(".weight") or not module.endswith(ATTN if component == family.denoiser else TEXT_ATTN):
                continue
            if component != family.denoiser:
                module = f"text_model.{module}"
            fout, fin = value.shape[:2]
            if layout == "kohya":
                stem = family.kohya_stem(component, module, configs[family.denoiser])
                down, up, alpha_key = f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"
                tensors[alpha_key], values[alpha_key] = ("F16", []), struct.pack("<e", alpha)
            else:
                matrix = "lora" if component == family.denoiser else "lora_linear_layer"
                down, up = f"{component}.{module}.{matrix}.down.weight", f"{component}.{module}.{matrix}.up.weight"
            tensors[down], tensors[up] = ("F16", [rank, fin]), ("F16", [fout, rank])
    return write_header_only(out_path, tensors, {"ss_network_dim": str(rank)} if layout == "kohya" else None, values)


def write_real_checkpoint(name: str, out_path: str | Path, in_channels: int = 4) -> Path:
    """A header-only original single-file checkpoint (fp16) of a public base, denoiser and text encoders, with
    its model-spec architecture (and prediction type for v-models); `in_channels=9`: an inpainting UNet."""
    import torch

    family, configs = public(name)
    state = real_state(name)
    conv_in = state[family.denoiser]["conv_in.weight"]
    state[family.denoiser]["conv_in.weight"] = torch.empty((conv_in.shape[0], in_channels, *conv_in.shape[2:]), device="meta")
    texts = {k: v for k, v in state.items() if k != family.denoiser}
    tensors = family.checkpoint_state(state[family.denoiser], configs[family.denoiser], texts)
    metadata = {"modelspec.architecture": family.modelspec_architecture.removesuffix("/lora")}
    if configs["scheduler"]["prediction_type"] == "v_prediction":
        metadata["modelspec.prediction_type"] = "v"
    return write_header_only(out_path, {k: ("F16", list(v.shape)) for k, v in tensors.items()}, metadata)
