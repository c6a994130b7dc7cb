"""The geometry of a diffusers `UNet2DConditionModel` from its config alone: the (in, out) features of every
module a LoRA may target, and the original SGM/LDM module names (CompVis, kohya) mapped to diffusers'.
Shared by the UNet families; reads no weights."""

from __future__ import annotations

import re
from typing import Any


def _per_block(value: Any, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


_SGM_FIXED = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
              "out.0": "conv_norm_out", "out.2": "conv_out"}  # fmt: skip
_SGM_RESNET = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def sgm_to_diffusers(path: str, cfg: dict) -> str | None:
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
    """diffusers UNet module names -> original SGM/LDM names (the inverse of ``sgm_to_diffusers``)."""
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


def _attention(rest: str, c: int, x: int, n_transformers: int) -> tuple[int, int] | None:
    """A Transformer2DModel of width c over context width x with `n_transformers` blocks."""
    m = re.match(r"transformer_blocks\.(\d+)\.(.+)$", rest)
    if m:
        if int(m.group(1)) >= n_transformers:
            return None
        return {
            "attn1.to_q": (c, c), "attn1.to_k": (c, c), "attn1.to_v": (c, c), "attn1.to_out.0": (c, c),
            "attn2.to_q": (c, c), "attn2.to_k": (x, c), "attn2.to_v": (x, c), "attn2.to_out.0": (c, c),
            "ff.net.0.proj": (c, 8 * c), "ff.net.2": (4 * c, c),
        }.get(m.group(2))  # fmt: skip
    return {"proj_in": (c, c), "proj_out": (c, c)}.get(rest)


class _Shape:
    """A UNet config read once: block widths, layers, context widths, transformer depths, time embedding."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.ch = list(cfg["block_out_channels"])
        nb = self.nb = len(self.ch)
        self.layers = _per_block(cfg.get("layers_per_block", 2), nb)
        self.down_types = list(cfg.get("down_block_types", []))
        self.up_types = list(cfg.get("up_block_types", []))
        self.cross = _per_block(cfg.get("cross_attention_dim", 1280), nb)
        tlayers = _per_block(cfg.get("transformer_layers_per_block", 1), nb)
        rev = cfg.get("reverse_transformer_layers_per_block")
        self.rev_tlayers = [_per_block(x, 1)[0] if not isinstance(x, list) else max(x) for x in rev] if rev else list(reversed(tlayers))
        self.tlayers = [max(x) if isinstance(x, (list, tuple)) else x for x in tlayers]
        self.temb = cfg.get("time_embedding_dim") or self.ch[0] * 4
        self.temb_out = self.temb * 2 if cfg.get("resnet_time_scale_shift") == "scale_shift" else self.temb

    def resnet(self, rest: str, cin: int, cout: int) -> tuple[int, int] | None:
        if rest == "conv_shortcut":
            return (cin, cout) if cin != cout else None
        return {"conv1": (cin, cout), "conv2": (cout, cout), "time_emb_proj": (self.temb, cout * (self.temb_out // self.temb))}.get(rest)

    def down(self, i: int, part: str, j: int, rest: str) -> tuple[int, int] | None:
        c, cin = self.ch[i], self.ch[i - 1] if i > 0 else self.ch[0]
        has_attn = "CrossAttn" in self.down_types[i] if i < len(self.down_types) else False
        if part == "downsamplers":
            return (c, c) if i < self.nb - 1 and j == 0 and rest == "conv" else None
        if j >= self.layers[i]:
            return None
        if part == "attentions":
            return _attention(rest, c, self.cross[i], self.tlayers[i]) if has_attn else None
        return self.resnet(rest, cin if j == 0 else c, c)

    def up(self, i: int, part: str, j: int, rest: str) -> tuple[int, int] | None:
        rch, rlayers, rcross = list(reversed(self.ch)), list(reversed(self.layers)), list(reversed(self.cross))
        c, prev = rch[i], rch[i - 1] if i > 0 else rch[0]
        skip_in = rch[min(i + 1, self.nb - 1)]
        has_attn = "CrossAttn" in self.up_types[i] if i < len(self.up_types) else False
        n_layers = rlayers[i] + 1
        if part == "upsamplers":
            return (c, c) if i < self.nb - 1 and j == 0 and rest == "conv" else None
        if j >= n_layers:
            return None
        if part == "attentions":
            return _attention(rest, c, rcross[i], self.rev_tlayers[i]) if has_attn else None
        skip = skip_in if j == n_layers - 1 else c
        return self.resnet(rest, (prev if j == 0 else c) + skip, c)

    def mid(self, part: str, j: int, rest: str) -> tuple[int, int] | None:
        if self.cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") is None:
            return None
        c = self.ch[-1]
        if part == "attentions":
            return _attention(rest, c, self.cross[-1], self.tlayers[-1]) if j == 0 else None
        return self.resnet(rest, c, c) if j < 2 else None


def expected_shape(path: str, cfg: dict) -> tuple[int, int] | None:
    """(in, out) features of a UNet module in a diffusers UNet2DConditionModel with config ``cfg``.

    None: no Linear / Conv2d of that name in that UNet (LoRA targets nothing else).
    """
    unet = _Shape(cfg)
    top = {"conv_in": (cfg.get("in_channels", 4), unet.ch[0]), "conv_out": (unet.ch[0], cfg.get("out_channels", 4)),
           "time_embedding.linear_1": (unet.ch[0], unet.temb), "time_embedding.linear_2": (unet.temb, unet.temb)}  # fmt: skip
    if path in top:
        return top[path]
    if path.startswith("add_embedding."):
        if cfg.get("addition_embed_type") != "text_time":
            return None
        linears = {"linear_1": (cfg.get("projection_class_embeddings_input_dim"), unet.temb), "linear_2": (unet.temb, unet.temb)}
        return linears.get(path.split(".", 1)[1])
    m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(attentions|resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$", path)
    if m:
        i = int(m.group(2))
        if i >= unet.nb:
            return None
        block = unet.down if m.group(1) == "down_blocks" else unet.up
        return block(i, m.group(3), int(m.group(4)), m.group(5))
    m = re.match(r"mid_block\.(attentions|resnets)\.(\d+)\.(.+)$", path)
    return unet.mid(m.group(1), int(m.group(2)), m.group(3)) if m else None


def unet_fit(shapes: dict[str, tuple[int, int]], cfg: dict, noun: str) -> str | None:
    """Why modules with these (in, out) shapes (SGM or diffusers names) do not all exist in a UNet, or None."""
    for path, (fin, fout) in sorted(shapes.items()):
        diffusers_path = sgm_to_diffusers(path, cfg)
        want = expected_shape(diffusers_path, cfg) if diffusers_path else None
        if want is None:
            return f"{noun} module {path} does not exist in the base UNet"
        if fin != want[0] or (fout and fout != want[1]):
            return f"{noun} shapes ({path}: {fin}->{fout}) do not match the base UNet ({want[0]}->{want[1]})"
    return None
