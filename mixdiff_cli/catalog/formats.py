"""What a candidate expert is, read from headers and configs only: no tensor is loaded, no pickle opened.

A ``.safetensors`` file is 8 bytes of little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}``) and the raw data
(https://github.com/huggingface/safetensors#format). Everything here reads the first two parts.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixdiff_cli.core.errors import MixdiffError

ARCH_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
# Cross-attention width (text-encoder hidden size) of the real checkpoints.
CROSS_DIM_ARCH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
PICKLE_SUFFIXES = {".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle"}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library refuses headers above 100 MB too
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


class SourceNotFound(MixdiffError):
    pass


class NoModelFound(MixdiffError):
    """A folder without any weights we know how to read."""


class AmbiguousSource(MixdiffError):
    """A folder with several candidate weight files."""


class NotSafetensors(MixdiffError):
    pass


class CorruptSafetensors(MixdiffError):
    pass


class PickleRefused(MixdiffError):
    pass


class UnknownLoraFormat(MixdiffError):
    pass


class ArchitectureMismatch(MixdiffError):
    pass


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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the per-module shapes)."""
        return {
            "kind": self.kind, "format": self.format, "arch": self.arch, "file": str(self.file),
            "rank": self.rank, "alpha": self.alpha, "targets": list(self.targets),
            "has_text_encoder": self.has_text_encoder, "title": self.title, "trigger": list(self.trigger),
            "description": self.description, "preferred_weight": self.preferred_weight, "sha256": self.sha256,
        }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# hashing


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def autov2(sha: str) -> str:
    """A1111/Civitai "AutoV2" short hash: the first 10 hex digits of the file's sha256."""
    return sha[:10]


# ---------------------------------------------------------------------------------------------
# safetensors header


_PICKLE_HINT = (
    "convert it once where you trust the file: python -c \"import torch, safetensors.torch as st; "
    "sd = torch.load('x.ckpt', map_location='cpu', weights_only=True); "
    "st.save_file(sd.get('state_dict', sd), 'x.safetensors')\""
)


def _looks_pickled(head: bytes) -> bool:
    # torch.save zip archives start with "PK\x03\x04"; pickles of protocol 2+ with "\x80" and the protocol
    return head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def read_header(file: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensors, metadata) of a safetensors file: ``{name: {"dtype", "shape", "data_offsets"}}``."""
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(9)
        n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
        plausible = len(head) == 9 and head[8:9] == b"{" and 2 <= n <= MAX_HEADER
        if not plausible:
            if _looks_pickled(head):
                raise PickleRefused(f"{file} is a pickled PyTorch checkpoint despite its name; mixdiff never unpickles", _PICKLE_HINT)
            raise NotSafetensors(
                f"{file} is not a safetensors file (no JSON header after the 8-byte length)",
                "point at a .safetensors weights file; export others with safetensors.torch.save_file",
            )
        if 8 + n > size:
            raise CorruptSafetensors(
                f"{file} is truncated: its header is {n} bytes but only {size - 8} follow the length",
                "the file is incomplete or damaged; download or copy it again",
            )
        raw = head[8:] + f.read(n - 1)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CorruptSafetensors(f"{file} has a damaged header (not valid JSON)", "download or copy it again") from None
    if not isinstance(header, dict):
        raise CorruptSafetensors(f"{file} has a damaged header (not a JSON object)", "download or copy it again")
    metadata = header.pop("__metadata__", None) or {}
    try:
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise CorruptSafetensors(f"{file} has a damaged header (a tensor without data_offsets)", "download or copy it again") from None
    if 8 + n + end > size:
        raise CorruptSafetensors(
            f"{file} is truncated: its header describes {end} bytes of tensor data but the file holds {size - 8 - n}",
            "the file is incomplete or damaged; download or copy it again",
        )
    return header, {str(k): str(v) for k, v in metadata.items()}


_SCALAR = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U8": "<B"}


def _read_scalars(file: Path, header: dict[str, dict], names: list[str]) -> list[float]:
    """The values of one-element tensors (kohya ``.alpha``), each read with a seek and a few bytes."""
    out = []
    with open(file, "rb") as f:
        data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        for name in names:
            t = header[name]
            begin, end = t["data_offsets"]
            f.seek(data_start + begin)
            raw = f.read(end - begin)
            if t["dtype"] == "BF16":  # bfloat16 is the top half of a float32
                out.append(struct.unpack("<f", b"\x00\x00" + raw[:2])[0])
            elif t["dtype"] in _SCALAR:
                out.append(float(struct.unpack_from(_SCALAR[t["dtype"]], raw)[0]))
    return out


# ---------------------------------------------------------------------------------------------
# module names


# Multi-word names in diffusers / transformers / SGM module paths, to undo kohya's "." -> "_".
_WORDS = {
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "add_embedding", "linear_1", "linear_2", "text_model", "self_attn", "q_proj", "k_proj",
    "v_proj", "out_proj", "final_layer_norm", "layer_norm1", "layer_norm2", "input_blocks", "output_blocks",
    "middle_block", "in_layers", "out_layers", "emb_layers", "skip_connection", "time_embed", "label_emb",
    "text_projection", "position_embedding", "token_embedding",
}  # fmt: skip
_WORD_PARTS = {tuple(w.split("_")) for w in _WORDS}

# Module types, most specific first; a module's type is the first that ends its path.
_TYPES = (
    "to_out.0", "ff.net.0.proj", "ff.net.2", "to_q", "to_k", "to_v", "proj_in", "proj_out", "q_proj", "k_proj",
    "v_proj", "out_proj", "mlp.fc1", "mlp.fc2", "time_emb_proj", "conv_shortcut", "conv1", "conv2", "conv_in",
    "conv_out", "linear_1", "linear_2", "downsamplers.0.conv", "upsamplers.0.conv", "text_projection",
)  # fmt: skip


def kohya_to_dotted(name: str) -> str:
    """``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0`` -> ``down_blocks.0....attn1.to_out.0``."""
    parts, out, i = name.split("_"), [], 0
    while i < len(parts):
        for n in (3, 2):
            if tuple(parts[i : i + n]) in _WORD_PARTS:
                out.append("_".join(parts[i : i + n]))
                i += n
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def module_type(path: str) -> str:
    """``...attn2.to_out.0`` -> ``to_out.0``; ``...text_model.encoder.layers.0.mlp.fc1`` -> ``fc1``."""
    for t in _TYPES:
        if path == t or path.endswith("." + t):
            return t.removeprefix("mlp.").split(".")[-1] if t.startswith(("mlp.", "downsamplers", "upsamplers")) else t
    last = path.rsplit(".", 2)
    return ".".join(last[-2:]) if last[-1].isdigit() and len(last) > 1 else last[-1]


@dataclass
class _Module:
    component: str  # "unet" | "text_encoder" | "text_encoder_2"
    path: str  # dotted module path inside that component
    rank: int
    in_features: int
    out_features: int


def _lora_modules(header: dict[str, dict], fmt: str) -> tuple[list[_Module], list[str]]:
    """LoRA modules (one per down/A matrix) and the names of kohya ``.alpha`` tensors."""
    mods, alphas = [], []
    for key, t in header.items():
        shape = t.get("shape") or []
        if len(shape) < 2 and not key.endswith(".alpha"):  # not a weight matrix / conv kernel
            continue
        if fmt == "kohya":
            if key.endswith(".alpha"):
                alphas.append(key)
                continue
            if not key.endswith(".lora_down.weight"):
                continue
            stem = key[: -len(".lora_down.weight")]
            up = header.get(stem + ".lora_up.weight", {}).get("shape") or [0]
            for prefix, comp in (("lora_unet_", "unet"), ("lora_te2_", "text_encoder_2"), ("lora_te1_", "text_encoder"), ("lora_te_", "text_encoder")):
                if stem.startswith(prefix):
                    mods.append(_Module(comp, kohya_to_dotted(stem[len(prefix) :]), shape[0], shape[1], up[0]))
                    break
            continue
        m = re.match(r"(.*)\.lora_A(?:\.[^.]+)?\.weight$", key) or re.match(r"(.*)\.processor\.(\w+)_lora\.down\.weight$", key)
        if not m:
            continue
        if ".lora_A" in key:
            path = m.group(1)
            b_key = key.replace(".lora_A", ".lora_B")
        else:  # legacy diffusers attention-processor LoRA: ...attn1.processor.to_q_lora.down.weight
            path = f"{m.group(1)}.{'to_out.0' if m.group(2) == 'to_out' else m.group(2)}"
            b_key = key.replace("_lora.down.", "_lora.up.")
        out_f = (header.get(b_key, {}).get("shape") or [0])[0]
        path = path.removeprefix("base_model.model.")
        comp, _, rest = path.partition(".")
        if comp in ("unet", "text_encoder", "text_encoder_2"):
            path = rest
        else:
            comp = "text_encoder" if path.startswith("text_model.") else "unet"
        mods.append(_Module(comp, path, shape[0], shape[1], out_f))
    return mods, alphas


# ---------------------------------------------------------------------------------------------
# architecture


def arch_of_unet_config(cfg: dict) -> str:
    """sdxl if the UNet takes text_time added conditions, sd2 if its cross-attention is 1024 wide, else sd1."""
    if cfg.get("addition_embed_type") == "text_time":
        return "sdxl"
    cross = cfg.get("cross_attention_dim")
    cross = cross[-1] if isinstance(cross, (list, tuple)) else cross
    return "sd2" if cross == 1024 else "sd1"


def _arch_from_metadata(meta: dict[str, str], sidecar: dict) -> str | None:
    spec = (meta.get("modelspec.architecture") or "").lower()
    version = (meta.get("ss_base_model_version") or "").lower()
    side = str(sidecar.get("sd version") or "").lower()
    if spec.startswith("stable-diffusion-xl") or version.startswith("sdxl") or side == "sdxl":
        return "sdxl"
    if spec.startswith("stable-diffusion-v2") or version.startswith("sd_v2") or meta.get("ss_v2") == "True" or side == "sd2":
        return "sd2"
    if spec.startswith("stable-diffusion-v1") or version.startswith("sd_v1") or side == "sd1":
        return "sd1"
    return None


def _arch_of_lora(mods: list[_Module], meta: dict[str, str], sidecar: dict) -> tuple[str | None, str | None]:
    """(arch, evidence). Real checkpoints: SDXL has a second text encoder and several transformer
    blocks per attention (SD 1.x/2.x exactly one); the cross-attention input width is 768 (SD 1.x),
    1024 (SD 2.x) or 2048 (SDXL). Other widths (tiny test models) fall back to metadata, then sd1,
    mirroring ``arch_of_unet_config``."""
    if not mods:
        return _arch_from_metadata(meta, sidecar), "metadata"
    unet = [m for m in mods if m.component == "unet"]
    if any(m.component == "text_encoder_2" for m in mods):
        return "sdxl", "keys"
    if any(int(k) >= 1 for m in unet for k in re.findall(r"transformer_blocks\.(\d+)", m.path)):
        return "sdxl", "keys"
    cross = {m.in_features for m in unet if re.search(r"attn2\.to_[kv]$", m.path)}
    for width in cross:
        if width in CROSS_DIM_ARCH:
            return CROSS_DIM_ARCH[width], "shapes"
    if meta_arch := _arch_from_metadata(meta, sidecar):
        return meta_arch, "metadata"
    te_width = {m.in_features for m in mods if m.component == "text_encoder" and m.path.endswith("q_proj")}
    if 1024 in te_width:
        return "sd2", "shapes"
    return "sd1", "default"


def _arch_of_checkpoint(header: dict[str, dict], meta: dict[str, str]) -> tuple[str | None, str | None]:
    """Architecture of a full single-file checkpoint (original SGM/LDM key names or diffusers names)."""
    keys = header.keys()
    if any(k.startswith(("model.diffusion_model.label_emb", "conditioner.embedders.1", "add_embedding.")) for k in keys):
        return "sdxl", "keys"
    if any(k.startswith("cond_stage_model.model.") for k in keys):  # OpenCLIP text encoder
        return "sd2", "keys"
    for k, t in header.items():
        if re.search(r"attn2\.to_k\.weight$", k) and len(t.get("shape", [])) == 2 and t["shape"][1] in CROSS_DIM_ARCH:
            return CROSS_DIM_ARCH[t["shape"][1]], "shapes"
    if meta_arch := _arch_from_metadata(meta, {}):
        return meta_arch, "metadata"
    return "sd1", "default"


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


def _inspect_lora(file: Path, header: dict[str, dict], meta: dict[str, str], fmt: str, peft_config: dict | None) -> SourceInfo:
    mods, alpha_keys = _lora_modules(header, fmt)
    if not mods:
        raise UnknownLoraFormat(f"{file} has LoRA-like keys but no down/A matrices", "export the LoRA again with diffusers, PEFT or kohya")
    sidecar = _sidecar(file)
    arch, arch_from = _arch_of_lora(mods, meta, sidecar)
    rank = max(m.rank for m in mods)
    alpha: float | None = None
    if fmt == "kohya":
        values = _read_scalars(file, header, alpha_keys) if alpha_keys else []
        if values:
            alpha = Counter(values).most_common(1)[0][0]
        elif meta.get("ss_network_alpha"):
            alpha = float(meta["ss_network_alpha"])
        else:  # kohya's convention for a missing alpha
            alpha = float(rank)
    elif peft_config is not None:
        alpha = float(peft_config["lora_alpha"]) if peft_config.get("lora_alpha") is not None else None
    elif fmt == "diffusers" and meta.get("lora_adapter_metadata"):
        try:
            packed = json.loads(meta["lora_adapter_metadata"])
            alpha = float(packed.get("unet.lora_alpha", packed.get("lora_alpha")))
        except (ValueError, TypeError):
            alpha = None
    info = SourceInfo(
        kind="lora", format=fmt, arch=arch, arch_from=arch_from, file=file, rank=rank, alpha=alpha,
        targets=sorted({module_type(m.path) for m in mods}),
        has_text_encoder=any(m.component != "unet" for m in mods),
        unet_shapes={m.path: (m.in_features, m.out_features) for m in mods if m.component == "unet"},
        metadata=meta,
    )  # fmt: skip
    return _describe(info, meta, sidecar)


def _classify(header: dict[str, dict]) -> str | None:
    keys = list(header)
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        if any(re.search(r"\.(hada_|lokr_|oft_)", k) for k in keys):
            return "lycoris"
        return "kohya"
    if any(".lora_A." in k for k in keys):
        return "lora_A"
    if any(re.search(r"\.processor\.\w+_lora\.down\.weight$", k) for k in keys):
        return "diffusers"
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.")) for k in keys):
        return "single-file"
    if "conv_in.weight" in header and any(k.startswith("time_embedding.") for k in keys):
        return "diffusers-unet"
    return None


def _inspect_file(file: Path, checksum: bool) -> SourceInfo:
    if file.suffix.lower() in PICKLE_SUFFIXES:
        raise PickleRefused(f"{file} is a pickled PyTorch checkpoint ({file.suffix}); mixdiff never unpickles", _PICKLE_HINT)
    header, meta = read_header(file)
    kind = _classify(header)
    peft_config = None
    if kind == "kohya":
        info = _inspect_lora(file, header, meta, "kohya", None)
    elif kind in ("lora_A", "diffusers"):
        config_file = file.parent / PEFT_CONFIG
        if kind == "lora_A" and config_file.is_file():
            peft_config = _read_json(config_file)
            info = _inspect_lora(file, header, meta, "peft", peft_config)
        elif kind == "lora_A" and not any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in header):
            info = _inspect_lora(file, header, meta, "peft", None)  # PEFT keys without their adapter_config.json
        else:
            info = _inspect_lora(file, header, meta, "diffusers", None)
    elif kind in ("single-file", "diffusers-unet"):
        config_file = file.parent / "config.json"
        if kind == "diffusers-unet" and config_file.is_file():
            return _inspect_model_folder(file.parent, checksum)
        arch, arch_from = _arch_of_checkpoint(header, meta)
        info = SourceInfo(kind="model", format="single-file", arch=arch, arch_from=arch_from, file=file, metadata=meta)
        info = _describe(info, meta, _sidecar(file))
    elif kind == "lycoris":
        raise UnknownLoraFormat(f"{file} is a LyCORIS LoHa/LoKr/OFT network; only plain LoRA is supported", "export a plain LoRA (lora_down/lora_up) instead")
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


def _is_unet_config(cfg: dict) -> bool:
    return cfg.get("_class_name") == "UNet2DConditionModel" or ("cross_attention_dim" in cfg and "block_out_channels" in cfg)


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
    if not _is_unet_config(cfg):
        raise NoModelFound(f"{unet_dir / 'config.json'} is not a UNet2DConditionModel config", "point at a Stable Diffusion pipeline or UNet folder")
    file = _weights_in(unet_dir, "diffusion_pytorch_model")
    meta = {}
    if file.name.endswith(".safetensors"):
        _, meta = read_header(file)  # also catches a truncated download
    info = SourceInfo(
        kind="model", format="diffusers-model", arch=arch_of_unet_config(cfg), arch_from="config", file=file,
        unet_config=cfg, metadata=meta,
    )  # fmt: skip
    if checksum:
        info.sha256 = sha256_file(file)
    return info


def _inspect_folder(folder: Path, checksum: bool) -> SourceInfo:
    if (folder / PEFT_CONFIG).is_file():
        return _inspect_file(_weights_in(folder, "adapter_model"), checksum)
    if (folder / "model_index.json").is_file() or (folder / "unet" / "config.json").is_file():
        return _inspect_model_folder(folder, checksum)
    if (folder / "config.json").is_file() and _is_unet_config(_read_json(folder / "config.json")):
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
# fitting a base UNet


def _per_block(value: Any, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


_SGM_FIXED = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
              "out.0": "conv_norm_out", "out.2": "conv_out"}  # fmt: skip
_SGM_RESNET = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _sgm_to_diffusers(path: str, cfg: dict) -> str | None:
    """Original SGM/LDM UNet names (input_blocks.4.1...) -> diffusers names (down_blocks.1.attentions.0...)."""
    for sgm, name in _SGM_FIXED.items():
        if path == sgm or path.startswith(sgm + "."):
            return name + path[len(sgm) :]
    m = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)(?:\.(\d+))?\.?(.*)$", path)
    if not m:
        return path
    layers = _per_block(cfg.get("layers_per_block", 2), len(cfg["block_out_channels"]))
    up_types = list(cfg.get("up_block_types", []))
    where, n, sub, rest = m.group(1), int(m.group(2)), int(m.group(3) or 0), m.group(4)

    def part(kind: str, j: int) -> str:
        return f"resnets.{j}.{_SGM_RESNET.get(rest, rest)}" if kind == "resnets" else f"{kind}.{j}.{rest}"

    if where == "middle_block":
        return f"mid_block.{part(*[('resnets', 0), ('attentions', 0), ('resnets', 1)][n])}" if n < 3 else None
    if where == "input_blocks":
        n -= 1
        for i, count in enumerate(layers):  # each down block: `count` resnet(+attention) entries, then a downsampler
            if n == count:
                return f"down_blocks.{i}.downsamplers.0.conv"
            if n < count:
                return f"down_blocks.{i}.{part('resnets' if sub == 0 else 'attentions', n)}"
            n -= count + 1
        return None
    for i, count in enumerate(reversed(layers)):  # each up block: count + 1 entries, the last with the upsampler
        if n <= count:
            has_attn = i < len(up_types) and "CrossAttn" in up_types[i]
            if sub == 0:
                return f"up_blocks.{i}.{part('resnets', n)}"
            if sub == 1 and has_attn:
                return f"up_blocks.{i}.{part('attentions', n)}"
            return f"up_blocks.{i}.upsamplers.0.conv"
        n -= count + 1
    return None


def diffusers_to_sgm(path: str, cfg: dict) -> str:
    """diffusers UNet module names -> original SGM/LDM names (the inverse of ``_sgm_to_diffusers``)."""
    layers = _per_block(cfg.get("layers_per_block", 2), len(cfg["block_out_channels"]))
    up_types = list(cfg.get("up_block_types", []))
    for sgm, name in _SGM_FIXED.items():
        if path == name or path.startswith(name + "."):
            return sgm + path[len(name) :]
    resnet = {v: k for k, v in _SGM_RESNET.items()} | {"norm1": "in_layers.0", "norm2": "out_layers.0"}

    def inner(kind: str, rest: str) -> str:
        if kind != "resnets":
            return rest
        head, _, tail = rest.partition(".")
        return f"{resnet.get(head, head)}.{tail}" if tail else resnet.get(head, head)

    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if m:
        n = {"resnets": [0, 2], "attentions": [1]}[m.group(1)][int(m.group(2))]
        return f"middle_block.{n}.{inner(m.group(1), m.group(3))}"
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$", path)
    if not m:
        return path
    side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    if side == "down":
        base = 1 + sum(n + 1 for n in layers[:i])
        if kind == "downsamplers":
            return f"input_blocks.{base + layers[i]}.0.{rest.replace('conv', 'op', 1)}"
        return f"input_blocks.{base + j}.{0 if kind == 'resnets' else 1}.{inner(kind, rest)}"
    rlayers = list(reversed(layers))
    base = sum(n + 1 for n in rlayers[:i])
    if kind == "upsamplers":
        has_attn = i < len(up_types) and "CrossAttn" in up_types[i]
        return f"output_blocks.{base + rlayers[i]}.{2 if has_attn else 1}.{rest}"
    return f"output_blocks.{base + j}.{0 if kind == 'resnets' else 1}.{inner(kind, rest)}"


def _expected_shape(path: str, cfg: dict) -> tuple[int, int] | None | str:
    """(in, out) features of a UNet module in a diffusers UNet2DConditionModel with config ``cfg``.

    None: no such module in that UNet. "?": a module type we do not check.
    """
    ch = list(cfg["block_out_channels"])
    nb = len(ch)
    layers = _per_block(cfg.get("layers_per_block", 2), nb)
    down_types = list(cfg.get("down_block_types", []))
    up_types = list(cfg.get("up_block_types", []))
    cross = _per_block(cfg.get("cross_attention_dim", 1280), nb)
    tlayers = _per_block(cfg.get("transformer_layers_per_block", 1), nb)
    rev_tlayers = cfg.get("reverse_transformer_layers_per_block")
    rev_tlayers = [_per_block(x, 1)[0] if not isinstance(x, list) else max(x) for x in rev_tlayers] if rev_tlayers else list(reversed(tlayers))
    tlayers = [max(x) if isinstance(x, (list, tuple)) else x for x in tlayers]
    temb = cfg.get("time_embedding_dim") or ch[0] * 4
    temb_out = temb * 2 if cfg.get("resnet_time_scale_shift") == "scale_shift" else temb

    def attention(rest: str, c: int, x: int, n_transformers: int):
        m = re.match(r"transformer_blocks\.(\d+)\.(.+)$", rest)
        if m:
            if int(m.group(1)) >= n_transformers:
                return None
            return {
                "attn1.to_q": (c, c), "attn1.to_k": (c, c), "attn1.to_v": (c, c), "attn1.to_out.0": (c, c),
                "attn2.to_q": (c, c), "attn2.to_k": (x, c), "attn2.to_v": (x, c), "attn2.to_out.0": (c, c),
                "ff.net.0.proj": (c, 8 * c), "ff.net.2": (4 * c, c),
            }.get(m.group(2), "?")  # fmt: skip
        return {"proj_in": (c, c), "proj_out": (c, c)}.get(rest, "?")

    def resnet(rest: str, cin: int, cout: int):
        if rest == "conv_shortcut":
            return (cin, cout) if cin != cout else None
        return {"conv1": (cin, cout), "conv2": (cout, cout), "time_emb_proj": (temb, cout * (temb_out // temb))}.get(rest, "?")

    top = {"conv_in": (cfg.get("in_channels", 4), ch[0]), "conv_out": (ch[0], cfg.get("out_channels", 4)),
           "time_embedding.linear_1": (ch[0], temb), "time_embedding.linear_2": (temb, temb)}  # fmt: skip
    if path in top:
        return top[path]
    if path.startswith("add_embedding."):
        if cfg.get("addition_embed_type") != "text_time":
            return None
        return {"linear_1": (cfg.get("projection_class_embeddings_input_dim"), temb), "linear_2": (temb, temb)}.get(path.split(".", 1)[1], "?")
    m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(attentions|resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$", path)
    if m:
        where, i, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if i >= nb:
            return None
        if where == "down_blocks":
            c, cin = ch[i], ch[i - 1] if i > 0 else ch[0]
            has_attn = "CrossAttn" in down_types[i] if i < len(down_types) else False
            if part == "downsamplers":
                return (c, c) if i < nb - 1 and j == 0 and rest == "conv" else None
            if j >= layers[i]:
                return None
            if part == "attentions":
                return attention(rest, c, cross[i], tlayers[i]) if has_attn else None
            return resnet(rest, cin if j == 0 else c, c)
        rch, rlayers, rcross = list(reversed(ch)), list(reversed(layers)), list(reversed(cross))
        c, prev = rch[i], rch[i - 1] if i > 0 else rch[0]
        skip_in = rch[min(i + 1, nb - 1)]
        has_attn = "CrossAttn" in up_types[i] if i < len(up_types) else False
        n_layers = rlayers[i] + 1
        if part == "upsamplers":
            return (c, c) if i < nb - 1 and j == 0 and rest == "conv" else None
        if j >= n_layers:
            return None
        if part == "attentions":
            return attention(rest, c, rcross[i], rev_tlayers[i]) if has_attn else None
        skip = skip_in if j == n_layers - 1 else c
        return resnet(rest, (prev if j == 0 else c) + skip, c)
    m = re.match(r"mid_block\.(attentions|resnets)\.(\d+)\.(.+)$", path)
    if m:
        c = ch[-1]
        if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") is None:
            return None
        part, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if part == "attentions":
            return attention(rest, c, cross[-1], tlayers[-1]) if j == 0 else None
        return resnet(rest, c, c) if j < 2 else None
    return "?"


def fits_base(info: SourceInfo, base_unet_config: dict) -> str | None:
    """None if ``info`` fits a base with this UNet config, else why not (one line)."""
    base = arch_of_unet_config(base_unet_config)
    noun = "LoRA" if info.kind == "lora" else "model"
    if info.arch and info.arch_from != "default" and info.arch != base:
        return f"{noun} for {ARCH_LABELS[info.arch]}, base is {ARCH_LABELS[base]}"
    if info.kind == "model":
        if info.unet_config is None:
            return None
        for key in ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type", "projection_class_embeddings_input_dim"):
            if info.unet_config.get(key) != base_unet_config.get(key):
                return f"model UNet {key} is {info.unet_config.get(key)}, the base UNet's is {base_unet_config.get(key)}"
        return None
    for path, (fin, fout) in sorted(info.unet_shapes.items()):
        diffusers_path = _sgm_to_diffusers(path, base_unet_config)
        want = _expected_shape(diffusers_path, base_unet_config) if diffusers_path else None
        if want == "?":
            continue
        if want is None:
            return f"LoRA module {path} does not exist in the base UNet"
        if fin != want[0] or (fout and fout != want[1]):
            return f"LoRA shapes ({path}: {fin}->{fout}) do not match the base UNet ({want[0]}->{want[1]})"
    return None


def require_fit(info: SourceInfo, base_unet_config: dict) -> None:
    """Raise ArchitectureMismatch unless ``info`` fits the base UNet."""
    if reason := fits_base(info, base_unet_config):
        raise ArchitectureMismatch(reason, "add it to a catalog whose base has the same architecture")


# ---------------------------------------------------------------------------------------------
# loading (the one place that needs torch)


def lora_for_diffusers(info: SourceInfo) -> str | dict:
    """The argument for ``pipe.load_lora_weights`` that loads this LoRA with its own alpha.

    diffusers and kohya files load from their path. diffusers does not read PEFT folders: their keys
    get a ``unet.`` prefix and alpha/r is folded into lora_B (exact: B' A = (alpha/r) B A).
    """
    if info.kind != "lora":
        raise ValueError(f"{info.file} is a {info.kind}, not a LoRA")
    if info.format != "peft":
        return str(info.file)
    from safetensors.torch import load_file

    config_file = info.file.parent / PEFT_CONFIG
    config = _read_json(config_file) if config_file.is_file() else {}
    state = load_file(info.file)
    alpha = config.get("lora_alpha")
    patterns = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    out = {}
    for key, tensor in state.items():
        path = key.removeprefix("base_model.model.")
        comp = "text_encoder" if path.startswith("text_model.") else "unet"
        if ".lora_B." in key and alpha is not None:
            module = re.sub(r"\.lora_B(\.[^.]+)?\.weight$", "", path)
            a = next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", module)), alpha)
            r = tensor.shape[1]
            tensor = tensor * (a / (r**0.5 if rslora else r))
        out[f"{comp}.{path}"] = tensor
    return out
