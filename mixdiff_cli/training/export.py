"""The finished LoRA: its provenance header (mixdiff, SAI model spec, kohya keys), the diffusers-format file, its catalog entry."""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixdiff_cli import __version__
from mixdiff_cli.training.config import FineTuneConfig, Registration

if TYPE_CHECKING:
    from mixdiff_cli.families.base import Family
    from mixdiff_cli.training.plan import Plan



def base_hash(path: str | Path) -> str:
    """sha256 of the base UNet's weight file(s): what a LoRA was trained against."""
    folder = Path(path) / "unet"
    files = sorted(folder.glob("*.safetensors")) or sorted(p for p in folder.glob("*.bin"))
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Provenance:
    """What a LoRA was trained against and on."""

    name: str
    arch: str  # sd1, sd2, sdxl
    base_sha256: str
    dataset_hash: str
    resolution: int
    steps: int


def lora_metadata(prov: Provenance, cfg: FineTuneConfig, base_loss: float | None, lora_loss: float | None) -> dict[str, str]:
    """safetensors header entries: our own `mixdiff.*`, the SAI model spec (`modelspec.*`) and the
    kohya `ss_*` keys that web UIs read."""
    from mixdiff_cli import families

    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    family = families.get(prov.arch)
    name, steps, resolution = prov.name, prov.steps, prov.resolution
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": name,
        "modelspec.trigger_phrase": ", ".join(cfg.trigger),
        "modelspec.date": today,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "mixdiff.version": __version__,
        "mixdiff.base_sha256": prov.base_sha256,
        "mixdiff.arch": prov.arch,
        "mixdiff.rank": str(cfg.rank),
        "mixdiff.alpha": str(cfg.lora_alpha),
        "mixdiff.target": ",".join(cfg.target_modules()),
        "mixdiff.train_text_encoder": str(cfg.train_text_encoder).lower(),
        "mixdiff.steps": str(steps),
        "mixdiff.learning_rate": str(cfg.lr),
        "mixdiff.dataset_sha256": prov.dataset_hash,
        "mixdiff.trigger": json.dumps(cfg.trigger),
        "mixdiff.resolution": str(resolution),
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(cfg.lora_alpha),
        "ss_steps": str(steps),
        "ss_learning_rate": str(cfg.lr),
        "ss_base_model_version": family.kohya_base_version,
        "ss_output_name": name,
    }
    if base_loss is not None and lora_loss is not None:
        meta["mixdiff.val_loss_base"] = f"{base_loss:.6f}"
        meta["mixdiff.val_loss_lora"] = f"{lora_loss:.6f}"
    return meta


def _text_encoder_layers(family: Family, encoders: list[Any], te_config: Any) -> dict[str, Any]:
    """`save_lora_weights` arguments of the trained text encoders, named by their pipeline components."""
    from peft.utils import get_peft_model_state_dict

    kwargs: dict[str, Any] = {}
    for key, enc in zip(family.text_encoders, encoders):
        kwargs[f"{key}_lora_layers"] = get_peft_model_state_dict(enc)
        kwargs[f"{key}_lora_adapter_metadata"] = te_config.to_dict()
    return kwargs


def export_lora(path: Path, family: Family, unet: Any, unet_config: Any, encoders: list[Any], te_config: Any, metadata: dict[str, str]) -> Path:
    """Write a diffusers-format LoRA (save_lora_weights, PEFT key names `unet.*.lora_A.weight` as
    diffusers' own `save_lora_adapter` writes them) with `metadata` in its header, atomically."""
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mixdiff_cli.core.fsutil import atomic_path

    kwargs: dict[str, Any] = {
        f"{family.denoiser}_lora_layers": get_peft_model_state_dict(unet),
        f"{family.denoiser}_lora_adapter_metadata": unet_config.to_dict(),  # carries lora_alpha, so alpha != rank loads right
        **_text_encoder_layers(family, encoders, te_config),
    }
    cls = family.lora_writer()
    with atomic_path(path) as tmp:
        cls.save_lora_weights(tmp.parent, weight_name=tmp.name, **kwargs)
        with safe_open(tmp, "pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            header = dict(fh.metadata() or {})
        save_file(tensors, tmp, metadata={**header, **metadata})
    return path


def register_expert(plan: Plan, lora_path: Path, registration: Registration, steps: int) -> None:
    """Add the finished LoRA to the catalog, with the dataset's captions as the prompts the router learns from."""
    from mixdiff_cli.experts.manage import add_expert

    ds = plan.ds
    add_expert(
        plan.cat.path, str(lora_path), name=plan.name, trigger=list(plan.cfg.trigger),
        prompts=list(dict.fromkeys(r.caption for r in ds.records))[:32],  # what the router learns from
        description=registration.description if registration.description is not None else f"LoRA fine-tuned on {len(ds)} images of {ds.root.name} ({steps} steps)",
    )
