"""The compatibility corpus (tests/test_compat.py): random LoRAs and full models of a tiny pipeline in each
public tool's exact key layout, and the adapter kinds mixdiff refuses by name."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mixdiff_cli.testing.loras import (
    ATTN,
    TEXT_ATTN,
    LoraSpec,
    denoiser_lora,
    kohya_state,
    randomize_lora,
    text_loras,
)
from mixdiff_cli.testing.pipelines import (
    component_class,
    family_of,
    load_component,
    own_rng,
    set_prediction_type,
)

__all__ = ["ATTN", "TEXT_ATTN", "LOCON", "LAYOUTS", "REFUSED", "make_layout", "make_refused", "make_full_layout"]

# kohya LoCon: Linear and 1x1 convs of the transformers plus the ResNet / resampler convs (conv_dim)
LOCON = ATTN + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut", "time_emb_proj",
                "downsamplers.0.conv", "upsamplers.0.conv")  # fmt: skip
# the LoRA layouts make_layout writes (see its docstring), and the refused adapter kinds
LAYOUTS = ("diffusers-peft", "diffusers-noalpha", "diffusers-script", "diffusers-alphas", "attn-procs", "kohya", "kohya-locon",
           "kohya-fp16", "kohya-bf16", "kohya-te", "peft", "peft-modules-to-save")  # fmt: skip
REFUSED = ("loha", "lokr", "ia3", "kohya-dora", "peft-dora", "peft-loha", "peft-ia3")
_WITH_TEXT = ("diffusers-script", "diffusers-alphas", "kohya", "kohya-fp16", "kohya-bf16", "kohya-te")


@own_rng
def make_layout(pipe_folder: str | Path, out_path: str | Path, layout: str, seed: int = 0, rank: int = 4,
                alpha: float | None = None, scale: float = 0.05) -> Path:
    """Write a random LoRA for `pipe_folder` in one tool's exact key layout (`LAYOUTS`); returns the file
    (the folder for PEFT).

    diffusers-peft: `save_lora_weights` of PEFT keys with `lora_adapter_metadata` (alpha);
    diffusers-noalpha: the same without metadata (scale 1);
    diffusers-script: the training scripts' `convert_state_dict_to_diffusers(get_peft_model_state_dict(m))`
    (`unet.….lora.down.weight`, `text_encoder….lora_linear_layer.down.weight`), text encoders included;
    diffusers-alphas: script keys plus `unet.<module>.alpha` network alphas;
    attn-procs: `unet.save_attn_procs` of diffusers < 0.19 (`….attn1.processor.to_q_lora.down.weight`);
    kohya / kohya-fp16 / kohya-bf16: sd-scripts names with `.alpha`, denoiser and text encoders, in that dtype;
    kohya-locon: conv layers too (LoCon); kohya-te: text encoders only;
    peft / peft-modules-to-save: `get_peft_model(unet, config).save_pretrained` (the latter saving conv_out whole).
    """
    import torch

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    pipe_folder, out_path = Path(pipe_folder), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    spec = LoraSpec(rank=rank, seed=seed, scale=scale, targets=LOCON if layout == "kohya-locon" else ATTN, alpha=alpha)
    gen = torch.Generator().manual_seed(seed)
    if layout.startswith("peft"):
        return _peft_folder(pipe_folder, out_path, spec, gen, saved=("conv_out",) if layout.endswith("save") else ())
    denoiser = family_of(pipe_folder).denoiser
    parts = {} if layout == "kohya-te" else {denoiser: denoiser_lora(pipe_folder, spec, gen)[0]}
    if layout in _WITH_TEXT:
        parts |= {name: state for name, (state, _) in text_loras(pipe_folder, spec, gen).items()}
    if layout.startswith("kohya"):
        from safetensors.torch import save_file

        dtype = {"kohya-fp16": torch.float16, "kohya-bf16": torch.bfloat16}.get(layout, torch.float32)
        metadata = {"ss_network_dim": str(rank), "ss_network_alpha": f"{spec.lora_alpha:g}"}
        save_file(kohya_state(pipe_folder, parts, spec.lora_alpha, dtype), out_path, metadata=metadata)
        return out_path
    if layout == "attn-procs":
        return _attn_procs(parts[denoiser], out_path)
    return _diffusers_file(pipe_folder, out_path, layout, parts, spec)


def _attn_procs(state: dict[str, Any], out_path: Path) -> Path:
    """diffusers < 0.19's `save_attn_procs` keys: `….attn1.processor.to_q_lora.down.weight`."""
    from safetensors.torch import save_file

    old = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
    out = {}
    for key, value in state.items():
        module, _, matrix = key.rpartition(".lora_")
        block, _, proj = module.rpartition(".attn")  # …transformer_blocks.0 / 1.to_q
        number, _, name = proj.partition(".")
        out[f"{block}.attn{number}.processor.{old[name]}.{'down' if matrix.startswith('A') else 'up'}.weight"] = value.contiguous()
    save_file(out, out_path)
    return out_path


def _diffusers_file(pipe_folder: Path, out_path: Path, layout: str, parts: dict[str, dict], spec: LoraSpec) -> Path:
    """The diffusers layouts: `save_lora_weights` of PEFT keys (with or without adapter metadata) or of the
    training scripts' converted keys (with or without network alphas)."""
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers

    family = family_of(pipe_folder)
    peft_keys = layout in ("diffusers-peft", "diffusers-noalpha")
    kwargs: dict[str, Any] = {f"{name}_lora_layers": state if peft_keys else convert_state_dict_to_diffusers(state) for name, state in parts.items()}
    if layout == "diffusers-peft":
        from peft import LoraConfig

        config = LoraConfig(r=spec.rank, lora_alpha=spec.lora_alpha, target_modules=list(spec.targets))
        kwargs[f"{family.denoiser}_lora_adapter_metadata"] = config.to_dict()
    family.lora_writer().save_lora_weights(out_path.parent, weight_name=out_path.name, **kwargs)
    if layout == "diffusers-alphas":  # network alphas, one scalar per module, beside the script's keys
        from safetensors.torch import load_file, save_file

        state = load_file(out_path)
        modules = {re.sub(r"\.(lora|lora_linear_layer)\.(down|up)\.weight$|\.lora_[AB]\.weight$", "", k) for k in state}
        save_file({**state, **{f"{m}.alpha": torch.tensor(spec.lora_alpha) for m in modules}}, out_path)
    return out_path


def _peft_folder(pipe_folder: Path, folder: Path, spec: LoraSpec, gen: Any, saved: tuple[str, ...] = ()) -> Path:
    """`get_peft_model(denoiser, LoraConfig(...)).save_pretrained(folder)`, PEFT's own adapter folder; modules
    in `saved` are kept whole (`modules_to_save`) and perturbed so that they matter."""
    import torch
    from peft import LoraConfig, get_peft_model

    denoiser = load_component(pipe_folder, family_of(pipe_folder).denoiser)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.lora_alpha, target_modules=list(ATTN), modules_to_save=list(saved) or None)
    model = get_peft_model(denoiser, config)
    randomize_lora(model, gen, spec.scale)
    with torch.no_grad():
        for name in saved:
            copy = model.base_model.model.get_submodule(name).modules_to_save["default"]
            for p in copy.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * spec.scale)
    model.save_pretrained(folder)
    return folder


@own_rng
def make_refused(pipe_folder: str | Path, out_path: str | Path, kind: str, rank: int = 4) -> Path:
    """An adapter kind other than plain LoRA (`REFUSED`, the kinds mixdiff refused by name before it read
    LyCORIS): LyCORIS LoHa / LoKr / (IA)^3 in kohya naming and PEFT LoHa (now applied, `catalog.lycoris`),
    kohya DoRA (`dora_scale`), PEFT DoRA and (IA)^3 folders (still refused)."""
    pipe_folder, out_path = Path(pipe_folder), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    family = family_of(pipe_folder)
    denoiser = load_component(pipe_folder, family.denoiser)
    if kind.startswith("peft-"):
        from peft import IA3Config, LoHaConfig, LoraConfig, get_peft_model

        config = {"peft-dora": LoraConfig(r=rank, lora_alpha=rank, target_modules=list(ATTN), use_dora=True),
                  "peft-loha": LoHaConfig(r=rank, alpha=rank, target_modules=list(ATTN)),
                  "peft-ia3": IA3Config(target_modules=["to_k", "to_v", "ff.net.2"], feedforward_modules=["ff.net.2"])}[kind]  # fmt: skip
        get_peft_model(denoiser, config).save_pretrained(out_path)
        return out_path
    from safetensors.torch import save_file

    state = {}
    for module, layer in denoiser.named_modules():
        if module.endswith(ATTN):
            stem = family.kohya_stem(family.denoiser, module, denoiser.config, original=False)
            state |= _lycoris(stem, kind, layer.weight.shape, rank)
    save_file({k: v.contiguous() for k, v in state.items()}, out_path)
    return out_path


def _lycoris(name: str, kind: str, shape: tuple[int, ...], rank: int) -> dict[str, Any]:
    """One module's random LyCORIS / kohya-DoRA tensors of `kind`."""
    import torch

    fout, fin = shape[:2]
    if kind == "loha":  # LyCORIS LoHa: dW = (w1_a w1_b) * (w2_a w2_b), scaled alpha / r
        state = {f"{name}.hada_w1_a": torch.randn(fout, rank), f"{name}.hada_w1_b": torch.randn(rank, fin),
                 f"{name}.hada_w2_a": torch.randn(fout, rank), f"{name}.hada_w2_b": torch.randn(rank, fin)}  # fmt: skip
    elif kind == "lokr":  # LyCORIS LoKr: dW = kron(w1, w2_a w2_b)
        state = {f"{name}.lokr_w1": torch.randn(2, 2), f"{name}.lokr_w2_a": torch.randn(fout // 2, rank),
                 f"{name}.lokr_w2_b": torch.randn(rank, fin // 2)}  # fmt: skip
    elif kind == "ia3":  # LyCORIS (IA)^3: a learned scale per output feature
        return {f"{name}.weight": torch.randn(fout), f"{name}.on_input": torch.tensor(False)}
    elif kind == "kohya-dora":  # kohya / LyCORIS DoRA: a LoRA plus a magnitude per output feature
        state = {f"{name}.lora_down.weight": torch.randn(rank, fin), f"{name}.lora_up.weight": torch.randn(fout, rank),
                 f"{name}.dora_scale": torch.randn(fout, 1)}  # fmt: skip
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(REFUSED)}")
    return state | {f"{name}.alpha": torch.tensor(float(rank))}


@own_rng
def make_full_layout(pipe_folder: str | Path, out_path: str | Path, kind: str, seed: int = 5) -> Path:
    """A full-model expert of `pipe_folder`'s geometry with other weights (from `seed`), laid out as:

    fp16-variant: a diffusers denoiser folder holding only `diffusion_pytorch_model.fp16.safetensors`;
    single-file: an original checkpoint (`Family.checkpoint_state`) with the denoiser and text encoders;
    v-prediction: a diffusers pipeline folder whose scheduler predicts v;
    inpainting / inpainting-file: a 9-input-channel denoiser as a folder / an original single file.
    """
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from mixdiff_cli.families.unet_tiny import SEED_UNET

    pipe_folder, out_path = Path(pipe_folder), Path(out_path)
    family = family_of(pipe_folder)
    cls = component_class(pipe_folder, family.denoiser)
    config = dict(cls.load_config(pipe_folder / family.denoiser))
    torch.manual_seed(seed + SEED_UNET)
    model = cls.from_config({**config, "in_channels": 9} if kind.startswith("inpainting") else config)
    if kind == "fp16-variant":
        model.half().save_pretrained(out_path, variant="fp16", safe_serialization=True)
    elif kind in ("single-file", "inpainting-file"):
        texts = {n: load_file(pipe_folder / n / "model.safetensors") for n in family.text_encoders if (pipe_folder / n).is_dir()}
        state = family.checkpoint_state(model.state_dict(), dict(model.config), texts)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, out_path, metadata={"format": "pt"})
    elif kind == "v-prediction":
        shutil.copytree(pipe_folder, out_path, dirs_exist_ok=True)
        model.save_pretrained(out_path / family.denoiser, safe_serialization=True)
        set_prediction_type(out_path, "v_prediction")
    elif kind == "inpainting":
        model.save_pretrained(out_path, safe_serialization=True)
    else:
        raise ValueError(f"unknown full-model layout {kind!r}")
    return out_path
