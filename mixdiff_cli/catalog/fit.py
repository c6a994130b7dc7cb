"""Whether a candidate expert fits the base: its family, the shapes of every module it targets, a whole
model's inputs and conditioning."""

from __future__ import annotations


from mixdiff_cli import families
from mixdiff_cli.catalog.geometry import Geometry, text_module_shape
from mixdiff_cli.core.errors import MixdiffError

from mixdiff_cli.catalog.formats import SourceInfo


class ArchitectureMismatch(MixdiffError):
    pass




# ---------------------------------------------------------------------------------------------
# fitting the base


def _text_fit(shapes: dict[tuple[str, str], tuple[int, int]], encoders: dict[str, dict]) -> str | None:
    """Why text-encoder LoRA modules do not fit the base's text encoders (skipped when their configs are unknown)."""
    if not encoders:
        return None
    for (component, path), (fin, fout) in sorted(shapes.items()):
        if component not in encoders:
            return f"LoRA adapts {component}, which the base does not have"
        want = text_module_shape(path, encoders[component])
        if want is None:
            return f"LoRA module {component}.{path} does not exist in the base's {component}"
        if (fin, fout) != want:
            return f"LoRA shapes ({component}.{path}: {fin}->{fout}) do not match the base's {component} ({want[0]}->{want[1]})"
    return None


def _model_fit(info: SourceInfo, base: Geometry) -> str | None:
    """Why a full model cannot stand in for the base UNet: input channels, conditioning, shapes, prediction type."""
    if info.prediction_type and base.prediction_type and info.prediction_type != base.prediction_type:
        return f"model predicts {info.prediction_type}, the base predicts {base.prediction_type}"
    return families.of_config(base.denoiser).model_fit(info.unet_config, info.unet_shapes, base.denoiser)


def fits_base(info: SourceInfo, base: dict | Geometry) -> str | None:
    """None if ``info`` fits the base (its UNet config, or its whole ``Geometry``), else why not (one line).

    Every module a LoRA targets must exist in the base with the same (in, out) features, text encoders
    included when their configs are known; a full model must take the base's inputs and conditioning.
    """
    base = base if isinstance(base, Geometry) else Geometry(base)
    family = families.of_config(base.denoiser)
    noun = "LoRA" if info.kind == "lora" else "model"
    if info.arch and info.arch_from != "default" and info.arch != family.name:
        return f"{noun} for {families.label(info.arch)}, base is {family.label}"
    if info.kind == "model":
        return _model_fit(info, base)
    shapes = {**info.unet_shapes, **info.saved_shapes}
    return family.denoiser_fit(shapes, base.denoiser, "LoRA") or _text_fit(info.text_shapes, base.text_encoders)


def require_fit(info: SourceInfo, base: dict | Geometry) -> None:
    """Raise ArchitectureMismatch unless ``info`` fits the base (a UNet config or a ``Geometry``)."""
    if reason := fits_base(info, base):
        raise ArchitectureMismatch(reason, "add it to a catalog whose base has the same architecture")


