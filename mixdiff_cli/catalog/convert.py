"""LoRA key layouts, and the conversions that turn a layout diffusers cannot load into one it loads exactly.

Key layouts (component: a pipeline component the families name (`families.components()`); module: its dotted path):

    PEFT                  [base_model.model.]<module>.lora_A[.<adapter>].weight / .lora_B...   (save_pretrained)
    diffusers, PEFT keys  <component>.<module>.lora_A.weight / .lora_B.weight                   (save_lora_weights)
    diffusers, scripts    <component>.<module>.lora.down.weight / .lora.up.weight; text encoders
                          .lora_linear_layer.down/up (convert_state_dict_to_diffusers(get_peft_model_state_dict(m)))
    attention processors  [unet.]<block>.attn1.processor.to_q_lora.down.weight (unet.save_attn_procs, diffusers < 0.19)
    network alphas        <component>.<module>.alpha beside any of these

kohya keys (``lora_unet_…``) are read in ``formats``; diffusers converts them itself. Importing this
module needs no torch; the conversions import it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mixdiff_cli import families

_ATTN = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
         "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}  # fmt: skip
# (pattern, layout); group 1: module path, group 2: which matrix
_PATTERNS = (
    (re.compile(r"(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$"), "attn-procs"),
    (re.compile(r"(.+)\.lora(?:_linear_layer)?\.(down|up)\.weight$"), "script"),
    (re.compile(r"(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight$"), "peft"),
    (re.compile(r"(.+)\.lora_(B)(?:\.[^.]+)?\.bias$"), "bias"),
    (re.compile(r"(.+)\.(alpha)$"), "alpha"),
)
_ROLES = {"down": "down", "A": "down", "up": "up", "B": "up", "alpha": "alpha"}


@dataclass(frozen=True)
class LoraKey:
    """One tensor of a diffusers / PEFT LoRA file."""

    component: str  # a pipeline component (`families.components()`)
    module: str  # dotted path inside the component
    role: str  # down | up | bias | alpha
    layout: str  # peft | script | attn-procs | bias | alpha
    prefixed: bool  # the key names its component


def _split_component(path: str) -> tuple[str, str, bool]:
    path = path.removeprefix("base_model.model.")
    head, _, rest = path.partition(".")
    if head in families.components() and rest:
        return head, rest, True
    return ("text_encoder" if path.startswith("text_model.") else "unet"), path, False


def parse_key(key: str) -> LoraKey | None:
    """The component, module, role and layout of a diffusers / PEFT LoRA key; None: not a LoRA key."""
    for pattern, layout in _PATTERNS:
        m = pattern.match(key)
        if not m:
            continue
        component, module, prefixed = _split_component(m.group(1))
        if layout == "attn-procs":
            module = f"{module}.{_ATTN['unet' if component == 'unet' else 'text'][m.group(2)]}"
            return LoraKey(component, module, m.group(3), layout, prefixed)
        role = "bias" if layout == "bias" else _ROLES[m.group(2)]
        return LoraKey(component, module, role, layout, prefixed)
    return None


def peft_pattern(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """A PEFT rank_pattern / alpha_pattern value for `module`: a key matches the end of its path, as PEFT's."""
    return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", module)), default)


def _scale(module: str, rank: int, alphas: Mapping[tuple[str, str], float], key: tuple[str, str], peft_config: Mapping | None) -> float:
    """alpha / r of one module: its own ``.alpha`` tensor, else the PEFT config (alpha_pattern, rsLoRA), else 1."""
    if key in alphas:
        return alphas[key] / rank
    if not peft_config or peft_config.get("lora_alpha") is None:
        return 1.0
    alpha = peft_pattern(peft_config.get("alpha_pattern") or {}, module, peft_config["lora_alpha"])
    return alpha / (rank**0.5 if peft_config.get("use_rslora") else rank)


def diffusers_lora(state: Mapping[str, Any], peft_config: Mapping | None = None) -> dict[str, Any]:
    """A diffusers / PEFT LoRA state dict in the one layout ``load_lora_weights`` reads in full:
    ``<component>.<module>.lora_A.weight`` / ``.lora_B.weight`` with each module's alpha/r folded into
    lora_B (exact: (alpha/r) B A = B' A), so that no alpha needs to travel beside it."""
    parsed = {k: parse_key(k) for k in state}
    unknown = [k for k, p in parsed.items() if p is None]
    if unknown:
        raise ValueError(f"not a LoRA key: {unknown[0]}")
    alphas = {(p.component, p.module): float(state[k]) for k, p in parsed.items() if p.role == "alpha"}
    ranks = {(p.component, p.module): state[k].shape[0] for k, p in parsed.items() if p.role == "down"}
    out = {}
    for key, p in parsed.items():
        if p.role == "alpha":
            continue
        tensor = state[key]
        if p.role in ("up", "bias"):
            tensor = tensor * _scale(p.module, ranks[(p.component, p.module)], alphas, (p.component, p.module), peft_config)
        name = {"down": "lora_A.weight", "up": "lora_B.weight", "bias": "lora_B.bias"}[p.role]
        out[f"{p.component}.{p.module}.{name}"] = tensor
    return out


def saved_modules_as_lora(saved: Mapping[str, Any], base_layer: Callable[[str], Any]) -> dict[str, Any]:
    """PEFT ``modules_to_save`` (whole replacement Linear / Conv2d modules) as exact full-rank LoRA deltas
    on the base: A = W' - W (out, in[, kh, kw]), B = I (out, out[, 1, 1]), B.bias = b' - b, so that
    B A x + B.bias = (W' - W) x + (b' - b). ``base_layer(path)`` is the base model's module at ``path``."""
    import torch

    out = {}
    for module in sorted({k.rpartition(".")[0] for k in saved}):
        layer = base_layer(module)
        weight = saved[f"{module}.weight"].to(layer.weight.dtype)
        n_out = weight.shape[0]
        eye = torch.eye(n_out, dtype=weight.dtype).reshape(n_out, n_out, *([1] * (weight.dim() - 2)))
        out[f"{module}.lora_A.weight"] = weight - layer.weight.detach().cpu()
        out[f"{module}.lora_B.weight"] = eye
        bias = saved.get(f"{module}.bias")
        base_bias = layer.bias.detach().cpu() if layer.bias is not None else torch.zeros(n_out, dtype=weight.dtype)
        out[f"{module}.lora_B.bias"] = (bias.to(weight.dtype) if bias is not None else base_bias) - base_bias
    return out


def with_saved_modules(state: Mapping[str, Any], config: Mapping, base_layer: Callable[[str], Any]) -> tuple[dict[str, Any], dict]:
    """A PEFT adapter with ``modules_to_save`` as one plain LoRA: (state dict, LoraConfig kwargs).

    The saved modules become full-rank deltas (``saved_modules_as_lora``) at scale 1; every LoRA module
    gets a zero lora_B bias, since PEFT's ``lora_bias`` is one switch for the whole adapter."""
    import torch

    lora = {k: v for k, v in state.items() if parse_key(k) is not None}
    deltas = saved_modules_as_lora({k: v for k, v in state.items() if k not in lora}, base_layer)
    for key, tensor in list(lora.items()):
        if re.search(r"\.lora_B(\.[^.]+)?\.weight$", key) and key.replace(".weight", ".bias") not in lora:
            lora[key.replace(".weight", ".bias")] = torch.zeros(tensor.shape[0], dtype=tensor.dtype)
    modules = sorted({k.rsplit(".", 2)[0] for k in deltas})
    ranks = {m: deltas[f"{m}.lora_B.weight"].shape[0] for m in modules}
    targets = config.get("target_modules") or []
    if isinstance(targets, str):  # a regex PEFT matches in full
        targets = "|".join([f"(?:{targets})"] + [re.escape(m) for m in modules])
    else:
        targets = list(targets) + modules
    kwargs = {
        **config, "target_modules": targets, "lora_bias": True, "modules_to_save": None,
        "rank_pattern": {**ranks, **(config.get("rank_pattern") or {})},
        # scale 1 for the deltas: alpha = r (or sqrt(r) under rsLoRA)
        "alpha_pattern": {**{m: (r**0.5 if config.get("use_rslora") else r) for m, r in ranks.items()}, **(config.get("alpha_pattern") or {})},
    }  # fmt: skip
    return {**lora, **deltas}, kwargs


def drop_unused_lora_bias(model: Any, adapter: str) -> int:
    """After loading ``with_saved_modules``' adapter: take the (zero) lora_B bias off layers whose base has no
    bias, so that they can still be fused (PEFT cannot merge a LoRA bias into a bias-less layer). Returns
    how many layers keep one."""
    from peft.tuners.lora.layer import LoraLayer

    kept = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and module.lora_bias.get(adapter):
            if module.get_base_layer().bias is None and not module.lora_B[adapter].bias.any():
                module.lora_B[adapter].bias = None
                module.lora_bias[adapter] = False
            else:
                kept += 1
    return kept
