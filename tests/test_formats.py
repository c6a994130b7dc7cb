"""Format, architecture and metadata detection from headers only, and every refusal as a typed error."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mixdiff_cli import families
from mixdiff_cli.core.errors import MixdiffError
from mixdiff_cli.catalog.fit import ArchitectureMismatch, fits_base, require_fit
from mixdiff_cli.catalog.lycoris import LycorisShapeError
from mixdiff_cli.catalog.formats import AmbiguousSource, BadSidecar, inspect_source, NoModelFound, SourceNotFound
from mixdiff_cli.catalog.headers import autov2, CorruptSafetensors, NotSafetensors, PickleRefused, sha256_file
from mixdiff_cli.catalog.lora_keys import kohya_to_dotted, module_type, UnknownLoraFormat
from mixdiff_cli.families.unet_geometry import diffusers_to_sgm

ATTN = ["to_k", "to_out.0", "to_q", "to_v"]
TE = ["k_proj", "out_proj", "q_proj", "v_proj"]


def unet_config(pipe: Path) -> dict:
    return json.loads((pipe / "unet" / "config.json").read_text())


def write_safetensors(path: Path, shapes: dict[str, list[int]], metadata: dict[str, str] | None = None, fill=0.0) -> Path:
    """A float32 safetensors file with the given tensor shapes, written with the real library."""
    import numpy as np
    from safetensors.numpy import save_file

    save_file({k: np.full(s, fill, dtype=np.float32) for k, s in shapes.items()}, str(path), metadata=metadata)
    return path


# --- every fixture format ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("fmt", ["diffusers", "peft", "kohya"])
def test_lora_fixture_detected(lora_files, lora_specs, tiny_sd, tiny_sdxl, arch, fmt):
    path, spec = lora_files[(arch, fmt)], lora_specs[(arch, fmt)]
    info = inspect_source(path)
    assert (info.kind, info.format, info.arch) == ("lora", fmt, arch)
    assert (info.rank, info.alpha) == (spec["rank"], spec["alpha"])
    assert info.targets == ATTN and not info.has_text_encoder
    weights = path / "adapter_model.safetensors" if fmt == "peft" else path
    assert info.file == weights
    assert info.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    own, other = (tiny_sd, tiny_sdxl) if arch == "sd1" else (tiny_sdxl, tiny_sd)
    assert fits_base(info, unet_config(own)) is None
    assert fits_base(info, unet_config(other))  # a reason, whatever the evidence


def test_tiny_arch_evidence(lora_files):
    """Tiny SDXL LoRAs are SDXL by their keys; tiny SD LoRAs are SD 1.x by default (no 768/1024 widths)."""
    assert inspect_source(lora_files[("sdxl", "peft")]).arch_from == "keys"  # transformer_blocks.1
    assert inspect_source(lora_files[("sd1", "peft")]).arch_from == "default"
    assert inspect_source(lora_files[("sd1", "kohya")]).arch_from == "metadata"  # ss_base_model_version


@pytest.mark.parametrize("key", [("sd1", "diffusers"), ("sd1", "kohya"), ("sdxl", "diffusers"), ("sdxl", "kohya")])
def test_text_encoder_lora_detected(lora_te_files, key):
    info = inspect_source(lora_te_files[key])
    assert info.has_text_encoder and info.arch == key[0] and info.format == key[1]
    assert info.targets == sorted(ATTN + TE)
    assert info.rank == 4 and info.alpha == 4.0


def test_peft_reads_adapter_config(lora_files, tmp_path):
    folder = Path(shutil.copytree(lora_files[("sd1", "peft")], tmp_path / "adapter"))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    config["lora_alpha"] = 32
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert inspect_source(folder).alpha == 32.0
    assert inspect_source(folder / "adapter_config.json").alpha == 32.0  # the config file names its folder too
    # the weights alone, without their config: still PEFT, alpha unknown
    alone = shutil.copyfile(folder / "adapter_model.safetensors", tmp_path / "alone.safetensors")
    info = inspect_source(alone)
    assert (info.format, info.rank, info.alpha) == ("peft", 4, None)


def test_diffusers_folder_and_legacy_attention_processor_keys(lora_files, tmp_path):
    folder = tmp_path / "trained"
    folder.mkdir()
    shutil.copyfile(lora_files[("sd1", "diffusers")], folder / "pytorch_lora_weights.safetensors")
    assert inspect_source(folder).format == "diffusers"
    legacy = write_safetensors(
        tmp_path / "legacy.safetensors",
        {
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight": [4, 768],
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.up.weight": [320, 4],
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.down.weight": [4, 320],
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight": [320, 4],
        },
    )
    info = inspect_source(legacy)
    assert (info.format, info.arch, info.rank, info.targets) == ("diffusers", "sd1", 4, ["to_k", "to_out.0"])


# --- metadata users ship -------------------------------------------------------------------------


def test_modelspec_metadata(lora_files):
    info = inspect_source(lora_files[("sdxl", "diffusers")])
    assert info.title == "Tiny XL Ink"
    assert info.trigger == ["inkd", "ink drawing"]
    assert info.description == "black ink drawings"
    assert info.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_kohya_ss_metadata(lora_files):
    info = inspect_source(lora_files[("sd1", "kohya")])
    assert info.title == "pixel_style"  # ss_output_name
    assert info.trigger == ["pixel art"]  # the most frequent tag of ss_tag_frequency
    assert info.alpha == 2.0 and info.rank == 4  # alpha read from the .alpha tensors


def test_kohya_alpha_falls_back_to_ss_network_alpha(lora_files, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(lora_files[("sd1", "kohya")], "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.endswith(".alpha")}
        meta = f.metadata()
    save_file(tensors, tmp_path / "no-alpha.safetensors", metadata={**meta, "ss_network_alpha": "1.5"})
    assert inspect_source(tmp_path / "no-alpha.safetensors").alpha == 1.5
    del meta["ss_network_alpha"]
    save_file(tensors, tmp_path / "bare.safetensors", metadata=meta)
    assert inspect_source(tmp_path / "bare.safetensors").alpha == 4.0  # kohya: no alpha means alpha = rank


def test_a1111_sidecar_wins_over_header(lora_files, tmp_path):
    src = Path(shutil.copyfile(lora_files[("sdxl", "diffusers")], tmp_path / "ink.safetensors"))
    side = {"activation text": "zxq style, blots", "preferred weight": 0.6, "description": "my notes", "sd version": "SDXL"}
    src.with_suffix(".json").write_text(json.dumps(side))
    info = inspect_source(src)
    assert (info.trigger, info.preferred_weight, info.description) == (["zxq style", "blots"], 0.6, "my notes")
    assert info.title == "Tiny XL Ink"  # the sidecar has no title; the header's stays
    src.with_suffix(".json").write_text(json.dumps({"preferred weight": 0, "activation text": ""}))
    info = inspect_source(src)
    assert info.preferred_weight is None and info.trigger == ["inkd", "ink drawing"]  # A1111's 0 means unset
    src.with_suffix(".json").write_text("{oops")
    with pytest.raises(BadSidecar, match="ink.json"):
        inspect_source(src)


def test_sha256_and_autov2(lora_files, tmp_path):
    path = lora_files[("sd1", "kohya")]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_file(path) == digest
    assert autov2(digest) == digest[:10]
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * (1 << 20) + 17))  # crosses 1 MiB chunk boundaries
    assert sha256_file(big) == hashlib.sha256(big.read_bytes()).hexdigest()
    assert inspect_source(path, checksum=False).sha256 is None


# --- full models ---------------------------------------------------------------------------------


def test_full_models(full_model, full_model_file, tiny_sd, tiny_sdxl):
    info = inspect_source(full_model)
    assert (info.kind, info.format, info.arch) == ("model", "diffusers-model", "sd1")
    assert info.file == full_model / "diffusion_pytorch_model.safetensors"
    assert info.unet_config["cross_attention_dim"] == 32
    assert fits_base(info, unet_config(tiny_sd)) is None
    assert fits_base(info, unet_config(tiny_sdxl)) == "model for SD 1.x, base is SDXL"
    assert inspect_source(full_model / "diffusion_pytorch_model.safetensors").format == "diffusers-model"

    pipe = inspect_source(tiny_sdxl, checksum=False)
    assert (pipe.kind, pipe.format, pipe.arch, pipe.file.parent.name) == ("model", "diffusers-model", "sdxl", "unet")
    assert inspect_source(tiny_sd / "model_index.json", checksum=False).arch == "sd1"

    single = inspect_source(full_model_file)
    assert (single.kind, single.format, single.arch) == ("model", "single-file", "sd1")


@pytest.mark.parametrize(
    "keys, arch",
    [
        ({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 768]}, "sd1"),
        ({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 1024]}, "sd2"),
        ({"model.diffusion_model.label_emb.0.0.weight": [8, 8]}, "sdxl"),
        ({"model.diffusion_model.out.2.weight": [4, 8], "cond_stage_model.model.ln_final.weight": [8]}, "sd2"),
    ],
)
def test_single_file_arch(tmp_path, keys, arch):
    assert inspect_source(write_safetensors(tmp_path / "ckpt.safetensors", keys)).arch == arch


# --- architecture rules on real dimensions (headers only, tiny data) -----------------------------

SD15 = dict(
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)  # fmt: skip
SD21 = dict(SD15, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
SDXL = dict(
    block_out_channels=[320, 640, 1280], layers_per_block=2, cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], transformer_layers_per_block=[1, 2, 10],
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)  # fmt: skip


def test_arch_of_unet_config():
    assert [families.of_config(c).name for c in (SD15, SD21, SDXL)] == ["sd1", "sd2", "sdxl"]
    assert {n: families.label(n) for n in families.names()} == {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def _lora(tmp_path: Path, name: str, pairs: dict[str, tuple[int, int]], kohya: bool = False, metadata=None) -> Path:
    shapes = {}
    for module, (fin, fout) in pairs.items():
        if kohya:
            shapes |= {f"{module}.lora_down.weight": [4, fin], f"{module}.lora_up.weight": [fout, 4], f"{module}.alpha": []}
        else:
            shapes |= {f"{module}.lora_A.weight": [4, fin], f"{module}.lora_B.weight": [fout, 4]}
    return write_safetensors(tmp_path / f"{name}.safetensors", shapes, metadata, fill=1.0)


K = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"


@pytest.mark.parametrize(
    "name, pairs, kohya, metadata, arch, evidence",
    [
        ("sd15", {K: (768, 640)}, False, None, "sd1", "shapes"),
        ("sd21", {K: (1024, 640)}, False, None, "sd2", "shapes"),
        ("sdxl", {K: (2048, 640)}, False, None, "sdxl", "shapes"),
        ("sgm", {"lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q": (640, 640)}, True, None, "sdxl", "keys"),
        ("te2", {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280)}, True, None, "sdxl", "keys"),
        ("meta", {"unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (1280, 1280)}, False, {"ss_base_model_version": "sd_v2"}, "sd2", "metadata"),
        ("spec", {"unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (1280, 1280)}, False, {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl", "metadata"),
        ("none", {"unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (1280, 1280)}, False, None, "sd1", "default"),
    ],
)  # fmt: skip
def test_arch_rules_on_real_dimensions(tmp_path, name, pairs, kohya, metadata, arch, evidence):
    info = inspect_source(_lora(tmp_path, name, pairs, kohya, metadata))
    assert (info.arch, info.arch_from) == (arch, evidence)


def test_fits_base_on_real_configs(tmp_path):
    sdxl = inspect_source(_lora(tmp_path, "xl", {"lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k": (2048, 640)}, kohya=True))
    assert fits_base(sdxl, SDXL) is None  # SGM names mapped onto the diffusers UNet
    assert fits_base(sdxl, SD15) == "LoRA for SDXL, base is SD 1.x"
    with pytest.raises(ArchitectureMismatch) as err:
        require_fit(sdxl, SD21)
    assert err.value.message == "LoRA for SDXL, base is SD 2.x" and err.value.hint
    sd15 = inspect_source(_lora(tmp_path, "v15", {K: (768, 640)}))
    assert fits_base(sd15, SD15) is None
    assert fits_base(sd15, SD21) == "LoRA for SD 1.x, base is SD 2.x"
    # no width evidence (a self-attention-only LoRA): decided by shapes, not by the sd1 default
    blind = inspect_source(_lora(tmp_path, "blind", {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (320, 320)}))
    assert blind.arch_from == "default" and fits_base(blind, SD21) is None
    assert fits_base(blind, SDXL) == "LoRA module down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q does not exist in the base UNet"
    wide = inspect_source(_lora(tmp_path, "wide", {"unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (1280, 1280)}))
    assert fits_base(wide, dict(SD15, block_out_channels=[320, 640, 1280, 1024])) == (
        "LoRA shapes (mid_block.attentions.0.transformer_blocks.0.attn1.to_q: 1280->1280) do not match the base UNet (1024->1024)"
    )


def test_tiny_shape_mismatch(lora_files, tiny_sd):
    cfg = dict(unet_config(tiny_sd), cross_attention_dim=48)
    reason = fits_base(inspect_source(lora_files[("sd1", "diffusers")]), cfg)
    assert reason.startswith("LoRA shapes (") and "attn2.to_k: 32->32" in reason and "(48->32)" in reason


@pytest.mark.parametrize("name, cfg", [("sd15", SD15), ("sd21", SD21), ("sdxl", SDXL), ("tiny-sd", None), ("tiny-sdxl", None)])
def test_expected_shapes_match_diffusers_unets(name, cfg, tiny_sd, tiny_sdxl):
    """Every Linear/Conv2d of a real UNet (on the meta device) has the (in, out) fits_base expects,
    and its SGM name maps back to the diffusers name."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from mixdiff_cli.families.unet_geometry import expected_shape as _expected_shape, sgm_to_diffusers as _sgm_to_diffusers

    if cfg is None:
        cfg = unet_config(tiny_sd if name == "tiny-sd" else tiny_sdxl)
    with init_empty_weights():
        unet = UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    full = dict(unet.config)
    checked = 0
    for module_name, mod in unet.named_modules():
        if isinstance(mod, torch.nn.Linear):
            shape = (mod.in_features, mod.out_features)
        elif isinstance(mod, torch.nn.Conv2d):
            shape = (mod.in_channels, mod.out_channels)
        else:
            continue
        assert _sgm_to_diffusers(diffusers_to_sgm(module_name, full), full) == module_name
        want = _expected_shape(module_name, full)
        if want != "?":
            assert want == shape, module_name
            checked += 1
    assert checked > 100


def test_name_helpers():
    assert kohya_to_dotted("down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0") == "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0"
    assert kohya_to_dotted("text_model_encoder_layers_11_self_attn_out_proj") == "text_model.encoder.layers.11.self_attn.out_proj"
    assert module_type("up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj") == "ff.net.0.proj"
    assert module_type("text_model.encoder.layers.0.mlp.fc1") == "fc1"
    assert diffusers_to_sgm("down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q", SDXL) == "input_blocks.4.1.transformer_blocks.1.attn1.to_q"
    assert diffusers_to_sgm("up_blocks.0.upsamplers.0.conv", SDXL) == "output_blocks.2.2.conv"


# --- refusals ------------------------------------------------------------------------------------


def _assert_one_line(err: MixdiffError, *words: str) -> None:
    assert isinstance(err, MixdiffError) and err.hint
    assert "\n" not in err.message and "\n" not in err.hint
    for word in words:
        assert word in str(err), str(err)


def test_missing_path(tmp_path):
    with pytest.raises(SourceNotFound) as err:
        inspect_source(tmp_path / "nope.safetensors")
    _assert_one_line(err.value, "nope.safetensors", "does not exist")


def test_folder_without_model(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(NoModelFound) as err:
        inspect_source(tmp_path)
    _assert_one_line(err.value, str(tmp_path), "no model or LoRA")


def test_folder_with_several_files(lora_files, tmp_path):
    shutil.copyfile(lora_files[("sd1", "kohya")], tmp_path / "a.safetensors")
    shutil.copyfile(lora_files[("sd1", "kohya")], tmp_path / "b.safetensors")
    with pytest.raises(AmbiguousSource) as err:
        inspect_source(tmp_path)
    _assert_one_line(err.value, "a.safetensors", "b.safetensors")


@pytest.mark.parametrize("content", [b"hello, I am not a tensor file", b"", b"short", b"\xff" * 8 + b"{not json"])
def test_text_renamed_safetensors(tmp_path, content):
    path = tmp_path / "notes.safetensors"
    path.write_bytes(content)
    with pytest.raises(NotSafetensors) as err:
        inspect_source(path)
    _assert_one_line(err.value, "notes.safetensors", "not a safetensors file")


def test_other_suffix_is_checked_by_content(lora_files, tmp_path):
    (tmp_path / "notes.txt").write_text("plain text, long enough")
    with pytest.raises(NotSafetensors):
        inspect_source(tmp_path / "notes.txt")
    renamed = shutil.copyfile(lora_files[("sd1", "kohya")], tmp_path / "lora.sft")
    assert inspect_source(renamed).format == "kohya"  # a safetensors file under another name is fine


def test_truncated_header(lora_files, tmp_path):
    data = lora_files[("sd1", "kohya")].read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: 8 + n // 2])
    with pytest.raises(CorruptSafetensors) as err:
        inspect_source(path)
    _assert_one_line(err.value, "cut.safetensors", "truncated", "again")


def test_truncated_data_is_refused_not_half_read(lora_files, tmp_path):
    """Decision: a file whose data section is shorter than its header says is refused outright
    (CorruptSafetensors) although the header alone would describe it; loading it would fail later."""
    data = lora_files[("sd1", "kohya")].read_bytes()
    path = tmp_path / "half.safetensors"
    path.write_bytes(data[:-100])
    with pytest.raises(CorruptSafetensors) as err:
        inspect_source(path)
    _assert_one_line(err.value, "half.safetensors", "truncated", "tensor data")


def test_damaged_header_json(tmp_path):
    header = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'  # no closing brace
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(CorruptSafetensors, match="damaged header"):
        inspect_source(path)


@pytest.mark.parametrize("name", ["old.ckpt", "model.bin", "lora.pt", "weights.pth"])
def test_pickle_refused(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x04\x95 fake pickle")
    with pytest.raises(PickleRefused) as err:
        inspect_source(path)
    _assert_one_line(err.value, name, "never unpickle", "safetensors.torch", "save_file")


def test_pickle_in_disguise_refused(tmp_path):
    path = tmp_path / "sneaky.safetensors"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 64)  # torch.save's zip archive under a safetensors name
    with pytest.raises(PickleRefused, match="despite its name"):
        inspect_source(path)
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(PickleRefused, match="adapter_model.bin"):
        inspect_source(folder)


def test_unknown_and_lycoris_formats(tmp_path):
    with pytest.raises(UnknownLoraFormat, match="first keys: embedding.weight"):
        inspect_source(write_safetensors(tmp_path / "emb.safetensors", {"embedding.weight": [4, 8]}))
    loha = {"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": [4, 4], "lora_unet_mid_block_attentions_0_proj_in.alpha": []}
    with pytest.raises(LycorisShapeError, match="LoHa module mid_block.attentions.0.proj_in: no hada_w1_b"):
        inspect_source(write_safetensors(tmp_path / "loha.safetensors", loha))


def test_sdxl_lora_on_sd_base(lora_files, tiny_sd):
    for fmt in ("diffusers", "peft", "kohya"):
        info = inspect_source(lora_files[("sdxl", fmt)])
        assert fits_base(info, unet_config(tiny_sd)) == "LoRA for SDXL, base is SD 1.x"
        with pytest.raises(ArchitectureMismatch) as err:
            require_fit(info, unet_config(tiny_sd))
        _assert_one_line(err.value, "LoRA for SDXL, base is SD 1.x")


# --- headers only --------------------------------------------------------------------------------


def test_inspection_reads_headers_only(tmp_path):
    """Of a 2 GiB sparse data section nothing is read or mapped: only the header (and alpha scalars)."""
    module = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    entries = {
        f"{module}.alpha": ("F32", [], 4),
        f"{module}.lora_down.weight": ("F32", [16384, 16384], 1 << 30),
        f"{module}.lora_up.weight": ("F32", [16384, 16384], 1 << 30),
    }
    header, offset = {"__metadata__": {"ss_network_dim": "16384"}}, 0
    for name, (dtype, shape, size) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + struct.pack("<f", 3.0))
        f.truncate(8 + len(raw) + offset)  # sparse: nothing written past the alpha
    # In a fresh process: bytes read through read() (/proc/self/io rchar: a streamed hash shows) and the
    # peak resident memory (a load or a touched mmap of the tensors shows), whatever the machine's speed.
    code = (
        "import os, resource, sys\n"
        "from mixdiff_cli.catalog.formats import inspect_source\n"
        "def rchar():\n"
        "    if not os.path.exists('/proc/self/io'): return None\n"
        "    return int(next(l for l in open('/proc/self/io') if l.startswith('rchar')).split()[1])\n"
        f"before = rchar(); info = inspect_source({str(path)!r}, checksum=False); after = rchar()\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == 'darwin' else 1024)\n"
        "print(info.format, info.rank, info.alpha, None if before is None else after - before, peak)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    fmt, rank, alpha, read, peak = proc.stdout.split()
    assert (fmt, int(rank), float(alpha)) == ("kohya", 16384, 3.0)
    assert read == "None" or int(read) < 16 << 20, f"read {read} bytes of a {offset >> 20} MiB data section"
    assert int(peak) < 1 << 30, f"peak memory {int(peak) >> 20} MiB"  # a load or a touched mapping of the 2 GiB would show


def test_formats_import_and_inspection_need_no_torch(lora_files, full_model, full_model_file, tiny_sdxl):
    paths = [*map(str, lora_files.values()), str(full_model), str(full_model_file), str(tiny_sdxl)]
    code = (
        "import sys; from mixdiff_cli.catalog.formats import inspect_source\n"
        f"infos = [inspect_source(p) for p in {paths!r}]\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft', 'numpy') if m in sys.modules)\n"
        "print(len(infos), heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(None, 1)
    assert out == [str(len(paths)), "[]\n"]
