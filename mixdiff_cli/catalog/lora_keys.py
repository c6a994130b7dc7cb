"""LoRA key layouts: kohya, PEFT, diffusers and attention-processor names parsed into modules (component,
path, rank, shapes), and adapter kinds mixdiff refuses by name."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mixdiff_cli import families
from mixdiff_cli.catalog import lycoris
from mixdiff_cli.catalog.convert import LoraKey, parse_key
from mixdiff_cli.core.errors import MixdiffError



class UnknownLoraFormat(MixdiffError):
    pass



class UnsupportedLora(UnknownLoraFormat):
    """A known adapter format that mixdiff cannot apply exactly (LoHa, LoKr, (IA)^3, OFT, DoRA, ...)."""



class MalformedLora(MixdiffError):
    """LoRA keys that do not pair up (A without B, down without up) or whose ranks disagree."""




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
    lycoris: dict[str, int] = field(default_factory=dict)  # "LoHa 4x4" / "LoKr factor 4x4" -> modules of that kind


_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "lora_mid.weight": "mid"}
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


_LYCORIS_READ = ("a LyCORIS LoHa network", "a LyCORIS LoKr network", "a LyCORIS LoCon with Tucker factors (lora_mid)")  # exact LoRAs once rewritten (catalog.lycoris)
_PEFT_TYPES = {"LOHA": "LoHa", "LOKR": "LoKr", "IA3": "(IA)^3", "ADALORA": "AdaLoRA"}


def _kohya_key(key: str) -> LoraKey | None:
    stem, _, suffix = key.partition(".")
    role = _KOHYA_ROLES.get(suffix) or (suffix if suffix in lycoris.ROLES else None)
    for prefix, component in families.kohya_prefixes():
        if role and stem.startswith(prefix):
            return LoraKey(component, kohya_to_dotted(stem[len(prefix) :]), role, "kohya", True)
    return None


def _peft_lycoris_key(key: str) -> LoraKey | None:
    """A PEFT LoHa / LoKr tensor (``base_model.model.<module>.hada_w1_a``), else None."""
    module, _, role = key.removeprefix("base_model.model.").rpartition(".")
    return LoraKey("unet", module, role, "peft", False) if key.startswith("base_model.model.") and role in lycoris.ROLES else None


def _refuse_variant(file: Path, keys: list[str], peft_config: dict | None, fmt: str | None = None) -> None:
    """Raise UnsupportedLora, naming the format, for adapters that are not plain LoRA (kohya-named
    LyCORIS LoHa and LoKr files are read by `catalog.lycoris` instead)."""
    kind = None
    peft_type = str((peft_config or {}).get("peft_type", "LORA")).upper()
    if peft_type not in ("LORA", "LOHA", "LOKR"):  # PEFT LoHa / LoKr: read by catalog.lycoris
        kind = f"a PEFT {_PEFT_TYPES.get(peft_type, peft_type)} adapter"
    elif peft_config is not None and peft_config.get("use_dora"):
        kind = "a DoRA LoRA (use_dora)"
    for pattern, name in _VARIANTS:
        if fmt in ("kohya", "peft") and name in _LYCORIS_READ:
            continue
        if kind is None and any(re.search(pattern, k) for k in keys):
            kind = name
    if kind is None:
        return
    why, hint = "mixdiff applies LoRA, LoCon, LoHa and LoKr only", "merge or extract it into a plain LoRA (lora_down/lora_up) and add that"
    if "DoRA" in kind:  # PEFT refuses DoRA in mixed-adapter batches; diffusers drops kohya's dora_scale
        why = "a per-sample blend cannot apply DoRA's magnitudes exactly"
    elif kind in _LYCORIS_READ:  # LyCORIS' own module names (lycoris_…), not kohya's
        why = "mixdiff reads LyCORIS files with kohya's module names (lora_unet_…, lora_te_…) or as PEFT folders"
        hint = "save it with LyCORIS' kohya integration (network_module=lycoris.kohya), or convert its keys to lora_unet_…"
    raise UnsupportedLora(f"{file} is {kind}; {why}", hint)


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
        p = _kohya_key(key) if fmt == "kohya" else parse_key(key) or _peft_lycoris_key(key)
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
    modules, alphas, kinds = [], [], {}
    for (component, path), g in groups.items():
        if kind := lycoris.kind_of(set(g)):
            if any(t in g for t in lycoris.TUCKER):
                raise UnsupportedLora(f"{file} is a LyCORIS {lycoris.kind_of_name(kind)} with Tucker factors (module {path}); mixdiff "
                                      "applies LoHa and LoKr without them", "train it again without use_tucker, or merge it into the base")
            rank, fin, fout, detail = lycoris.module_shape(file, path, kind, {r: s for r, (_, s) in g.items()}, module_type(path))
            modules.append(_Module(component, path, rank, fin, fout))
            kinds[detail] = kinds.get(detail, 0) + 1
            alphas += [g["alpha"][0]] if "alpha" in g else []
            continue
        down, up = g.get("down"), g.get("up")
        a, b = names.get((component, path), _MATRICES["peft"])
        if down is None or up is None:
            have = b if up else a if down else "an alpha" if "alpha" in g else "a bias"
            raise MalformedLora(f"{file}: LoRA module {path} has {have} without its {a if up else b if down else 'matrices'}", _REEXPORT)
        (_, d), (_, u) = down, up
        if "mid" in g:  # LoCon with a Tucker core: down (r, in, 1, 1), mid (r, r, kh, kw), up (out, r, 1, 1)
            m = g["mid"][1]
            if not (len(d) == len(u) == len(m) == 4 and d[2:] == u[2:] == [1, 1] and m[0] == u[1] and m[1] == d[0]):
                raise MalformedLora(f"{file}: LoCon module {path} has lora_down {d}, lora_mid {m} and lora_up {u}, which do not make one weight", _REEXPORT)
            modules.append(_Module(component, path, min(u[1], u[0], d[1] * m[2] * m[3]), d[1], u[0]))
            kinds["LoCon with Tucker factors"] = kinds.get("LoCon with Tucker factors", 0) + 1
            alphas += [g["alpha"][0]] if "alpha" in g else []
            continue
        # down (r, in[, kh, kw]), up (out, r[, 1, 1])
        paired = len(d) in (2, 4) and len(u) == len(d) and d[0] > 0 and u[1] == d[0] and (len(u) == 2 or u[2:] == [1, 1])
        if not paired:
            rank = u[1] if len(u) > 1 else "?"
            raise MalformedLora(f"{file}: LoRA module {path} has {a} {d} and {b} {u}, which do not pair up (rank {d[0]} vs {rank})", _REEXPORT)
        modules.append(_Module(component, path, d[0], d[1], u[0]))
        if "alpha" in g:
            alphas.append(g["alpha"][0])
    layout = next((x for x in ("attn-procs", "diffusers-script", "diffusers-peft", "peft", "kohya") if x in layouts), fmt)
    return _Parsed(modules, alphas, layout, saved_shapes, kinds)


