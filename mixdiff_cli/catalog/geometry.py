"""The geometry of a base model: its denoiser, text-encoder and scheduler configs, from which the shape of
every module a LoRA may target is derived. Reads JSON configs only (no torch). The public configs of real
checkpoints are kept by their families (`Family.public`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from mixdiff_cli import families


@dataclass
class Geometry:
    """What a file must fit: the base denoiser's config, its text encoders' configs and its prediction type."""

    denoiser: dict
    text_encoders: dict[str, dict] = field(default_factory=dict)  # pipeline attribute -> config
    prediction_type: str | None = None  # "epsilon" | "v_prediction" | "sample"; None: not known


def public_configs() -> dict[str, tuple[str, dict[str, dict]]]:
    """Every registered family's public checkpoints: name ("sd15", ...) -> (family name, configs by component)."""
    return {name: (f, configs) for f in families.names() for name, configs in families.get(f).public.items()}


def public_geometry(name: str) -> Geometry:
    """The geometry of a public checkpoint ("sd15", "sd21", "sdxl", ...)."""
    arch, cfg = public_configs()[name]
    family = families.get(arch)
    return Geometry(cfg[family.denoiser], {k: cfg[k] for k in family.text_encoders if k in cfg}, cfg["scheduler"]["prediction_type"])


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def read_geometry(folder: Path) -> Geometry | None:
    """The geometry of a diffusers pipeline folder from its config files; None for a folder of no known family."""
    try:
        family = families.of_folder(folder)
    except (OSError, KeyError, ValueError):
        return None
    denoiser = _json(folder / family.denoiser / "config.json") if family is not None else None
    if denoiser is None:
        return None
    encoders = {name: cfg for name in family.text_encoders if (cfg := _json(folder / name / "config.json"))}
    scheduler = _json(folder / "scheduler" / "scheduler_config.json") or {}
    return Geometry(denoiser, encoders, scheduler.get("prediction_type", "epsilon" if scheduler else None))


def text_module_shape(path: str, cfg: dict) -> tuple[int, int] | None:
    """(in, out) features of a Linear in a transformers CLIP text model with config ``cfg``; None: no such module.

    Paths may keep the ``text_model.`` level that transformers 4 (and every kohya file) has.
    """
    path = path.removeprefix("text_model.")
    hidden, inner = cfg["hidden_size"], cfg["intermediate_size"]
    if path == "text_projection":  # CLIPTextModelWithProjection only (SDXL's second encoder)
        with_projection = "CLIPTextModelWithProjection" in (cfg.get("architectures") or [])
        return (hidden, cfg.get("projection_dim") or hidden) if with_projection else None
    m = re.match(r"encoder\.layers\.(\d+)\.(.+)$", path)
    if not m or int(m.group(1)) >= cfg["num_hidden_layers"]:
        return None
    linears = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden), "self_attn.v_proj": (hidden, hidden),
               "self_attn.out_proj": (hidden, hidden), "mlp.fc1": (hidden, inner), "mlp.fc2": (inner, hidden)}  # fmt: skip
    return linears.get(m.group(2))
