"""Model families: a family is one module. A family written here, in the test file only, is registered and
run through `route` and `generate` with no edit to the library; model experts are batch-invariant."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from mixdiff_cli import families
from mixdiff_cli.cli import app
from mixdiff_cli.experts.manage import add_expert, init_catalog
from mixdiff_cli.families.base import Family

runner = CliRunner()
TOY_PIPELINE = "ToyDiffusionPipeline"


class ToyFamily(Family):
    """A family of its own: its pipeline class, its router vector (mean-pooled token states, not CLIP's
    pooled feature) and its own wrapper over the denoiser's call, whose conditioning it names `context`."""

    name, label = "toy", "Toy"
    pipelines = (TOY_PIPELINE,)
    denoiser = "unet"
    text_encoders = ("text_encoder",)
    calls = 0  # denoiser calls through this family's wrapper
    encodes = 0  # text-encoder passes through this family

    def load(self, path: Path, **kwargs):
        from diffusers import StableDiffusionPipeline

        toy = type(TOY_PIPELINE, (StableDiffusionPipeline,), {})  # a pipeline class diffusers does not know
        return toy.from_pretrained(path, local_files_only=True, use_safetensors=True, **kwargs)

    def encode(self, pipe, texts, device):
        type(self).encodes += 1
        embeds, _ = pipe.encode_prompt(texts, device, 1, False)  # (N, L, D)
        return {"prompt_embeds": embeds}, embeds.mean(1)

    def denoiser_cond(self, fields):
        return {"context": fields["prompt_embeds"]}

    def split(self, args, kwargs):
        rest = {**dict(zip(("sample", "timestep", "encoder_hidden_states"), args)), **kwargs}
        x, t, context = rest.pop("sample"), rest.pop("timestep"), rest.pop("encoder_hidden_states")
        rest.pop("return_dict", None)
        rest.pop("added_cond_kwargs", None)
        return x, t, {"context": context}, rest

    def run(self, model, x, t, cond, rest):
        type(self).calls += 1
        return model(x, t, encoder_hidden_states=cond["context"], return_dict=False, **rest)[0]

    def output(self, prediction, return_dict):
        return SimpleNamespace(sample=prediction) if return_dict else (prediction,)


@pytest.fixture
def toy(tiny_sd, lora_files, tmp_path, monkeypatch):
    """A catalog on a toy-family base (the tiny SD weights under another pipeline class) with two LoRAs."""
    base = tmp_path / "toy-base"
    shutil.copytree(tiny_sd, base)
    index = json.loads((base / "model_index.json").read_text())
    (base / "model_index.json").write_text(json.dumps({**index, "_class_name": TOY_PIPELINE}))
    family = families.register(ToyFamily())
    catalog = tmp_path / "experts.yaml"
    try:
        init_catalog(catalog, base=str(base))
        add_expert(catalog, str(lora_files[("sd1", "diffusers")]), name="ink", prompts=["an ink drawing of a cat"])
        add_expert(catalog, str(lora_files[("sd1", "kohya")]), name="pixel", prompts=["pixel art of a house"])
        yield SimpleNamespace(catalog=catalog, family=family, base=base)
    finally:
        families.unregister("toy")


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_a_family_registered_in_a_test_file_routes_and_generates(toy, tmp_path):
    from mixdiff_cli.catalog.schema import load_catalog

    assert load_catalog(toy.catalog).base.arch == "toy"  # detected from the folder by the family itself
    ToyFamily.encodes = 0
    res = runner.invoke(app, ["route", "pixel art of a house", "--catalog", str(toy.catalog), "--json"])
    assert res.exit_code == 0, res.output
    assert ToyFamily.encodes >= 1  # the router read the toy family's own prompt vector
    decision = json.loads(res.stdout)[0]
    assert [c["expert"] for c in decision["chosen"]] == ["pixel"]

    ToyFamily.calls = 0
    out = tmp_path / "out"
    args = ["generate", "a cat", "--catalog", str(toy.catalog), "--steps", "3", "--seed", "4", "--out", str(out)]
    blended = runner.invoke(app, [*args, "--expert", "ink:0.5", "--expert", "pixel:0.5", "--blend", "noise"])
    assert blended.exit_code == 0, blended.output
    assert ToyFamily.calls == 3  # every step of the noise blend went through the toy wrapper
    single = runner.invoke(app, [*args, "--expert", "ink"])  # top-1: the pipeline's own call of the denoiser
    assert single.exit_code == 0, single.output
    first, second = sorted(out.glob("*.png"))
    assert np.abs(_pixels(first) - _pixels(second)).max() > 0  # the experts changed the image


@pytest.fixture(scope="module")
def model_catalog(tiny_sd, full_model, lora_files, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "experts.yaml"
    init_catalog(path, base=str(tiny_sd))
    add_expert(path, str(full_model), name="other", prompts=["a photo of a dog"])
    add_expert(path, str(lora_files[("sd1", "diffusers")]), name="ink", prompts=["an ink drawing of a cat"])
    return path


@pytest.mark.parametrize("route", [["--expert", "other"], ["--expert", "other:0.5", "--expert", "ink:0.5"]], ids=["model", "model+lora"])
def test_model_experts_are_batch_invariant(model_catalog, tmp_path, route):
    images = {}
    for size in ("1", "2"):
        out = tmp_path / size
        res = runner.invoke(app, ["generate", "a dog", "--catalog", str(model_catalog), "--steps", "3", "--seed", "9", "-N", "2",
                                  "--batch-size", size, "--out", str(out), *route])
        assert res.exit_code == 0, res.output
        images[size] = [_pixels(p) for p in sorted(out.glob("*.png"))]
    assert len(images["1"]) == len(images["2"]) == 2
    for one, two in zip(images["1"], images["2"]):
        assert np.array_equal(one, two)  # byte-identical, whatever the batch
