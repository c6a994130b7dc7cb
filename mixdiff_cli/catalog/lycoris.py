"""LyCORIS LoHa and LoKr modules (kohya naming: ``lora_unet_<module>.hada_w1_a`` ...), read from headers
and rewritten as exact LoRAs, so every blend's per-sample LoRA path applies them unchanged.

    LoHa  dW = s (w1a w1b) * (w2a w2b)          = B A, rank r1 r2: B[o, (p, q)] = w1a[o, p] w2a[o, q],
                                                   A[(p, q), i] = w1b[p, i] w2b[q, i]
    LoKr  dW = s kron(w1, w2a w2b)              = kron(w1, w2a) kron(I_b, w2b), rank b r
          (w1 may itself be w1a w1b; a whole w2 has no low-rank form and falls back to a dense dW)

s = alpha / r as LyCORIS (and A1111's ``network_hada`` / ``network_lokr``) scale them: r is the LoHa
dimension, or the LoKr factor's rank (s = 1 when neither LoKr factor is decomposed). On a convolution
the B A form keeps A as the k x k kernel and B as a 1 x 1 one. A rank that reaches min(out, in k k)
gains nothing: the module becomes dW itself times an identity, still exact. Tucker factors (``hada_t1``,
``lokr_t2``) are refused by name.

Reading headers needs no torch; `as_lora` does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from mixdiff_cli.catalog.convert import peft_pattern
from mixdiff_cli.core.errors import MixdiffError

if TYPE_CHECKING:
    import torch

HADA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
TUCKER = ("hada_t1", "hada_t2", "lokr_t2")  # refused; a LoCon's lora_mid is folded into its lora_down instead (`_untucked`)
ROLES = (*HADA, *LOKR, *TUCKER)
# UNet module types that are 3 x 3 convolutions: diffusers names, then the SGM names kohya uses for SDXL
KERNEL3 = frozenset({"conv1", "conv2", "conv_in", "conv_out", "conv", "in_layers.2", "out_layers.3", "op"})
KERNEL3_PATHS = frozenset({"input_blocks.0.0", "out.2"})  # SGM conv_in, conv_out
_REEXPORT = "the file is incomplete or was written by a broken tool; export it again"


class LycorisShapeError(MixdiffError):
    """LoHa / LoKr factors whose shapes do not make the module's weight."""


def kind_of(roles: set[str]) -> str | None:
    """"loha", "lokr" or None (a plain LoRA module) from a module's tensor roles."""
    if roles & set(HADA) or "hada_t1" in roles:
        return "loha"
    if roles & set(LOKR):
        return "lokr"
    return None


def module_shape(file: Any, path: str, kind: str, shapes: Mapping[str, list[int]], mtype: str) -> tuple[int, int, int, str]:
    """(effective LoRA rank, in features, out features, description) of one LoHa / LoKr module from its
    header shapes (role -> shape); `mtype` (``catalog.lora_keys.module_type``) tells a 3 x 3 convolution,
    whose factors flatten in x 3 x 3. Raises `LycorisShapeError` on factors that do not fit together
    (the caller refuses Tucker factors, `TUCKER`, first)."""
    bad = lambda what: LycorisShapeError(f"{file}: {kind_of_name(kind)} module {path}: {what}", _REEXPORT)  # noqa: E731
    if kind == "loha":
        missing = [r for r in HADA if r not in shapes]
        if missing:
            raise bad(f"no {missing[0]}")
        w1a, w1b, w2a, w2b = (shapes[r] for r in HADA)
        if not (len(w1a) == len(w1b) == len(w2a) == len(w2b) == 2 and w1a[1] == w1b[0] and w2a[1] == w2b[0] and w1a[0] == w2a[0] and w1b[1] == w2b[1]):
            raise bad(f"hada_w1_a {w1a} x hada_w1_b {w1b} and hada_w2_a {w2a} x hada_w2_b {w2b} do not make one weight")
    else:
        if not ("lokr_w1" in shapes or ("lokr_w1_a" in shapes and "lokr_w1_b" in shapes and shapes["lokr_w1_a"][1] == shapes["lokr_w1_b"][0])):
            raise bad("lokr_w1 (or lokr_w1_a and lokr_w1_b of one rank) is missing or does not pair up")
        if not ("lokr_w2" in shapes or ("lokr_w2_a" in shapes and "lokr_w2_b" in shapes and shapes["lokr_w2_a"][1] == shapes["lokr_w2_b"][0])):
            raise bad("lokr_w2 (or lokr_w2_a and lokr_w2_b of one rank) is missing or does not pair up")
    out_f, flat, rank, detail = _dims(kind, shapes)
    kernel = 9 if (mtype in KERNEL3 or path in KERNEL3_PATHS) and flat % 9 == 0 else 1
    return rank, flat // kernel, out_f, detail


def _dims(kind: str, shapes: Mapping[str, list[int]]) -> tuple[int, int, int, str]:
    """(out features, in features x kernel, effective LoRA rank, description) of a module whose factors
    `module_shape` checked: a rank that reaches min(out, in k k) counts as that (the dense dW)."""
    import math

    if kind == "loha":
        w1a, w1b, w2a = shapes["hada_w1_a"], shapes["hada_w1_b"], shapes["hada_w2_a"]
        out_f, flat, rank, detail = w1a[0], w1b[1], w1a[1] * w2a[1], f"LoHa {w1a[1]}x{w2a[1]}"
    else:
        w1 = shapes.get("lokr_w1") or [shapes["lokr_w1_a"][0], shapes["lokr_w1_b"][1]]
        if "lokr_w2" in shapes:  # no low-rank form
            c, d_flat, rank = shapes["lokr_w2"][0], math.prod(shapes["lokr_w2"][1:]), None
        else:
            c, d_flat, rank = shapes["lokr_w2_a"][0], shapes["lokr_w2_b"][1], w1[1] * shapes["lokr_w2_a"][1]
        out_f, flat, detail = w1[0] * c, w1[1] * d_flat, f"LoKr factor {w1[0]}x{w1[1]}"
    dense = min(out_f, flat)
    return out_f, flat, dense if rank is None else min(rank, dense), detail


def kind_of_name(kind: str) -> str:
    return {"loha": "LoHa", "lokr": "LoKr"}.get(kind, kind)


def scale(kind: str, weights: Mapping[str, torch.Tensor], alpha: float | None) -> float:
    """alpha / r as LyCORIS scales a module: r the LoHa dimension, or the rank of a LoKr's decomposed
    factor (1 when neither is decomposed, as LyCORIS and A1111 do); no alpha: alpha = r."""
    if kind == "loha":
        dim = int(weights["hada_w1_b"].shape[0])
    elif "lokr_w1_b" in weights or "lokr_w2_b" in weights:
        dim = int((weights.get("lokr_w1_b") if "lokr_w1_b" in weights else weights["lokr_w2_b"]).shape[0])
    else:
        return 1.0
    return 1.0 if alpha is None or alpha == 0 else float(alpha) / dim


def factors(kind: str, w: Mapping[str, torch.Tensor], weight_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (out, R), down (R, in k k)) with up @ down = the module's unscaled dW, flattened as LyCORIS
    flattens a convolution's weight; `weight_shape` is the base module's weight shape."""
    import torch

    f = {k: v.float() for k, v in w.items()}
    out_f = weight_shape[0]
    flat = int(torch.tensor(weight_shape[1:]).prod()) if len(weight_shape) > 1 else 1
    if kind == "loha":
        (r1, r2) = f["hada_w1_a"].shape[1], f["hada_w2_a"].shape[1]
        up = (f["hada_w1_a"][:, :, None] * f["hada_w2_a"][:, None, :]).reshape(out_f, r1 * r2)
        down = (f["hada_w1_b"][:, None, :] * f["hada_w2_b"][None, :, :]).reshape(r1 * r2, flat)
        return up, down
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    b = w1.shape[1]
    if "lokr_w2" in f:  # no low-rank form: dW itself
        w2 = f["lokr_w2"].reshape(f["lokr_w2"].shape[0], -1)
        if len(weight_shape) == 4 and f["lokr_w2"].dim() == 4:  # kron over channels, the kernel kept: (a c, b d, k, k)
            full = torch.kron(w1[:, :, None, None].contiguous(), f["lokr_w2"].contiguous()).reshape(out_f, flat)
        else:
            full = torch.kron(w1, w2)
        return full, torch.eye(flat)
    up = torch.kron(w1, f["lokr_w2_a"])  # (a c, b r)
    # (b r, b d k k): column j' d k k + d' k k + kk, which is input channel j' d + d' at kernel tap kk, as the weight flattens
    down = torch.kron(torch.eye(b), f["lokr_w2_b"])
    return up, down


def as_lora(state: Mapping[str, torch.Tensor], weight_shape: Callable[[str], tuple[int, ...] | None]) -> dict[str, torch.Tensor]:
    """`state` (a kohya-named file) with every LoHa / LoKr module rewritten as ``lora_down`` /
    ``lora_up``, the LyCORIS scale folded into lora_up, and no alphas: plain LoRA modules get their
    alpha / rank folded in the same way, since diffusers applies one alpha per file exactly but not a
    pattern of them. `weight_shape(stem)`: the base module's weight shape for a kohya stem (``lora_unet_...``)."""
    lycoris = {key.partition(".")[0] for key in state if key.partition(".")[2] in ROLES}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = dict(_untucked(state))
    for key, t in state.items():
        stem, _, role = key.partition(".")
        if stem in lycoris:
            modules.setdefault(stem, {})[role] = t
        elif key not in out and not key.endswith(".lora_mid.weight"):
            out[key] = t
    for key in [k for k in out if k.endswith(".alpha")]:  # a plain module: fold alpha / rank into lora_up
        stem, alpha = key[: -len(".alpha")], float(out.pop(key))
        if f"{stem}.lora_down.weight" in out and f"{stem}.lora_up.weight" in out:
            out[f"{stem}.lora_up.weight"] = out[f"{stem}.lora_up.weight"] * (alpha / out[f"{stem}.lora_down.weight"].shape[0])
    for stem, w in modules.items():
        kind = kind_of(set(w))
        shape = weight_shape(stem)
        if kind is None or shape is None:
            raise LycorisShapeError(f"{stem}: no module of the base model has this LyCORIS module's name", "check the file's base model")
        down, up = _lora_pair(kind, w, shape, scale(kind, w, float(w["alpha"]) if "alpha" in w else None))
        out.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up})
    return out


def _lora_pair(kind: str, w: Mapping[str, torch.Tensor], shape: tuple[int, ...], s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of one module with up @ down = s dW, shaped for the base module's weight `shape` (a
    convolution: down the k x k kernel, up 1 x 1); a rank that gains nothing becomes dW itself."""
    up, down = factors(kind, w, shape)
    up = up * s
    if up.shape[1] >= min(up.shape[0], down.shape[1]):
        up, down = _dense(up @ down)
    rank = down.shape[0]
    if len(shape) == 4:
        down, up = down.reshape(rank, *shape[1:]), up.reshape(up.shape[0], rank, 1, 1)
    return down.contiguous(), up.contiguous()


def _untucked(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``lora_down`` of every LoCon module with a Tucker core (``lora_mid`` (r, r, kh, kw) between
    a 1 x 1 down and up): the core folded into it, down' = mid x down (r, in, kh, kw), so up down' is the
    module's dW exactly (as LyCORIS' ``rebuild_tucker`` and A1111's ``rebuild_cp_decomposition``)."""
    import torch

    out = {}
    for key, mid in state.items():
        if key.endswith(".lora_mid.weight"):
            stem = key[: -len(".lora_mid.weight")]
            down = state[f"{stem}.lora_down.weight"].float()
            out[f"{stem}.lora_down.weight"] = torch.einsum("pqab,qi->piab", mid.float(), down.reshape(down.shape[0], -1))
    return out


def _dense(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) of rank min(out, in) with up @ down = delta exactly: one side is an identity."""
    import torch

    out_f, flat = delta.shape
    return (delta, torch.eye(flat)) if flat <= out_f else (torch.eye(out_f), delta)


def peft_as_lora(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], weight_shape: Callable[[str], tuple[int, ...] | None]) -> dict[str, torch.Tensor]:
    """A PEFT LoHa / LoKr adapter (``base_model.model.<module>.hada_w1_a`` ..., its adapter_config.json)
    as a LoRA state dict ``<module>.lora_A.weight`` / ``.lora_B.weight`` with PEFT's scale alpha / r
    (rank_pattern, alpha_pattern) folded into lora_B: `load_lora_adapter` then applies it at scale 1.
    `weight_shape(module)`: the base module's weight shape."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        module, _, role = key.removeprefix("base_model.model.").rpartition(".")
        if role not in ROLES:
            raise LycorisShapeError(f"{key!r} is not part of a PEFT LoHa / LoKr adapter", _REEXPORT)
        modules.setdefault(module, {})[role] = t
    out: dict[str, torch.Tensor] = {}
    for module, w in modules.items():
        kind, shape = kind_of(set(w)), weight_shape(module)
        if kind is None or shape is None:
            raise LycorisShapeError(f"{module}: no module of the base model has this adapter module's name", "check the adapter's base model")
        r = peft_pattern(config.get("rank_pattern") or {}, module, config.get("r", 8))
        alpha = peft_pattern(config.get("alpha_pattern") or {}, module, config.get("alpha", r))
        down, up = _lora_pair(kind, w, shape, float(alpha) / float(r))
        out.update({f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up})
    return out


def loaded_elements(shapes: Mapping[str, list[int]]) -> int | None:
    """Elements a file's LoRA factors take once its LyCORIS modules are rewritten (rank (in k k + out)
    each; a Tucker LoCon's core folded into its down; other tensors as they are), from header shapes
    (key -> shape); None without LyCORIS modules."""
    import math

    groups: dict[str, dict[str, list[int]]] = {}
    total, found = 0, False
    for key, shape in shapes.items():
        stem, role = key.removeprefix("base_model.model.").rpartition(".")[::2] if key.startswith("base_model.model.") else key.partition(".")[::2]
        if role in ROLES:
            groups.setdefault(stem, {})[role] = list(shape)
            found = True
        elif role == "lora_mid.weight":  # a Tucker LoCon: lora_down becomes (r, in, k, k), the core goes
            found = True
            down = shapes.get(f"{stem}.lora_down.weight") or [0, 0]
            total += shape[0] * down[1] * math.prod(shape[2:]) - math.prod(down)
        elif len(shape) > 1:
            total += math.prod(shape)
    for g in groups.values():  # the file passed module_shape at add-expert
        if (kind := kind_of(set(g))) is not None:
            out_f, flat, rank, _ = _dims(kind, g)
            total += rank * (flat + out_f)
    return total if found else None

