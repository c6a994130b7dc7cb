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

from mixdiff_cli.catalog.convert import LoraKey, parse_key
from mixdiff_cli import families
from mixdiff_cli.catalog.geometry import Geometry, text_module_shape
from mixdiff_cli.core.errors import MixdiffError

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


class UnsupportedLora(UnknownLoraFormat):
    """A known adapter format that mixdiff cannot apply exactly (LoHa, LoKr, (IA)^3, OFT, DoRA, ...)."""


class MalformedLora(MixdiffError):
    """LoRA keys that do not pair up (A without B, down without up) or whose ranks disagree."""


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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the per-module shapes)."""
        return {
            "kind": self.kind, "format": self.format, "arch": self.arch, "file": str(self.file),
            "rank": self.rank, "alpha": self.alpha, "targets": list(self.targets),
            "has_text_encoder": self.has_text_encoder, "title": self.title, "trigger": list(self.trigger),
            "description": self.description, "preferred_weight": self.preferred_weight, "sha256": self.sha256,
            "layout": self.layout, "modules_to_save": sorted(self.saved_shapes), "prediction_type": self.prediction_type,
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
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptSafetensors(f"{file} has a damaged header (__metadata__ is not a map of strings)", "download or copy it again")
    end = _check_tensors(file, header)
    if 8 + n + end > size:
        raise CorruptSafetensors(
            f"{file} is truncated: its header describes {end} bytes of tensor data but the file holds {size - 8 - n}",
            "the file is incomplete or damaged; download or copy it again",
        )
    if 8 + n + end < size:
        raise CorruptSafetensors(
            f"{file} has {size - 8 - n - end} bytes after the {end} bytes of tensor data its header describes",
            "the file is damaged or was written by a broken tool; export it again with safetensors",
        )
    return header, metadata


# Bits per element of every safetensors dtype (the safetensors 0.8 parser knows exactly these 22).
DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip


def _tensor_error(file: Path, name: str, problem: str) -> CorruptSafetensors:
    return CorruptSafetensors(f"{file} has a malformed header: tensor {name!r} {problem}", "the file is damaged or was written by a broken tool; export it again with safetensors")


def _check_tensors(file: Path, header: dict) -> int:
    """Validate every entry as strictly as the safetensors parser does; returns the data section's length.

    Each tensor names a known dtype, a shape of non-negative integers whose byte size fits 64 bits and
    equals its ``data_offsets`` span, and the spans tile the data section from 0 without gap or overlap.
    """
    spans = []
    for name, t in header.items():
        if not isinstance(t, dict) or not {"dtype", "shape", "data_offsets"} <= set(t):
            raise _tensor_error(file, name, "lacks a dtype, shape or data_offsets")
        dtype, shape, offsets = t["dtype"], t["shape"], t["data_offsets"]
        if dtype not in DTYPE_BITS:
            raise _tensor_error(file, name, f"has an unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise _tensor_error(file, name, f"has a shape that is not a list of integers ({shape!r})")
        if any(d < 0 for d in shape):
            raise _tensor_error(file, name, f"has a negative shape {shape}")
        ok = isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and o >= 0 for o in offsets)
        if not ok or offsets[1] < offsets[0]:
            raise _tensor_error(file, name, f"has invalid data_offsets {offsets!r}")
        bits = DTYPE_BITS[dtype]
        for d in shape:
            bits *= d
        if bits >= 1 << 64:
            raise _tensor_error(file, name, f"has a shape {shape} whose size overflows")
        if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
            raise _tensor_error(file, name, f"has shape {shape} ({bits / 8:g} bytes of {dtype}) but {offsets[1] - offsets[0]} bytes of data")
        spans.append((offsets[0], offsets[1], name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise _tensor_error(file, name, f"starts at byte {begin} of the data, " + ("overlapping another tensor" if begin < position else f"leaving a gap after byte {position}"))
        position = end
    return position


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


@dataclass
class _Parsed:
    """The LoRA modules of one file, once every key is accounted for."""

    modules: list[_Module]
    alphas: list[str]  # keys of the alpha scalars (kohya ``.alpha``, diffusers network alphas)
    layout: str  # kohya | peft | diffusers-peft | diffusers-script | attn-procs
    saved: dict[str, tuple[int, int]]  # PEFT modules_to_save: module -> (in, out) of the saved weight


_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# how each layout names its two matrices, for messages
_MATRICES = {"kohya": ("lora_down", "lora_up"), "peft": ("lora_A", "lora_B"), "script": ("lora.down", "lora.up"),
             "attn-procs": ("_lora.down", "_lora.up")}  # fmt: skip
_REEXPORT = "the file is incomplete or was written by a broken tool; export the LoRA again"

# Adapter kinds other than plain LoRA / LoCon, by a key they always have: refused by name, never half-applied.
_VARIANTS = (
    (r"\.hada_w[12]_[ab]|\.hada_t[12]", "a LyCORIS LoHa network"),
    (r"\.lokr_w[12]|\.lokr_t2", "a LyCORIS LoKr network"),
    (r"\.on_input$|\.ia3_l(\.|$)", "an (IA)^3 adapter"),
    (r"\.b?oft_|\.oft_blocks", "an OFT/BOFT adapter"),
    (r"\.lora_mid\.", "a LyCORIS LoCon with Tucker factors (lora_mid)"),
    (r"\.diff(_b)?$", "a LyCORIS full-weight difference (.diff)"),
    (r"\.dora_scale$|\.lora_magnitude_vector", "a DoRA LoRA (dora_scale / lora_magnitude_vector)"),
)


_PEFT_TYPES = {"LOHA": "LoHa", "LOKR": "LoKr", "IA3": "(IA)^3", "ADALORA": "AdaLoRA"}


def _kohya_key(key: str) -> LoraKey | None:
    stem, _, suffix = key.partition(".")
    role = _KOHYA_ROLES.get(suffix)
    for prefix, component in families.kohya_prefixes():
        if role and stem.startswith(prefix):
            return LoraKey(component, kohya_to_dotted(stem[len(prefix) :]), role, "kohya", True)
    return None


def _refuse_variant(file: Path, keys: list[str], peft_config: dict | None) -> None:
    """Raise UnsupportedLora, naming the format, for adapters that are not plain LoRA."""
    kind = None
    peft_type = str((peft_config or {}).get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        kind = f"a PEFT {_PEFT_TYPES.get(peft_type, peft_type)} adapter"
    elif peft_config is not None and peft_config.get("use_dora"):
        kind = "a DoRA LoRA (use_dora)"
    for pattern, name in _VARIANTS:
        if kind is None and any(re.search(pattern, k) for k in keys):
            kind = name
    if kind is None:
        return
    why = "mixdiff applies plain LoRA and LoCon only"
    if "DoRA" in kind:  # PEFT refuses DoRA in mixed-adapter batches; diffusers drops kohya's dora_scale
        why = "a per-sample blend cannot apply DoRA's magnitudes exactly"
    raise UnsupportedLora(f"{file} is {kind}; {why}", "merge or extract it into a plain LoRA (lora_down/lora_up) and add that")


def _saved_module(key: str, saved: list[str]) -> str | None:
    """The module of a PEFT ``modules_to_save`` weight (``base_model.model.conv_out.weight``), else None."""
    module, _, leaf = key.removeprefix("base_model.model.").rpartition(".")
    if leaf in ("weight", "bias") and any(module == m or module.endswith("." + m) for m in saved):
        return module
    return None


def _lora_modules(file: Path, header: dict[str, dict], fmt: str, saved: list[str] | None = None) -> _Parsed:
    """Every key of a LoRA file as a module's down/up matrix, bias or alpha; a key that is none of these,
    a matrix without its partner, or ranks that disagree raise MalformedLora."""
    groups: dict[tuple[str, str], dict[str, tuple[str, list[int]]]] = {}  # module -> role -> (key, shape)
    names: dict[tuple[str, str], tuple[str, str]] = {}  # module -> how its layout names the two matrices
    layouts, saved_shapes = set(), {}
    for key, t in header.items():
        p = _kohya_key(key) if fmt == "kohya" else parse_key(key)
        if p is None and (module := _saved_module(key, saved or [])):
            if key.endswith(".weight") and len(t["shape"]) not in (2, 4):
                raise UnsupportedLora(f"{file} saves module {module} whole (modules_to_save), which is not a Linear or Conv2d layer",
                                      "train the adapter without modules_to_save, or with Linear / Conv2d modules only")
            if key.endswith(".weight"):
                saved_shapes[module] = (t["shape"][1], t["shape"][0])
            continue
        if p is None:
            raise MalformedLora(f"{file}: {key!r} is not part of a LoRA (a down/up or A/B matrix or an alpha)", _REEXPORT)
        groups.setdefault((p.component, p.module), {})[p.role] = (key, list(t["shape"]))
        if p.role in ("down", "up"):
            names[(p.component, p.module)] = _MATRICES.get(p.layout, _MATRICES["peft"])
            layouts.add("attn-procs" if p.layout == "attn-procs" else f"{fmt}-{p.layout}" if fmt == "diffusers" else fmt)
    modules, alphas = [], []
    for (component, path), g in groups.items():
        down, up = g.get("down"), g.get("up")
        a, b = names.get((component, path), _MATRICES["peft"])
        if down is None or up is None:
            have = b if up else a if down else "an alpha" if "alpha" in g else "a bias"
            raise MalformedLora(f"{file}: LoRA module {path} has {have} without its {a if up else b if down else 'matrices'}", _REEXPORT)
        (_, d), (_, u) = down, up
        # down (r, in[, kh, kw]), up (out, r[, 1, 1])
        paired = len(d) in (2, 4) and len(u) == len(d) and d[0] > 0 and u[1] == d[0] and (len(u) == 2 or u[2:] == [1, 1])
        if not paired:
            rank = u[1] if len(u) > 1 else "?"
            raise MalformedLora(f"{file}: LoRA module {path} has {a} {d} and {b} {u}, which do not pair up (rank {d[0]} vs {rank})", _REEXPORT)
        modules.append(_Module(component, path, d[0], d[1], u[0]))
        if "alpha" in g:
            alphas.append(g["alpha"][0])
    layout = next((x for x in ("attn-procs", "diffusers-script", "diffusers-peft", "peft", "kohya") if x in layouts), fmt)
    return _Parsed(modules, alphas, layout, saved_shapes)


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


def _inspect_lora(file: Path, header: dict[str, dict], meta: dict[str, str], fmt: str, peft_config: dict | None) -> SourceInfo:
    parsed = _lora_modules(file, header, fmt, (peft_config or {}).get("modules_to_save"))
    mods = parsed.modules
    if not mods:
        raise UnknownLoraFormat(f"{file} has LoRA-like keys but no down/A matrices", "export the LoRA again with diffusers, PEFT or kohya")
    sidecar = _sidecar(file)
    arch, arch_from = families.of_lora(mods, meta, sidecar)
    info = SourceInfo(
        kind="lora", format=fmt, arch=arch, arch_from=arch_from, file=file, rank=max(m.rank for m in mods),
        alpha=_alpha(file, header, meta, parsed, peft_config), targets=sorted({module_type(m.path) for m in mods}),
        has_text_encoder=any(m.component != "unet" for m in mods),
        unet_shapes={m.path: (m.in_features, m.out_features) for m in mods if m.component == "unet"},
        text_shapes={(m.component, m.path): (m.in_features, m.out_features) for m in mods if m.component != "unet"},
        saved_shapes=parsed.saved, layout=parsed.layout, metadata=meta,
        # layouts diffusers loads wrongly or not at all go through catalog.convert
        convert=fmt == "peft" or parsed.layout == "attn-procs" or (fmt == "diffusers" and bool(parsed.alphas)),
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
    if not parsed:
        return None
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
        _refuse_variant(file, list(header), peft_config)
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


# ---------------------------------------------------------------------------------------------
# loading (the one place that needs torch)


def lora_for_diffusers(info: SourceInfo) -> str | dict:
    """The argument for ``pipe.load_lora_weights`` that loads this LoRA exactly, with its own alpha.

    Layouts diffusers reads as they are (its own, kohya) load from their path. The others become a state
    dict through ``catalog.convert.diffusers_lora``: PEFT folders (diffusers does not read them),
    attention-processor files (diffusers 0.42 silently loads nothing) and diffusers files with network
    alphas (refused by diffusers); each module's alpha/r is folded into lora_B.
    """
    if info.kind != "lora":
        raise ValueError(f"{info.file} is a {info.kind}, not a LoRA")
    if not info.convert:
        return str(info.file)
    from safetensors.torch import load_file

    from mixdiff_cli.catalog.convert import diffusers_lora

    config_file = info.file.parent / PEFT_CONFIG
    config = _read_json(config_file) if info.format == "peft" and config_file.is_file() else None
    return diffusers_lora(load_file(info.file), config)
