"""Random LoRAs and second models for a tiny pipeline, written as the public tools write them: diffusers'
`save_lora_weights`, PEFT's adapter folder, kohya sd-scripts' keys. The family of the pipeline names its
components and kohya prefixes; nothing here knows a model class."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mixdiff_cli.core.fsutil import atomic_folder
from mixdiff_cli.testing.pipelines import (
    component_class,
    family_of,
    load_component,
    own_rng,
)

LoraFormat = Literal["diffusers", "peft", "kohya"]
ATTN = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(frozen=True)
class LoraSpec:
    """A random LoRA: `rank`, `alpha` (None: = rank, scale 1), the modules it targets, the seed of its
    weights and the spread of B (`scale`; nonzero so that the adapter acts)."""

    rank: int = 4
    seed: int = 0
    scale: float = 0.01
    targets: Iterable[str] = ATTN
    alpha: float | None = None

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


def randomize_lora(model: Any, generator: Any, scale: float) -> None:
    """A ~ N(0, 1/in) like PEFT's kaiming init; B ~ N(0, scale^2), nonzero so the adapter acts."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)
            elif ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)


def with_metadata(file: Path, metadata: Mapping[str, str] | None) -> Path:
    """Add string metadata to a safetensors file's header (rewrites the small file)."""
    if not metadata:
        return file
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = dict(f.metadata() or {})
    header.update({str(k): str(v) for k, v in metadata.items()})
    save_file(tensors, file, metadata=header)
    return file


def denoiser_lora(pipe_folder: Path, spec: LoraSpec, gen: Any, targets: Iterable[str] | None = None) -> tuple[dict, Any]:
    """A random PEFT LoRA on the pipeline's denoiser: (`get_peft_model_state_dict` keys, its LoraConfig)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = load_component(pipe_folder, family_of(pipe_folder).denoiser)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.lora_alpha, target_modules=list(targets or spec.targets), init_lora_weights=True)
    model.add_adapter(config)
    randomize_lora(model, gen, spec.scale)
    return get_peft_model_state_dict(model), config


def text_loras(pipe_folder: Path, spec: LoraSpec, gen: Any, published_names: bool = True) -> dict[str, tuple[dict, Any]]:
    """Random PEFT LoRAs on each text encoder the pipeline has: component -> (state, LoraConfig). With
    `published_names`, keys are named as transformers 4 (and every published file) names them:
    `text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight`."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    parts = {}
    config = LoraConfig(r=spec.rank, lora_alpha=spec.lora_alpha, target_modules=list(TEXT_ATTN), init_lora_weights=True)
    for name in family_of(pipe_folder).text_encoders:
        if not (pipe_folder / name).is_dir():
            continue
        # transformers' own add_adapter wants peft>=0.22; PEFT's injection works on any module
        te = inject_adapter_in_model(config, load_component(pipe_folder, name))
        randomize_lora(te, gen, spec.scale)
        state = get_peft_model_state_dict(te)
        if published_names:
            state = {("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in state.items()}
        parts[name] = (state, config)
    return parts


def kohya_state(pipe_folder: Path, parts: Mapping[str, Mapping[str, Any]], alpha: float, dtype: Any, original: bool = True) -> dict:
    """PEFT parts (component -> state) in kohya's layout: the family's key stem per module (`Family.kohya_stem`;
    `original`: sd-scripts' own module names, else diffusers' `convert_state_dict_to_kohya` names),
    `.lora_down` / `.lora_up` and a `.alpha` scalar per module, all in `dtype`."""
    import torch

    family = family_of(pipe_folder)
    config = dict(component_class(pipe_folder, family.denoiser).load_config(pipe_folder / family.denoiser))
    out = {}
    for component, state in parts.items():
        for key, value in state.items():
            module, _, matrix = key.rpartition(".lora_")
            stem = family.kohya_stem(component, module, config, original)
            out[f"{stem}.lora_{'down' if matrix.startswith('A') else 'up'}.weight"] = value.to(dtype).contiguous()
            out[f"{stem}.alpha"] = torch.tensor(alpha).to(dtype)
    return out


def make_lora(pipe_folder: str | Path, out_path: str | Path, fmt: LoraFormat = "diffusers", text_encoder: bool = False,
              metadata: Mapping[str, str] | None = None, **spec: Any) -> Path:
    """Write a random LoRA (`LoraSpec` fields: rank, seed, scale, targets, alpha) for the denoiser (and text
    encoders) of `pipe_folder` in one on-disk format; `metadata` goes into the safetensors header.

    diffusers: one `.safetensors` with `unet.`/`text_encoder.` keys (`save_lora_weights`);
    peft: a folder with `adapter_model.safetensors` + `adapter_config.json` (returns the folder);
    kohya: one `.safetensors` with the family's kohya keys (`.lora_down/.lora_up/.alpha`).
    """
    import torch

    if fmt not in ("diffusers", "peft", "kohya"):
        raise ValueError(f"unknown LoRA format {fmt!r}; expected diffusers, peft or kohya")
    if fmt == "peft" and text_encoder:
        raise ValueError("the peft format holds one model's adapter; use text_encoder=False")
    pipe_folder, out_path, lora = Path(pipe_folder), Path(out_path), LoraSpec(**spec)
    family = family_of(pipe_folder)
    gen = torch.Generator().manual_seed(lora.seed)
    parts = {family.denoiser: denoiser_lora(pipe_folder, lora, gen)}
    if text_encoder:
        parts |= text_loras(pipe_folder, lora, gen, published_names=False)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "diffusers":
        kwargs = {f"{name}_lora_layers": state for name, (state, _) in parts.items()}
        kwargs |= {f"{name}_lora_adapter_metadata": cfg.to_dict() for name, (_, cfg) in parts.items()}
        family.lora_writer().save_lora_weights(out_path.parent, weight_name=out_path.name, **kwargs)
        return with_metadata(out_path, metadata)
    from safetensors.torch import save_file

    if fmt == "peft":
        state, cfg = parts[family.denoiser]
        out_path.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(out_path)
        # PeftModel.save_pretrained keys: base_model.model.<module>.lora_A.weight
        save_file({f"base_model.model.{k}": v for k, v in state.items()}, out_path / "adapter_model.safetensors",
                  metadata={"format": "pt", **dict(metadata or {})})
        return out_path
    kohya = kohya_state(pipe_folder, {name: state for name, (state, _) in parts.items()}, lora.lora_alpha, torch.float32, original=False)
    save_file(kohya, out_path, metadata={"format": "pt", **dict(metadata or {})})
    return out_path


@own_rng
def make_full_model(pipe_folder: str | Path, out_folder: str | Path, seed: int = 1, single_file: str | Path | None = None) -> Path:
    """Save a second denoiser (same config, weights from `seed`) as a diffusers model folder.

    With `single_file`, also write it as an original-layout checkpoint (denoiser only), loadable with the
    family's `from_single_file(path, config=pipe_folder, subfolder=<denoiser>)`.
    """
    import torch

    from mixdiff_cli.families.unet_tiny import SEED_UNET

    pipe_folder = Path(pipe_folder)
    family = family_of(pipe_folder)
    cls = component_class(pipe_folder, family.denoiser)
    torch.manual_seed(seed + SEED_UNET)
    model = cls.from_config(cls.load_config(pipe_folder / family.denoiser))
    with atomic_folder(out_folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    if single_file is not None:
        from safetensors.torch import save_file

        state = family.checkpoint_state(model.state_dict(), dict(model.config), {})
        Path(single_file).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, Path(single_file), metadata={"format": "pt"})
    return Path(out_folder)
