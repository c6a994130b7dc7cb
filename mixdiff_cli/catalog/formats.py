"""What a candidate expert is, read from headers and configs only: no tensor is loaded, no pickle opened.

A ``.safetensors`` file is 8 bytes of little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}``) and the raw data
(https://github.com/huggingface/safetensors#format). Everything here reads the first two parts.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixdiff_cli import families
from mixdiff_cli.catalog import lycoris
from mixdiff_cli.catalog.convert import parse_key
from mixdiff_cli.catalog.headers import (
    _PICKLE_HINT,
    PICKLE_SUFFIXES,
    NotSafetensors,
    PickleRefused,
    _looks_pickled,
    _read_scalars,
    read_header,
    sha256_file,
)
from mixdiff_cli.catalog.lora_keys import (
    UnknownLoraFormat,
    _lora_modules,
    _Parsed,
    _refuse_variant,
    module_type,
)
from mixdiff_cli.core.errors import MixdiffError

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


class SourceNotFound(MixdiffError):
    pass


class NoModelFound(MixdiffError):
    """A folder without any weights we know how to read."""


class AmbiguousSource(MixdiffError):
    """A folder with several candidate weight files."""


class BadSidecar(MixdiffError):
    """An A1111 ``<name>.json`` beside the weights that is not a JSON object."""


@dataclass
class SourceInfo:
    """A LoRA or full model as found on disk; ``unet_shapes`` maps UNet module -> (in, out) features."""

    kind: str  # "lora" | "model"
    format: str  # "diffusers" | "peft" | "kohya" | "diffusers-model" | "single-file"
    arch: str | None  # "sd1" | "sd2" | "sdxl" | None (unknown)
    file: Path  # the weights file (inside a folder source)
    rank: int | None = None  # largest LoRA rank
    alpha: float | None = None  # None: not stated; loaders then use alpha = rank
    targets: list[str] = field(default_factory=list)  # module types, e.g. ["to_k", "to_out.0", "to_q", "to_v"]
    has_text_encoder: bool = False
    title: str | None = None
    trigger: list[str] = field(default_factory=list)
    description: str | None = None
    preferred_weight: float | None = None
    sha256: str | None = None
    arch_from: str | None = None  # evidence for arch: "keys", "shapes", "config", "metadata" or "default"
    unet_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    unet_config: dict | None = None  # full diffusers models only
    metadata: dict[str, str] = field(default_factory=dict)  # the safetensors header's __metadata__
    text_shapes: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)  # (text encoder, module) -> (in, out)
    saved_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # PEFT modules_to_save -> (in, out)
    layout: str | None = None  # LoRA key layout: kohya | peft | diffusers-peft | diffusers-script | attn-procs
    convert: bool = False  # diffusers cannot load this layout as it is: catalog.convert makes it exact
    prediction_type: str | None = None  # full models: epsilon | v_prediction, when known
    lycoris: dict[str, int] = field(default_factory=dict)  # LyCORIS modules by kind ("LoHa 4x4": 96), rewritten as LoRAs (catalog.lycoris)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the per-module shapes)."""
        return {
            "kind": self.kind, "format": self.format, "arch": self.arch, "file": str(self.file),
            "rank": self.rank, "alpha": self.alpha, "targets": list(self.targets),
            "has_text_encoder": self.has_text_encoder, "title": self.title, "trigger": list(self.trigger),
            "description": self.description, "preferred_weight": self.preferred_weight, "sha256": self.sha256,
            "layout": self.layout, "modules_to_save": sorted(self.saved_shapes), "prediction_type": self.prediction_type,
            **({"lycoris": dict(self.lycoris)} if self.lycoris else {}),
        }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# metadata users ship


def _sidecar(file: Path) -> dict:
    """A1111's ``<name>.json`` beside the weights ("activation text", "preferred weight", ...)."""
    side = file.with_suffix(".json")
    if file.suffix != ".safetensors" or not side.is_file():
        return {}
    return _read_json(side, BadSidecar, "fix or delete that file; it holds the LoRA's trigger words")


def _split_trigger(text: str) -> list[str]:
    return [w.strip() for w in str(text).split(",") if w.strip()]


def _top_tags(tag_frequency: str, limit: int = 3) -> list[str]:
    """kohya ``ss_tag_frequency`` ({dataset: {tag: count}}): the tags as frequent as the most frequent."""
    try:
        data = json.loads(tag_frequency)
        counts = Counter()
        for tags in data.values():
            counts.update({str(t).strip(): int(c) for t, c in tags.items()})
    except (ValueError, AttributeError, TypeError):
        return []
    if not counts:
        return []
    top = max(counts.values())
    return [t for t, c in counts.most_common() if c == top][:limit]


def _describe(info: SourceInfo, meta: dict[str, str], sidecar: dict) -> SourceInfo:
    """Fill title / trigger / description / preferred weight; the user's sidecar wins over the header."""
    info.title = meta.get("modelspec.title") or meta.get("ss_output_name") or None
    info.description = meta.get("modelspec.description") or None
    if meta.get("modelspec.trigger_phrase"):
        info.trigger = _split_trigger(meta["modelspec.trigger_phrase"])
    elif meta.get("ss_tag_frequency"):
        info.trigger = _top_tags(meta["ss_tag_frequency"])
    if sidecar.get("activation text"):
        info.trigger = _split_trigger(sidecar["activation text"])
    if sidecar.get("description"):
        info.description = str(sidecar["description"])
    try:
        weight = float(sidecar.get("preferred weight") or 0)
    except (TypeError, ValueError):
        weight = 0.0
    info.preferred_weight = weight or None  # A1111 writes 0 for "not set"
    return info


# ---------------------------------------------------------------------------------------------
# inspection


def _alpha(file: Path, header: dict[str, dict], meta: dict[str, str], parsed: _Parsed, peft_config: dict | None) -> float | None:
    """The LoRA's (most common) alpha: its alpha tensors, the PEFT config, diffusers' adapter metadata or
    kohya's ``ss_network_alpha``; None where the file states none (loaders then use alpha = rank)."""
    values = _read_scalars(file, header, parsed.alphas) if parsed.alphas else []
    if values:
        return Counter(values).most_common(1)[0][0]
    try:
        if parsed.layout == "kohya":  # kohya's convention for a missing alpha: alpha = rank
            return float(meta.get("ss_network_alpha") or max(m.rank for m in parsed.modules))
        if peft_config is not None:
            return float(peft_config["lora_alpha"]) if peft_config.get("lora_alpha") is not None else None
        if meta.get("lora_adapter_metadata"):
            packed = json.loads(meta["lora_adapter_metadata"])
            return float(packed.get("unet.lora_alpha", packed.get("lora_alpha")))
    except (ValueError, TypeError, AttributeError):
        return None
    return None


FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})  # a LoRA's matrices (its alphas may be integers: diffusers writes int64)


def _inspect_lora(file: Path, header: dict[str, dict], meta: dict[str, str], fmt: str, peft_config: dict | None) -> SourceInfo:
    parsed = _lora_modules(file, header, fmt, (peft_config or {}).get("modules_to_save"))
    mods = parsed.modules
    if not mods:
        raise UnknownLoraFormat(f"{file} has LoRA-like keys but no down/A matrices", "export the LoRA again with diffusers, PEFT or kohya")
    odd = sorted({t["dtype"] for t in header.values() if len(t.get("shape", ())) >= 2 and t.get("dtype") not in FLOAT_DTYPES})
    if odd:  # integer or boolean weights load nowhere: refuse them here, not at generate
        raise UnknownLoraFormat(f"{file} holds {', '.join(odd)} tensors; LoRA weights are floating point",
                                "export the LoRA again in float16, bfloat16 or float32")
    sidecar = _sidecar(file)
    arch, arch_from = families.of_lora(mods, meta, sidecar)
    info = SourceInfo(
        kind="lora", format=fmt, arch=arch, arch_from=arch_from, file=file, rank=max(m.rank for m in mods),
        alpha=_alpha(file, header, meta, parsed, peft_config), targets=sorted({module_type(m.path) for m in mods}),
        has_text_encoder=any(m.component != "unet" for m in mods),
        unet_shapes={m.path: (m.in_features, m.out_features) for m in mods if m.component == "unet"},
        text_shapes={(m.component, m.path): (m.in_features, m.out_features) for m in mods if m.component != "unet"},
        saved_shapes=parsed.saved, layout=parsed.layout, metadata=meta, lycoris=dict(parsed.lycoris),
        # layouts diffusers loads wrongly or not at all go through catalog.convert (LyCORIS: catalog.lycoris)
        convert=fmt == "peft" or parsed.layout == "attn-procs" or (fmt == "diffusers" and bool(parsed.alphas)) or bool(parsed.lycoris),
    )  # fmt: skip
    return _describe(info, meta, sidecar)


def _classify(header: dict[str, dict]) -> str | None:
    keys = list(header)
    if any(k.startswith(tuple(p for p, _ in families.kohya_prefixes())) for k in keys):
        return "kohya"
    if any(k.startswith(families.checkpoint_prefixes()) for k in keys):
        return "single-file"
    if "conv_in.weight" in header and any(k.startswith("time_embedding.") for k in keys):
        return "diffusers-unet"
    parsed = [p for k in keys if (p := parse_key(k)) is not None and p.role in ("down", "up")]
    if not parsed:  # a PEFT LoHa / LoKr adapter has no down/up matrices
        return "peft" if any(k.startswith("base_model.model.") and k.rpartition(".")[2] in lycoris.ROLES for k in keys) else None
    # PEFT keys name no component (base_model.model.<module>); diffusers files prefix unet. / text_encoder.
    return "peft" if all(p.layout == "peft" and not p.prefixed for p in parsed) else "diffusers"


def _prediction_type(meta: dict[str, str]) -> str | None:
    """What a single-file checkpoint predicts, when its metadata says (modelspec, kohya)."""
    spec = (meta.get("modelspec.prediction_type") or "").lower()
    if spec in ("v", "v_prediction") or meta.get("ss_v_parameterization") == "True":
        return "v_prediction"
    return "epsilon" if spec == "epsilon" else None


def _checkpoint_shapes(header: dict[str, dict], prefix: str) -> dict[str, tuple[int, int]]:
    """(in, out) of every Linear / Conv2d weight of a UNet in a single file (SGM or diffusers names)."""
    return {
        k[len(prefix) : -len(".weight")]: (t["shape"][1], t["shape"][0])
        for k, t in header.items()
        if k.startswith(prefix) and k.endswith(".weight") and len(t["shape"]) in (2, 4)
    }


def _inspect_file(file: Path, checksum: bool) -> SourceInfo:
    if file.suffix.lower() in PICKLE_SUFFIXES:
        raise PickleRefused(f"{file} is a pickled PyTorch checkpoint ({file.suffix}); mixdiff never unpickles", _PICKLE_HINT)
    header, meta = read_header(file)
    kind = _classify(header)
    config_file = file.parent / PEFT_CONFIG
    peft_config = _read_json(config_file) if config_file.is_file() and kind in ("peft", None) else None
    if kind not in ("single-file", "diffusers-unet"):
        _refuse_variant(file, list(header), peft_config, kind)
    if kind in ("kohya", "peft", "diffusers"):
        info = _inspect_lora(file, header, meta, kind, peft_config)
    elif kind in ("single-file", "diffusers-unet"):
        if kind == "diffusers-unet" and (file.parent / "config.json").is_file():
            return _inspect_model_folder(file.parent, checksum)
        arch, arch_from = families.of_checkpoint(header, meta)
        info = SourceInfo(
            kind="model", format="single-file", arch=arch, arch_from=arch_from, file=file, metadata=meta,
            unet_shapes=_checkpoint_shapes(header, families.get(arch).checkpoint_prefix if kind == "single-file" else ""),
            prediction_type=_prediction_type(meta),
        )  # fmt: skip
        info = _describe(info, meta, _sidecar(file))
    else:
        first = ", ".join(list(header)[:3]) or "none"
        raise UnknownLoraFormat(
            f"{file} holds no LoRA or Stable Diffusion keys we recognise (first keys: {first})",
            "mixdiff reads diffusers, PEFT and kohya LoRAs and SD 1.x/2.x/XL checkpoints",
        )
    if checksum:
        info.sha256 = sha256_file(file)
    return info


def _read_json(path: Path, error: type[MixdiffError] = NoModelFound, hint: str = "restore that file from the model's source") -> dict:
    """A JSON object from `path`; anything else raises `error` with `hint`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc})", hint) from None
    if not isinstance(data, dict):
        raise error(f"{path} is not a JSON object", hint)
    return data


def _weights_in(folder: Path, stem: str) -> Path:
    """``<stem>.safetensors`` (or its shard index / fp16 variant) in a diffusers model folder."""
    for name in (f"{stem}.safetensors", f"{stem}.safetensors.index.json", f"{stem}.fp16.safetensors"):
        if (folder / name).is_file():
            return folder / name
    pickles = [p for p in folder.glob(f"{stem}*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise PickleRefused(f"{pickles[0]} is a pickled PyTorch checkpoint; mixdiff never unpickles", _PICKLE_HINT)
    raise NoModelFound(f"{folder} has a config but no {stem}.safetensors", "copy the weights file beside its config.json")


def _inspect_model_folder(folder: Path, checksum: bool) -> SourceInfo:
    """A diffusers pipeline folder (model_index.json + unet/) or a bare UNet folder (config.json)."""
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    cfg = _read_json(unet_dir / "config.json")
    if not families.is_denoiser_config(cfg):
        raise NoModelFound(f"{unet_dir / 'config.json'} is not a UNet2DConditionModel config", "point at a Stable Diffusion pipeline or UNet folder")
    file = _weights_in(unet_dir, "diffusion_pytorch_model")
    meta = {}
    if file.name.endswith(".safetensors"):
        _, meta = read_header(file)  # also catches a truncated download
    scheduler = folder / "scheduler" / "scheduler_config.json"
    prediction = _read_json(scheduler).get("prediction_type", "epsilon") if unet_dir != folder and scheduler.is_file() else None
    info = SourceInfo(
        kind="model", format="diffusers-model", arch=families.of_config(cfg).name, arch_from="config", file=file,
        unet_config=cfg, metadata=meta, prediction_type=prediction,
    )  # fmt: skip
    if checksum:
        info.sha256 = sha256_file(file)
    return info


def _inspect_folder(folder: Path, checksum: bool) -> SourceInfo:
    if (folder / PEFT_CONFIG).is_file():
        return _inspect_file(_weights_in(folder, "adapter_model"), checksum)
    if (folder / "model_index.json").is_file() or (folder / "unet" / "config.json").is_file():
        return _inspect_model_folder(folder, checksum)
    if (folder / "config.json").is_file() and families.is_denoiser_config(_read_json(folder / "config.json")):
        return _inspect_model_folder(folder, checksum)
    if (folder / DIFFUSERS_LORA).is_file():
        return _inspect_file(folder / DIFFUSERS_LORA, checksum)
    weights = sorted(folder.glob("*.safetensors"))
    if len(weights) == 1:
        return _inspect_file(weights[0], checksum)
    if len(weights) > 1:
        names = ", ".join(p.name for p in weights[:4])
        raise AmbiguousSource(f"{folder} holds several weight files ({names})", "point at one of the .safetensors files")
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PickleRefused(f"{pickles[0]} is a pickled PyTorch checkpoint; mixdiff never unpickles", _PICKLE_HINT)
    raise NoModelFound(
        f"{folder} holds no model or LoRA (no .safetensors, {PEFT_CONFIG} or model_index.json)",
        "point at a .safetensors file, a PEFT adapter folder or a diffusers model folder",
    )


def inspect_source(path: str | Path, *, checksum: bool = True) -> SourceInfo:
    """Kind, format, architecture, rank/alpha, targets and shipped metadata of a LoRA or model.

    Reads headers and configs only. ``checksum=False`` skips the sha256 (which reads the whole file).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise SourceNotFound(f"{path} does not exist", "check the path (relative paths are from the current folder)")
    if path.is_dir():
        return _inspect_folder(path, checksum)
    if path.name in (PEFT_CONFIG, "config.json", "model_index.json"):
        return _inspect_folder(path.parent, checksum)
    if path.suffix.lower() not in PICKLE_SUFFIXES and path.suffix.lower() != ".safetensors":
        with open(path, "rb") as f:
            head = f.read(9)
        if not (len(head) == 9 and head[8:9] == b"{"):
            if _looks_pickled(head):
                raise PickleRefused(f"{path} is a pickled PyTorch checkpoint; mixdiff never unpickles", _PICKLE_HINT)
            raise NotSafetensors(f"{path} is not a safetensors file", "point at a .safetensors weights file")
    return _inspect_file(path, checksum)


# ---------------------------------------------------------------------------------------------
# loading (the one place that needs torch)


def lora_for_diffusers(info: SourceInfo, weight_shape: Callable[[str], tuple[int, ...] | None] | None = None) -> str | dict:
    """The argument for ``pipe.load_lora_weights`` that loads this LoRA exactly, with its own alpha.

    Layouts diffusers reads as they are (its own, kohya) load from their path. The others become a state
    dict through ``catalog.convert.diffusers_lora``: PEFT folders (diffusers does not read them),
    attention-processor files (diffusers 0.42 silently loads nothing) and diffusers files with network
    alphas (refused by diffusers); each module's alpha/r is folded into lora_B. LyCORIS LoHa / LoKr
    modules become exact kohya LoRA modules (`catalog.lycoris.as_lora`), which needs `weight_shape`: the
    base module's weight shape for a kohya stem.
    """
    if info.kind != "lora":
        raise ValueError(f"{info.file} is a {info.kind}, not a LoRA")
    if not info.convert:
        return str(info.file)
    from safetensors.torch import load_file

    if info.lycoris:
        from mixdiff_cli.catalog.lycoris import as_lora

        if weight_shape is None:
            raise ValueError(f"{info.file} holds LyCORIS modules: pass weight_shape to rewrite them")
        return as_lora(load_file(info.file), weight_shape)

    from mixdiff_cli.catalog.convert import diffusers_lora

    config_file = info.file.parent / PEFT_CONFIG
    config = _read_json(config_file) if info.format == "peft" and config_file.is_file() else None
    return diffusers_lora(load_file(info.file), config)
