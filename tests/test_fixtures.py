"""The tiny fixtures are real: plain diffusers loads them, generates, and every LoRA format acts."""

from __future__ import annotations

from pathlib import Path

import pytest

from mixdiff_cli import testing
from mixdiff_cli.catalog.formats import inspect_source, lora_for_diffusers

PROMPT = "a photo of a red cat"


@pytest.fixture(scope="module")
def sd_pipe(tiny_sd):
    return testing.load_pipeline(tiny_sd)


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_sdxl):
    return testing.load_pipeline(tiny_sdxl)


@pytest.fixture(scope="module")
def base_images(sd_pipe, sdxl_pipe):
    """arch -> the 4-step image without any adapter."""
    return {"sd1": generate(sd_pipe), "sdxl": generate(sdxl_pipe)}


def generate(pipe, steps: int = 4, seed: int = 0, **kw):
    import torch

    return pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images


def test_sd_loads_in_plain_diffusers_and_is_tiny(tiny_sd, sd_pipe):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    assert type(sd_pipe) is StableDiffusionPipeline
    assert isinstance(sd_pipe.unet, UNet2DConditionModel) and isinstance(sd_pipe.vae, AutoencoderKL)
    assert isinstance(sd_pipe.text_encoder, CLIPTextModel) and isinstance(sd_pipe.scheduler, DDIMScheduler)
    assert sd_pipe.safety_checker is None and sd_pipe.scheduler.config.steps_offset == 1
    # small enough that a 4-step generation takes a fraction of a second on a CPU (sizes, not a clock)
    sizes = {name: sum(p.numel() for p in getattr(sd_pipe, name).parameters()) for name in ("unet", "vae", "text_encoder")}
    assert sizes["unet"] < 1_500_000 and sum(sizes.values()) < 3_000_000, sizes
    image = generate(sd_pipe)
    assert image.shape == (1, 64, 64, 3) and 0.05 < image.std() and image.min() >= 0 and image.max() <= 1


def test_sdxl_loads_in_plain_diffusers(sdxl_pipe):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    assert type(sdxl_pipe) is StableDiffusionXLPipeline
    assert isinstance(sdxl_pipe.text_encoder_2, CLIPTextModelWithProjection)
    cfg = sdxl_pipe.unet.config
    assert cfg.addition_embed_type == "text_time"
    assert cfg.projection_class_embeddings_input_dim == 6 * cfg.addition_time_embed_dim + sdxl_pipe.text_encoder_2.config.projection_dim
    assert cfg.cross_attention_dim == sdxl_pipe.text_encoder.config.hidden_size + sdxl_pipe.text_encoder_2.config.hidden_size
    image = generate(sdxl_pipe)
    assert image.shape == (1, 64, 64, 3) and image.std() > 0.05


def test_tokenizer_has_one_token_per_word(sd_pipe, sdxl_pipe):
    for tok in (sd_pipe.tokenizer, sdxl_pipe.tokenizer, sdxl_pipe.tokenizer_2):
        ids = tok(PROMPT).input_ids
        assert len(ids) == len(PROMPT.split()) + 2  # BOS words EOS
        assert tok.model_max_length == 77
    assert sdxl_pipe.tokenizer_2.pad_token == "!"


def _load(pipe, path: Path, name: str) -> None:
    pipe.load_lora_weights(lora_for_diffusers(inspect_source(path, checksum=False)), adapter_name=name)
    pipe.set_adapters([name])


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("fmt", ["diffusers", "peft", "kohya"])
def test_every_lora_format_loads_and_changes_the_output(request, lora_files, base_images, arch, fmt):
    pipe = request.getfixturevalue("sd_pipe" if arch == "sd1" else "sdxl_pipe")
    base = base_images[arch]
    _load(pipe, lora_files[(arch, fmt)], f"t-{fmt}")
    try:
        assert pipe.get_list_adapters()["unet"] == [f"t-{fmt}"]
        changed = generate(pipe)
    finally:
        pipe.delete_adapters([f"t-{fmt}"])
    assert abs(changed - base).max() > 1e-3
    assert abs(generate(pipe) - base).max() == 0  # deleting the adapter restores the base exactly


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_formats_are_the_same_lora(request, tiny_sd, tiny_sdxl, tmp_path, arch):
    """One seed/rank/alpha in all three formats gives one image: alpha survives every format."""
    pipe = request.getfixturevalue("sd_pipe" if arch == "sd1" else "sdxl_pipe")
    folder = tiny_sd if arch == "sd1" else tiny_sdxl
    images = {}
    for fmt, alpha in [("diffusers", 12), ("peft", 12), ("kohya", 12), ("diffusers", 4)]:
        out = tmp_path / f"{fmt}-{alpha}" if fmt == "peft" else tmp_path / f"{fmt}-{alpha}.safetensors"
        path = testing.make_lora(folder, out, fmt=fmt, rank=4, alpha=alpha, seed=5)
        _load(pipe, path, "same")
        images[fmt, alpha] = generate(pipe, steps=2)
        pipe.delete_adapters(["same"])
    assert abs(images["peft", 12] - images["diffusers", 12]).max() < 1e-5
    assert abs(images["kohya", 12] - images["diffusers", 12]).max() < 1e-5
    assert abs(images["diffusers", 12] - images["diffusers", 4]).max() > 1e-3  # alpha matters


@pytest.mark.parametrize("key", [("sd1", "diffusers"), ("sd1", "kohya"), ("sdxl", "diffusers"), ("sdxl", "kohya")])
def test_text_encoder_loras_load_into_the_text_encoders(request, lora_te_files, base_images, key):
    pipe = request.getfixturevalue("sd_pipe" if key[0] == "sd1" else "sdxl_pipe")
    base = base_images[key[0]]
    _load(pipe, lora_te_files[key], "te")
    try:
        adapters = pipe.get_list_adapters()
        expected = {"unet", "text_encoder"} | ({"text_encoder_2"} if key[0] == "sdxl" else set())
        assert {c for c, names in adapters.items() if "te" in names} == expected
        assert abs(generate(pipe) - base).max() > 1e-3
    finally:
        pipe.delete_adapters(["te"])


def test_lora_weights_are_small_but_nonzero(lora_files):
    from safetensors.torch import load_file

    for (arch, fmt), path in lora_files.items():
        state = load_file(path / "adapter_model.safetensors" if fmt == "peft" else path)
        ups = [t for k, t in state.items() if "lora_B" in k or "lora_up" in k]
        assert ups and all(t.abs().max() > 0 for t in ups), (arch, fmt)
        assert max(t.abs().max().item() for t in ups) < 0.1, (arch, fmt)


def test_full_model_is_another_unet_of_the_same_shape(tiny_sd, full_model, full_model_file, sd_pipe, base_images):
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel.from_pretrained(full_model)
    base = sd_pipe.unet
    strip = lambda cfg: {k: v for k, v in cfg.items() if k != "_name_or_path"}  # noqa: E731
    assert strip(other.config) == strip(base.config)
    assert any((a - b).abs().max() > 0.01 for a, b in zip(other.parameters(), base.parameters()))
    single = UNet2DConditionModel.from_single_file(full_model_file, config=str(tiny_sd), subfolder="unet", local_files_only=True)
    assert all((a == b).all() for a, b in zip(single.state_dict().values(), other.state_dict().values()))
    before = base_images["sd1"]
    sd_pipe.unet = other
    try:
        assert abs(generate(sd_pipe) - before).max() > 1e-2
    finally:
        sd_pipe.unet = base


def test_make_lora_rejects_what_a_format_cannot_hold(tiny_sd, tmp_path):
    with pytest.raises(ValueError, match="peft"):
        testing.make_lora(tiny_sd, tmp_path / "x", fmt="peft", text_encoder=True)
    with pytest.raises(ValueError, match="unknown LoRA format"):
        testing.make_lora(tiny_sd, tmp_path / "x.safetensors", fmt="lycoris")


def test_builders_are_deterministic(tmp_path, tiny_sd):
    """The same seed gives identical weights (so the cache key, not luck, decides rebuilds)."""
    from safetensors.torch import load_file

    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = testing.build_tiny_sd(tmp_path / "again", seed=0)
    assert (torch.rand(3) == expected).all()  # the builder leaves the caller's random stream alone
    for part in ("unet", "vae", "text_encoder"):
        name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
        a, b = load_file(tiny_sd / part / name), load_file(again / part / name)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), part


def test_cached_builds_once_and_never_leaves_half_a_fixture(tmp_path):
    calls = []

    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "weights.txt").write_text("ok")

    first = testing.cached(tmp_path, "thing", build)
    assert testing.cached(tmp_path, "thing", build) == first and len(calls) == 1
    assert (first / "weights.txt").read_text() == "ok"

    def dies(folder: Path) -> None:
        (folder / "half.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        testing.cached(tmp_path, "broken", dies)
    assert not (tmp_path / "broken").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["thing"]
    # a folder without its .complete marker (an older killed build) is rebuilt
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / "junk").write_text("x")
    rebuilt = testing.cached(tmp_path, "stale", build)
    assert sorted(p.name for p in rebuilt.iterdir()) == [".complete", "weights.txt"]


def test_tiny_catalog_for_make_demo_is_valid_and_idempotent(tmp_path):
    from mixdiff_cli.catalog.schema import load_catalog
    from mixdiff_cli.experts.manage import verify_experts
    from mixdiff_cli.testing import build_tiny_catalog

    path = build_tiny_catalog(tmp_path / "tiny")
    cat = load_catalog(path)
    assert cat.names == ["shapes", "watercolor", "pixel"] and cat.base.arch == "sd1"
    assert {r.status for r in verify_experts(cat)} == {"ok"}
    before = path.read_bytes()
    assert build_tiny_catalog(tmp_path / "tiny") == path and path.read_bytes() == before
