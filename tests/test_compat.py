"""The compatibility corpus: LoRA and checkpoint files in each public tool's exact key layout (written by
mixdiff_cli.testing.make_layout / make_refused / make_full_layout on the tiny SD 1.x and SDXL fixtures, and
header-only in the real SD 1.5 / 2.1 / SDXL geometry). Every layout has one of three outcomes:

- diffusers loads it: `add-expert` detects it and `generate` top-1 equals plain diffusers' `load_lora_weights`
  within 1/255, with an effect above 2/255;
- diffusers cannot load it (or silently ignores it): mixdiff applies it, equal to a reference;
- mixdiff refuses it at `add-expert`, in one line, exit 1, the catalog unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import COMPAT_ALPHA
from test_engine import PROMPT, STEPS, diff, plain_images, reference_blend
from typer.testing import CliRunner

from mixdiff_cli import families, testing
from mixdiff_cli.catalog.formats import inspect_source
from mixdiff_cli.catalog.schema import load_catalog
from mixdiff_cli.cli import app
from mixdiff_cli.sampling.engine import Engine, Request

EQUAL, EFFECT = 1 / 255, 2 / 255  # acceptance: equal to the reference within 1/255, an effect above 2/255
ATTN = ["to_k", "to_out.0", "to_q", "to_v"]
TEXT = ["k_proj", "out_proj", "q_proj", "v_proj"]
LOCON = sorted(ATTN + ["conv", "conv1", "conv2", "conv_shortcut", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "time_emb_proj"])
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def bases(tiny_sd, tiny_sdxl) -> dict[str, Path]:
    return {"sd1": tiny_sd, "sdxl": tiny_sdxl}


def new_catalog(folder: Path, base: Path) -> Path:
    path = folder / "experts.yaml"
    assert run("init", "--catalog", path, "--base", base).exit_code == 0
    return path


def add(catalog: Path, source: Path | str, name: str):
    return run("add-expert", source, "--catalog", catalog, "--name", name)


def assert_refused(catalog: Path, source: Path | str, *words: str) -> str:
    """add-expert fails with one line naming the problem, exit 1, and leaves the catalog byte for byte."""
    before = catalog.read_bytes()
    result = add(catalog, source, "refused")
    message = result.stderr.strip()
    assert result.exit_code == 1, result.output
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in result.output, result.output
    for word in words:
        assert word in message, message
    assert catalog.read_bytes() == before
    return message


def engine_top1(catalog: Path, name: str, steps: int = STEPS) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 image of expert `name`, the bare base's image) from the engine, same seed and call."""
    engine = Engine(catalog)
    got = engine.generate([Request(PROMPT, seed=0, steps=steps)], [name], output_type="np")[0]
    bare = engine.generate([Request(PROMPT, seed=0, steps=steps)], [], output_type="np")[0]
    return got, bare


# ------------------------------------------------------------------ layouts plain diffusers loads

LOADED = {  # (arch, layout) -> (format, rank, alpha, targets); alpha None: the file states none (scale 1)
    ("sd1", "diffusers-peft"): ("diffusers", 4, COMPAT_ALPHA, ATTN),
    ("sd1", "diffusers-noalpha"): ("diffusers", 4, None, ATTN),
    ("sd1", "diffusers-script"): ("diffusers", 4, None, sorted(ATTN + TEXT)),
    ("sd1", "kohya"): ("kohya", 4, COMPAT_ALPHA, sorted(ATTN + TEXT)),
    ("sd1", "kohya-locon"): ("kohya", 4, COMPAT_ALPHA, LOCON),
    ("sd1", "kohya-fp16"): ("kohya", 4, COMPAT_ALPHA, sorted(ATTN + TEXT)),
    ("sd1", "kohya-bf16"): ("kohya", 4, COMPAT_ALPHA, sorted(ATTN + TEXT)),
    ("sd1", "kohya-te"): ("kohya", 4, COMPAT_ALPHA, TEXT),
    ("sdxl", "diffusers-peft"): ("diffusers", 4, COMPAT_ALPHA, ATTN),
    ("sdxl", "diffusers-script"): ("diffusers", 4, None, sorted(ATTN + TEXT)),
    ("sdxl", "kohya"): ("kohya", 4, COMPAT_ALPHA, sorted(ATTN + TEXT)),
    ("sdxl", "kohya-te"): ("kohya", 4, COMPAT_ALPHA, TEXT),
}


@pytest.mark.parametrize("key", list(LOADED), ids=[f"{a}-{layout}" for a, layout in LOADED])
def test_layout_diffusers_loads_matches_load_lora_weights(key, compat_files, bases, tmp_path):
    arch, layout = key
    fmt, rank, alpha, targets = LOADED[key]
    path, base = compat_files[key], bases[arch]
    catalog = new_catalog(tmp_path, base)
    assert add(catalog, path, "x").exit_code == 0
    expert = load_catalog(catalog).expert("x")
    assert (expert.kind, expert.format, expert.arch, expert.rank, expert.alpha) == ("lora", fmt, arch, rank, alpha)
    info = inspect_source(path, checksum=False)
    assert info.targets == targets and info.has_text_encoder == any(t in TEXT for t in targets)
    if arch == "sdxl" and "kohya" in layout:  # kohya's own SDXL UNet: SGM block names, lora_te1_ / lora_te2_
        assert any(p.startswith("input_blocks.") for p in info.unet_shapes) or not info.unet_shapes
        assert {c for c, _ in info.text_shapes} == {"text_encoder", "text_encoder_2"}

    got, bare = engine_top1(catalog, "x")
    pipe = testing.load_pipeline(base)
    pipe.load_lora_weights(str(path), adapter_name="x")  # plain diffusers, same file, same call
    want = plain_images(pipe)[0]
    assert diff(got, want) <= EQUAL
    assert diff(got, bare) > EFFECT


# --------------------------------------------------------- layouts diffusers cannot load, applied exactly


def test_attention_processor_layout_diffusers_ignores_is_applied(compat_files, tiny_sd, tmp_path):
    """unet.save_attn_procs files (diffusers < 0.19) load in diffusers 0.42 as nothing; mixdiff converts them.
    Reference: the same weights in diffusers' own layout (same seed), loaded by plain diffusers."""
    from safetensors.torch import load_file

    path, same = compat_files[("sd1", "attn-procs")], compat_files[("sd1", "diffusers-noalpha")]
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert load_file(path)[f"{module}.processor.to_q_lora.down.weight"].equal(load_file(same)[f"unet.{module}.to_q.lora_A.weight"])
    catalog = new_catalog(tmp_path, tiny_sd)
    assert add(catalog, path, "x").exit_code == 0
    assert load_catalog(catalog).expert("x").format == "diffusers"
    got, bare = engine_top1(catalog, "x")

    ignored = testing.load_pipeline(tiny_sd)
    ignored.load_lora_weights(str(path), adapter_name="x")
    assert diff(plain_images(ignored)[0], bare) < 1e-6  # diffusers: silently nothing
    reference = testing.load_pipeline(tiny_sd)
    reference.load_lora_weights(str(same), adapter_name="x")
    assert diff(got, plain_images(reference)[0]) <= EQUAL
    assert diff(got, bare) > EFFECT


def test_network_alphas_layout_diffusers_refuses_is_applied(compat_files, tiny_sd, tmp_path):
    """Script keys with `<module>.alpha` network alphas: diffusers refuses the file; mixdiff folds alpha/r into
    lora_B. Reference: the same weights and alpha in kohya's layout (same seed), loaded by plain diffusers."""
    path, same = compat_files[("sd1", "diffusers-alphas")], compat_files[("sd1", "kohya")]
    catalog = new_catalog(tmp_path, tiny_sd)
    assert add(catalog, path, "x").exit_code == 0
    expert = load_catalog(catalog).expert("x")
    assert (expert.format, expert.rank, expert.alpha) == ("diffusers", 4, COMPAT_ALPHA)
    got, bare = engine_top1(catalog, "x")

    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        testing.load_pipeline(tiny_sd).load_lora_weights(str(path), adapter_name="x")
    reference = testing.load_pipeline(tiny_sd)
    reference.load_lora_weights(str(same), adapter_name="x")
    assert diff(got, plain_images(reference)[0]) <= EQUAL
    assert diff(got, bare) > EFFECT


@pytest.mark.parametrize("layout", ["peft", "peft-modules-to-save"])
def test_peft_folder_is_applied_as_peft_does(layout, compat_files, tiny_sd, tmp_path):
    """PEFT's own save_pretrained folders (diffusers cannot load them), modules_to_save included: the
    reference is PEFT's own PeftModel.from_pretrained on the base UNet."""
    from peft import PeftModel

    path = compat_files[("sd1", layout)]
    catalog = new_catalog(tmp_path, tiny_sd)
    assert add(catalog, path, "x").exit_code == 0
    expert = load_catalog(catalog).expert("x")
    assert (expert.format, expert.rank, expert.alpha) == ("peft", 4, COMPAT_ALPHA)
    assert inspect_source(path).to_dict()["modules_to_save"] == (["conv_out"] if layout.endswith("save") else [])
    got, bare = engine_top1(catalog, "x")

    ignored = testing.load_pipeline(tiny_sd)
    if layout == "peft":  # diffusers finds no unet. keys: silently nothing
        ignored.load_lora_weights(str(path), adapter_name="x", weight_name="adapter_model.safetensors")
        assert not getattr(ignored.unet, "peft_config", None)
    else:  # the saved conv_out weights are no LoRA keys: refused
        with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
            ignored.load_lora_weights(str(path), adapter_name="x", weight_name="adapter_model.safetensors")
    reference = testing.load_pipeline(tiny_sd)
    PeftModel.from_pretrained(reference.unet, path)  # injects into the pipeline's UNet in place
    assert diff(got, plain_images(reference)[0]) <= EQUAL
    assert diff(got, bare) > EFFECT
    if layout.endswith("save"):  # the weights file named instead of its folder; blends with a plain LoRA
        assert add(catalog, path / "adapter_model.safetensors", "file").exit_code == 0
        assert add(catalog, compat_files[("sd1", "kohya")], "ink").exit_code == 0
        engine = Engine(catalog)
        assert diff(engine.generate([Request(PROMPT, seed=0, steps=STEPS)], ["file"], output_type="np")[0], got) < 1e-6
        for blend in ("noise", "merge"):
            mixed = engine.generate([Request(PROMPT, seed=0, steps=STEPS)], [("x", 0.5), ("ink", 0.5)], blend=blend, output_type="np")[0]
            assert diff(mixed, got) > EFFECT, blend


# ---------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "kind, words",
    [
        ("ia3", ["(IA)^3"]),
        ("kohya-dora", ["DoRA"]),
        ("peft-dora", ["DoRA"]),
        ("peft-ia3", ["PEFT (IA)^3"]),
        ("inpainting", ["9 input channels", "inpainting"]),
        ("inpainting-file", ["9 input channels", "inpainting"]),
        ("v-prediction", ["predicts v_prediction", "base predicts epsilon"]),
    ],
)
def test_refused_layout_is_one_line(kind, words, compat_files, tiny_sd, tmp_path):
    assert_refused(new_catalog(tmp_path, tiny_sd), compat_files[("sd1", kind)], *words)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_kohya_named_loha_and_lokr_are_accepted(kind, compat_files, tiny_sd, tmp_path):
    """Once refused by name; now rewritten as exact LoRAs (tests/test_lycoris.py has the references)."""
    catalog = new_catalog(tmp_path, tiny_sd)
    assert add(catalog, compat_files[("sd1", kind)], kind).exit_code == 0
    got, bare = engine_top1(catalog, kind)
    assert diff(got, bare) > EFFECT


def test_sdxl_layouts_refused_on_an_sd_base(compat_files, tiny_sd, tmp_path):
    catalog = new_catalog(tmp_path, tiny_sd)
    for layout in ("kohya", "diffusers-script", "kohya-te", "single-file"):
        assert_refused(catalog, compat_files[("sdxl", layout)], "for SDXL, base is SD 1.x")


# ------------------------------------------------------------------------------ malformed headers


def raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def rewritten(src: Path, dst: Path, edit) -> Path:
    """A copy of a LoRA file with its tensors edited by `edit(dict) -> dict`, saved by safetensors."""
    from safetensors.torch import load_file, save_file

    save_file(edit(load_file(src)), dst)
    return dst


A = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
TE = "text_encoder.text_model.encoder.layers.1.self_attn.q_proj"
MALFORMED = {
    # name: (writer(folder, lora files) -> path, words the one-line error holds)
    "negative-shape": (lambda d, f: raw_safetensors(d / "x.safetensors", {f"{A}.lora_A.weight": {"dtype": "F32", "shape": [-4, 32], "data_offsets": [0, 0]}}, b""), ["negative shape"]),
    "offsets-past-end": (lambda d, f: raw_safetensors(d / "x.safetensors", {f"{A}.lora_A.weight": {"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 512]}}, b"\0" * 64), ["truncated"]),
    "offsets-overlap": (lambda d, f: raw_safetensors(d / "x.safetensors", {
        f"{A}.lora_A.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]},
        f"{A}.lora_B.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [16, 48]}}, b"\0" * 48), ["overlapping"]),
    "offsets-gap": (lambda d, f: raw_safetensors(d / "x.safetensors", {
        f"{A}.lora_A.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [8, 40]}}, b"\0" * 40), ["gap"]),
    "size-mismatch": (lambda d, f: raw_safetensors(d / "x.safetensors", {f"{A}.lora_A.weight": {"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 64]}}, b"\0" * 64), ["bytes of data"]),
    "unknown-dtype": (lambda d, f: raw_safetensors(d / "x.safetensors", {f"{A}.lora_A.weight": {"dtype": "F12", "shape": [2], "data_offsets": [0, 3]}}, b"\0" * 3), ["unknown dtype 'F12'"]),
    "overflowing-shape": (lambda d, f: raw_safetensors(d / "x.safetensors", {f"{A}.lora_A.weight": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 4]}}, b"\0" * 4), ["overflows"]),
    "trailing-bytes": (lambda d, f: raw_safetensors(d / "x.safetensors", {f"{A}.lora_A.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 12), ["bytes after"]),
    "lora_A-without-lora_B": (lambda d, f: rewritten(f[("sd1", "diffusers-peft")], d / "x.safetensors", lambda s: {k: v for k, v in s.items() if k != f"{A}.lora_B.weight"}), ["lora_A without its lora_B"]),
    "down-without-up": (lambda d, f: rewritten(f[("sd1", "diffusers-script")], d / "x.safetensors", lambda s: {k: v for k, v in s.items() if k != f"{A}.lora.up.weight"}), ["lora.down without its lora.up"]),
    "kohya-up-without-down": (lambda d, f: rewritten(f[("sd1", "kohya")], d / "x.safetensors", lambda s: {k: v for k, v in s.items() if not k.endswith("attn1_to_q.lora_down.weight")}), ["lora_up without its lora_down"]),
    "ranks-disagree": (lambda d, f: rewritten(f[("sd1", "diffusers-peft")], d / "x.safetensors", lambda s: {**s, f"{A}.lora_B.weight": s[f"{A}.lora_B.weight"][:, :3].contiguous()}), ["do not pair up", "rank 4 vs 3"]),
    "not-a-lora-key": (lambda d, f: rewritten(f[("sd1", "diffusers-peft")], d / "x.safetensors", lambda s: {**s, "unet.conv_in.weight": s[f"{A}.lora_A.weight"].clone()}), ["'unet.conv_in.weight' is not part of a LoRA"]),
    "unknown-unet-module": (lambda d, f: rewritten(f[("sd1", "diffusers-peft")], d / "x.safetensors", lambda s: {k.replace("attn1.to_q", "attn1.to_z"): v for k, v in s.items()}), ["attn1.to_z does not exist in the base UNet"]),
    "unknown-block": (lambda d, f: rewritten(f[("sd1", "diffusers-peft")], d / "x.safetensors", lambda s: {k.replace("down_blocks.0.", "down_blocks.5."): v for k, v in s.items()}), ["down_blocks.5", "does not exist in the base UNet"]),
    "wrong-width": (lambda d, f: rewritten(f[("sd1", "diffusers-peft")], d / "x.safetensors", lambda s: {**s, f"{A}.lora_A.weight": s[f"{A}.lora_A.weight"].repeat(1, 2)}), ["attn1.to_q: 64->32", "(32->32)"]),
    "unknown-text-layer": (lambda d, f: rewritten(f[("sd1", "diffusers-script")], d / "x.safetensors", lambda s: {k.replace("layers.1.", "layers.7."): v for k, v in s.items()}), ["encoder.layers.7.self_attn", "does not exist in the base's text_encoder"]),
    "text-encoder-2-on-sd": (lambda d, f: rewritten(f[("sd1", "diffusers-peft")], d / "x.safetensors", lambda s: {**s, f"{TE.replace('text_encoder.', 'text_encoder_2.')}.lora_A.weight": s[f"{A}.lora_A.weight"].clone(), f"{TE.replace('text_encoder.', 'text_encoder_2.')}.lora_B.weight": s[f"{A}.lora_B.weight"].clone()}), ["base is SD 1.x"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_header_refused_at_add_expert(case, compat_files, tiny_sd, tmp_path):
    write, words = MALFORMED[case]
    (tmp_path / "files").mkdir()
    path = write(tmp_path / "files", compat_files)
    assert_refused(new_catalog(tmp_path, tiny_sd), path, *words)


RAW = ("negative-shape", "offsets-past-end", "offsets-overlap", "offsets-gap", "size-mismatch", "unknown-dtype", "overflowing-shape", "trailing-bytes")


def test_header_validation_agrees_with_safetensors(tmp_path):
    """What we refuse, the safetensors parser refuses too; what it accepts (an empty tensor, padding), we accept."""
    from safetensors import SafetensorError, safe_open

    from mixdiff_cli.catalog.headers import CorruptSafetensors, read_header

    for case in RAW:
        (tmp_path / case).mkdir()
        path = MALFORMED[case][0](tmp_path / case, {})
        with pytest.raises(CorruptSafetensors):
            read_header(path)
        with pytest.raises(SafetensorError):
            with safe_open(path, "np") as f:
                [f.get_tensor(k) for k in f.keys()]
    ok = testing.write_header_only(tmp_path / "ok.safetensors", {"empty": ("F32", [0, 4]), "a": ("BF16", [3]), "b": ("F16", [])})
    header, _ = read_header(ok)
    with safe_open(ok, "np") as f:
        assert sorted(f.keys()) == sorted(header) == ["a", "b", "empty"]


# --------------------------------------------------------------------------------- noise blend


def test_kohya_and_diffusers_script_blend_in_noise_mode(compat_files, tiny_sd, tmp_path):
    """Two experts of different formats, each with its text-encoder half: eps = sum_i w_i eps_i, against a
    hand-written loop over plain diffusers with both files loaded."""
    files = {"kohya": compat_files[("sd1", "kohya")], "script": compat_files[("sd1", "diffusers-script")]}
    catalog = new_catalog(tmp_path, tiny_sd)
    for name, path in files.items():
        assert add(catalog, path, name).exit_code == 0
    members = [("kohya", 0.6), ("script", 0.4)]
    engine = Engine(catalog)
    got = engine.generate([Request(PROMPT, seed=0, steps=STEPS)], members, blend="noise", output_type="np")[0]
    alone = engine.generate([Request(PROMPT, seed=0, steps=STEPS)], ["kohya"], output_type="np")[0]
    pipe = testing.load_pipeline(tiny_sd)
    for name, path in files.items():
        pipe.load_lora_weights(str(path), adapter_name=name)
    assert diff(got, reference_blend(pipe, members, guidance=7.5)) <= EQUAL
    assert diff(got, alone) > EFFECT


# --------------------------------------------------------------------------------- full models


def test_fp16_variant_folder_matches_diffusers(compat_files, tiny_sd, tmp_path):
    from diffusers import UNet2DConditionModel

    path = compat_files[("sd1", "fp16-variant")]
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    catalog = new_catalog(tmp_path, tiny_sd)
    assert add(catalog, path, "fp16").exit_code == 0
    assert load_catalog(catalog).expert("fp16").format == "diffusers-model"
    got, bare = engine_top1(catalog, "fp16")
    pipe = testing.load_pipeline(tiny_sd)
    pipe.unet = UNet2DConditionModel.from_pretrained(path, variant="fp16", torch_dtype=pipe.unet.dtype)
    assert diff(got, plain_images(pipe)[0]) <= EQUAL
    assert diff(got, bare) > EFFECT


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_original_single_file_checkpoint_matches_diffusers(arch, compat_files, bases, tmp_path):
    """model.diffusion_model.<SGM names> plus the text encoders in their original names (SDXL:
    conditioner.embedders.0/1, OpenCLIP packed q/k/v): plain diffusers' from_single_file is the reference."""
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    path, base = compat_files[(arch, "single-file")], bases[arch]
    with safe_open(path, "np") as f:
        keys = list(f.keys())
    prefixes = {"sd1": ("model.diffusion_model.", "cond_stage_model.transformer.text_model."),
                "sdxl": ("model.diffusion_model.", "conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model.transformer.resblocks.")}  # fmt: skip
    assert all(any(k.startswith(p) for k in keys) for p in prefixes[arch])
    catalog = new_catalog(tmp_path, base)
    assert add(catalog, path, "other").exit_code == 0
    expert = load_catalog(catalog).expert("other")
    assert (expert.kind, expert.format, expert.arch) == ("model", "single-file", arch)
    got, bare = engine_top1(catalog, "other")
    pipe = testing.load_pipeline(base)
    pipe.unet = UNet2DConditionModel.from_single_file(str(path), config=str(base), subfolder="unet", local_files_only=True)
    assert diff(got, plain_images(pipe)[0]) <= EQUAL
    assert diff(got, bare) > EFFECT


def test_v_prediction_is_honoured(compat_files, tiny_sd, tmp_path):
    """A base whose scheduler predicts v samples as plain diffusers does (every scheduler keeps the base's
    prediction_type); a v-prediction model expert fits it, and is refused on an epsilon base (above)."""
    from diffusers import UNet2DConditionModel

    vbase = Path(shutil.copytree(tiny_sd, tmp_path / "vbase"))
    testing.set_prediction_type(vbase, "v_prediction")
    lora, model = compat_files[("sd1", "kohya")], compat_files[("sd1", "v-prediction")]
    catalog = new_catalog(tmp_path, vbase)
    assert add(catalog, lora, "ink").exit_code == 0 and add(catalog, model, "vmodel").exit_code == 0
    engine = Engine(catalog)
    for scheduler in ("ddim", "euler"):
        got = engine.generate([Request(PROMPT, seed=0, steps=STEPS, scheduler=scheduler)], ["ink"], output_type="np")[0]
        pipe = testing.load_pipeline(vbase)
        pipe.scheduler = type(engine.pipe.scheduler).from_config(pipe.scheduler.config)
        assert pipe.scheduler.config.prediction_type == "v_prediction"
        pipe.load_lora_weights(str(lora), adapter_name="ink")
        assert diff(got, plain_images(pipe)[0]) <= EQUAL, scheduler
    epsilon = Engine(new_catalog(tmp_path / "eps", tiny_sd)).generate([Request(PROMPT, seed=0, steps=STEPS)], [], output_type="np")[0]
    vbare = engine.generate([Request(PROMPT, seed=0, steps=STEPS)], [], output_type="np")[0]
    assert diff(vbare, epsilon) > EFFECT  # the prediction type changes the image: it was read, not defaulted

    got = engine.generate([Request(PROMPT, seed=0, steps=STEPS)], ["vmodel"], output_type="np")[0]
    pipe = testing.load_pipeline(vbase)
    pipe.unet = UNet2DConditionModel.from_pretrained(model / "unet")
    assert diff(got, plain_images(pipe)[0]) <= EQUAL


# ------------------------------------------------------------------------------ real geometry

REAL = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}
LABEL = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


@pytest.mark.parametrize("name", list(REAL))
def test_real_geometry_headers_detected_and_mismatches_refused(name, real_geometry, tmp_path):
    """Header-only SD 1.5 / 2.1 / SDXL files: the right architecture, rank and alpha by add-expert into a base
    folder of the public configs; refused, in one line, by the other two."""
    from mixdiff_cli.catalog.fit import fits_base
    from mixdiff_cli.catalog.geometry import public_geometry

    arch = REAL[name]
    for layout, alpha in (("kohya", 2.0), ("diffusers-script", None)):
        path = real_geometry / f"{name}-{layout}.safetensors"
        catalog = new_catalog(tmp_path / f"{name}-{layout}", real_geometry / f"{name}-base")
        assert load_catalog(catalog).base.arch == arch
        assert add(catalog, path, "x").exit_code == 0
        expert = load_catalog(catalog).expert("x")
        assert (expert.arch, expert.rank, expert.alpha) == (arch, 4, alpha)
        info = inspect_source(path, checksum=False)
        assert info.targets == sorted(ATTN + TEXT) and len(info.text_shapes) == {"sd15": 48, "sd21": 92, "sdxl": 176}[name]
        for other, other_arch in REAL.items():
            if other != name:
                assert_refused(new_catalog(tmp_path / f"{name}-{layout}-{other}", real_geometry / f"{other}-base"), path,
                               f"LoRA for {LABEL[arch]}, base is {LABEL[other_arch]}")
    for kind in ("checkpoint", "inpainting"):
        info = inspect_source(real_geometry / f"{name}-{kind}.safetensors", checksum=False)  # GBs of sparse data: no hash
        assert (info.kind, info.format, info.arch) == ("model", "single-file", arch)
        assert info.prediction_type == ("v_prediction" if name == "sd21" else None)
        for other, other_arch in REAL.items():
            reason = fits_base(info, public_geometry(other))
            if other != name:
                assert reason == f"model for {LABEL[arch]}, base is {LABEL[other_arch]}"
            elif kind == "checkpoint":
                assert reason is None
            else:
                assert reason == "model UNet takes 9 input channels (an inpainting UNet), the base UNet takes 4"


@pytest.mark.parametrize("name", list(REAL))
def test_geometry_tables_agree_with_the_real_configs(name):
    """The shapes fits_base expects are those of diffusers' and transformers' own models built (on the meta
    device) from the public configs; our SGM names convert back through diffusers' own single-file converter."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, infer_diffusers_model_type

    from mixdiff_cli.families.unet_geometry import expected_shape as _expected_shape
    from mixdiff_cli.catalog.geometry import public_configs, text_module_shape

    PUBLIC = {n: configs for n, (_, configs) in public_configs().items()}

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(PUBLIC[name]["unet"])
    config = dict(unet.config)
    checked = 0
    for module_name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            features = (module.in_features, module.out_features) if isinstance(module, torch.nn.Linear) else (module.in_channels, module.out_channels)
            assert _expected_shape(module_name, config) == features, module_name
            checked += 1
    assert checked > 250
    state = testing.real_state(name)
    for component, weights in state.items():
        for key, value in weights.items():
            if component != "unet" and key.endswith(".weight") and value.dim() == 2 and "embedding" not in key:
                assert text_module_shape(key.removesuffix(".weight"), PUBLIC[name][component]) == (value.shape[1], value.shape[0]), key
    texts = {k: v for k, v in state.items() if k != "unet"}
    checkpoint = families.get(REAL[name]).checkpoint_state(state["unet"], PUBLIC[name]["unet"], texts)
    assert infer_diffusers_model_type(checkpoint) == {"sd15": "v1", "sd21": "v2", "sdxl": "xl_base"}[name]
    converted = convert_ldm_unet_checkpoint(dict(checkpoint), PUBLIC[name]["unet"])
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in state["unet"].items()}


# --------------------------------------------------------------------------------------- hub


def fake_hub_cache(root: Path, repo: str, filename: str, data: bytes, commit: str) -> Path:
    """A huggingface_hub cache holding one file of one commit, laid out as hf_hub_download leaves it."""
    folder = root / f"models--{repo.replace('/', '--')}"
    blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit / filename
    snapshot.parent.mkdir(parents=True)
    os.symlink(os.path.relpath(blob, snapshot.parent), snapshot)
    return blob


def test_hub_source_pinned_hashed_and_verified(compat_files, tiny_sd, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    lora = compat_files[("sd1", "kohya")]
    commit = "0123456789abcdef0123456789abcdef01234567"
    blob = fake_hub_cache(tmp_path / "hub", "someone/inks", "ink.safetensors", lora.read_bytes(), commit)
    catalog = new_catalog(tmp_path, tiny_sd)
    for i, source in enumerate(("hf://someone/inks/ink.safetensors", "hf://someone/inks/ink.safetensors@main")):
        assert add(catalog, source, f"ink{i}").exit_code == 0
        expert = load_catalog(catalog).expert(f"ink{i}")
        assert expert.source == f"hf://someone/inks/ink.safetensors@{commit}"  # a branch pinned to its commit
        assert expert.sha256 == hashlib.sha256(lora.read_bytes()).hexdigest()
    assert run("experts", "verify", "-c", catalog).exit_code == 0
    got, _ = engine_top1(catalog, "ink0")  # generates from the cached file
    assert got.shape == (64, 64, 3)

    blob.write_bytes(lora.read_bytes()[:-8] + b"\x01" * 8)  # the cached file changes under the same commit
    result = run("experts", "verify", "-c", catalog)
    assert result.exit_code == 1 and "ink0 (mismatch)" in result.stderr and "ink1 (mismatch)" in result.stderr
