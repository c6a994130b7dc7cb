"""Timestep bands: `--expert NAME[:W]@START:END` gives an expert part of the sampling run. Checked against
a hand-written reference (plain diffusers, both adapters loaded, `set_adapters` switched in
`callback_on_step_end` at the boundary step), on SD 1.x and SDXL, three schedulers, CFG and batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from mixdiff_cli.cli import app
from mixdiff_cli.core.errors import UsageError
from mixdiff_cli.routing.route import Route, parse_member, spread_bands, uncovered
from mixdiff_cli.sampling.engine import Engine, Request, make_scheduler
from test_engine import PROMPT, make_catalog, plain_pipe

STEPS = 10
ONE = 1 / 255  # the acceptance bar on [0, 1] pixels
runner = CliRunner()


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def setup(arch, tiny_sd, tiny_sdxl, tmp_path_factory):
    """Two LoRAs strong enough (effect ~0.14 on [0, 1] pixels) that one step of either shows."""
    from mixdiff_cli.testing import make_lora

    base = {"sd1": tiny_sd, "sdxl": tiny_sdxl}[arch]
    folder = tmp_path_factory.mktemp(f"bands-{arch}")
    loras = {"ink": make_lora(base, folder / "ink.safetensors", "diffusers", seed=11, scale=0.2),
             "pixel": make_lora(base, folder / "pixel.safetensors", "kohya", seed=12, scale=0.2)}
    catalog = make_catalog(folder, base, loras)
    return Engine(catalog), plain_pipe(base, loras), catalog


def reference(pipe, first: str, second: str, switch_after: int, scheduler: str, seeds: list[int], steps: int = STEPS):
    """Plain diffusers: `first` active, then `second` from step `switch_after + 1` on."""
    import torch

    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.enable_lora()
    pipe.set_adapters([first], adapter_weights=[1.0])

    def switch(p, i, t, tensors):
        if i == switch_after:
            p.set_adapters([second], adapter_weights=[1.0])
        return tensors

    return pipe([PROMPT] * len(seeds), num_inference_steps=steps, output_type="np", callback_on_step_end=switch,
                generator=[torch.Generator().manual_seed(s) for s in seeds]).images


def banded(engine, route, scheduler: str, seeds: list[int], steps: int = STEPS):
    return np.stack(engine.generate([Request(PROMPT, seed=s, steps=steps, scheduler=scheduler) for s in seeds], route, output_type="np"))


def diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.mark.parametrize("scheduler", ["ddim", "euler-a", "dpm++"])
def test_two_disjoint_bands_equal_the_reference_loop(arch, setup, scheduler):
    if arch == "sdxl" and scheduler != "ddim":
        pytest.skip("SDXL is checked with ddim; the schedulers are checked on SD 1.x")
    engine, pipe, _ = setup
    seeds = [3, 4]  # a batch of two, under classifier-free guidance
    got = banded(engine, ["ink@:0.3", "pixel@0.3:"], scheduler, seeds)  # steps 0-2 ink, 3-9 pixel
    want = reference(pipe, "ink", "pixel", 2, scheduler, seeds)
    assert diff(got, want) <= ONE
    for off in (1, 3):  # the boundary is where the grammar says, not a step before or after
        assert diff(got, reference(pipe, "ink", "pixel", off, scheduler, seeds)) > ONE
    assert diff(got, banded(engine, ["ink"], scheduler, seeds)) > ONE  # both experts matter
    assert diff(got, banded(engine, ["pixel"], scheduler, seeds)) > ONE


def test_overlap_pays_the_noise_blend_only_on_its_steps(setup):
    engine, _, _ = setup
    sizes: list[int] = []
    handle = engine.denoiser.register_forward_pre_hook(lambda m, args, kw: sizes.append(int((args[0] if args else kw["sample"]).shape[0])), with_kwargs=True)
    try:
        banded(engine, ["ink@:0.6", "pixel@0.4:"], "ddim", [1])
    finally:
        handle.remove()
    # CFG doubles the batch: one expert = 2 samples, the two-expert noise blend = 4, on steps 4 and 5 only
    assert sizes == [2] * 4 + [4] * 2 + [2] * 4
    assert engine.adapters and {"ink", "pixel"} <= set(engine.adapters)  # both stayed loaded


def test_full_model_expert_takes_the_last_part(tiny_sd, full_model, lora_files, tmp_path):
    import torch
    from diffusers import UNet2DConditionModel

    catalog = make_catalog(tmp_path, tiny_sd, {"ink": lora_files[("sd1", "diffusers")], "other": full_model})
    engine = Engine(catalog)
    got = banded(engine, ["ink@:0.5", "other@0.5:"], "ddim", [2])
    pipe = plain_pipe(tiny_sd, {"ink": lora_files[("sd1", "diffusers")]})
    other = UNet2DConditionModel.from_pretrained(full_model).eval()
    base = pipe.unet

    def switch(p, i, t, tensors):
        if i == 4:
            p.unet = other
        return tensors

    pipe.set_adapters(["ink"])
    try:
        want = pipe(PROMPT, num_inference_steps=STEPS, output_type="np", callback_on_step_end=switch,
                    generator=torch.Generator().manual_seed(2)).images
    finally:
        pipe.unet = base
    assert diff(got, want) <= ONE


def test_a_gap_runs_the_bare_base_with_a_warning(setup):
    engine, pipe, _ = setup
    with pytest.warns(UserWarning, match=r"steps 5-6 of 10 run the bare base"):
        got = banded(engine, ["ink@:0.4", "pixel@0.6:"], "ddim", [5])
    import torch

    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    pipe.enable_lora()
    pipe.set_adapters(["ink"])

    def switch(p, i, t, tensors):
        if i == 3:
            p.disable_lora()
        if i == 5:
            p.enable_lora()
            p.set_adapters(["pixel"])
        return tensors

    want = pipe(PROMPT, num_inference_steps=STEPS, output_type="np", callback_on_step_end=switch,
                generator=torch.Generator().manual_seed(5)).images
    assert diff(got, want) <= ONE


@pytest.mark.parametrize(("spec", "message"), [
    (["ink@0.95:0.97"], "holds no step of the 10-step run"),  # no step falls in the band
    (["ink@0.91:0.99", "pixel@0.92:0.98"], "holds no step of the 10-step run"),  # the whole run uncovered
    (["ink@0.7:0.2"], "the band's start 0.7 is not before its end 0.2"),
    (["ink@0.5"], "has no ':'"),
    (["ink@:1.5"], "must lie in 0..1"),
])
def test_bad_bands_are_one_line_errors(arch, setup, tmp_path, spec, message):
    if arch == "sdxl":
        pytest.skip("the grammar and its errors do not depend on the architecture")
    _, _, catalog = setup
    args = ["generate", PROMPT, "--catalog", str(catalog), "--steps", str(STEPS), "--out", str(tmp_path / "out")]
    res = runner.invoke(app, args + [x for s in spec for x in ("-e", s)])
    assert res.exit_code == 2, res.output
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not list((tmp_path / "out").glob("*.png")) if (tmp_path / "out").exists() else True


def test_record_replay_and_inspect(setup, tmp_path):
    _, _, catalog = setup
    first = tmp_path / "a"
    res = runner.invoke(app, ["generate", PROMPT, "--catalog", str(catalog), "--steps", "6", "--seed", "9", "-e", "ink:3@:0.5",
                              "-e", "pixel@0.5:", "--out", str(first), "--json"])
    assert res.exit_code == 0, res.output
    png = first / "00001-9.png"
    from mixdiff_cli.sampling.pngmeta import read_record

    record = read_record(png)
    assert [(e["name"], e["weight"], e.get("band")) for e in record["experts"]] == [("ink", 0.75, [0.0, 0.5]), ("pixel", 0.25, [0.5, 1.0])]
    assert record["blend"] == "bands"
    again = runner.invoke(app, ["generate", "--from", str(png), "--catalog", str(catalog), "--out", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(tmp_path / "b" / "00001-9.png")))
    shown = runner.invoke(app, ["inspect", str(png)])
    assert "ink (0.75 over 0-0.5 of the run)" in shown.stdout and "Mixdiff experts: \"ink: 0.75 @0-0.5, pixel: 0.25 @0.5-1\"" in shown.stdout


def test_prompt_file_items_carry_their_bands(setup, tmp_path):
    _, _, catalog = setup
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"prompt": PROMPT, "seed": 1, "steps": 4, "experts": ["ink@:0.5", "pixel@0.5:"]}) + "\n"
        + json.dumps({"prompt": PROMPT, "seed": 1, "steps": 4, "experts": [["ink", 1, [0, 0.5]], ["pixel", 1, [0.5, 1]]]}) + "\n"
        + json.dumps({"prompt": PROMPT, "seed": 1, "steps": 4, "experts": ["ink"]}) + "\n"
    )
    res = runner.invoke(app, ["generate", "--prompts", str(prompts), "--catalog", str(catalog), "--out", str(tmp_path / "out"), "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    routes = {x["index"]: x["route"] for x in lines}
    assert routes[0] == routes[1] == [["ink", 0.5, [0.0, 0.5]], ["pixel", 0.5, [0.5, 1.0]]]
    assert routes[2] == [["ink", 1.0]]
    by_index = {x["index"]: x["sha256"] for x in lines}
    assert by_index[0] == by_index[1] != by_index[2]  # the two spellings are one route, and bands matter


def test_catalog_band_is_a_default_and_bands_auto_spreads_the_router_choice(setup, tmp_path):
    _, _, catalog = setup
    text = catalog.read_text().replace("name: pixel\n", "name: pixel\n  band: [0.8, 1.0]\n")
    assert "band:" in text
    cat = catalog.with_name("banded.yaml")  # beside the original: the same relative sources
    cat.write_text(text)
    from mixdiff_cli.catalog.schema import load_catalog

    loaded = load_catalog(cat)
    assert loaded.expert("pixel").band == [0.8, 1.0]
    engine = Engine(loaded)
    [image] = engine.generate([Request(PROMPT, seed=1, steps=STEPS)], ["ink", "pixel"])
    record = image.info["mixdiff"]
    assert [e.get("band") for e in record["experts"]] == [None, [0.8, 1.0]]
    route = spread_bands(Route([("pixel", 0.7), ("ink", 0.3)], {}), {"pixel": (0.8, 1.0), "ink": None})
    assert route.bands == {"ink": (0.0, 0.3), "pixel": (0.3, 1.0)}  # ink prefers the middle, pixel the end
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("band: [0.8, 1.0]", "band: [0.8, 0.2]"))
    with pytest.raises(Exception, match=r"bad.yaml:\d+: band must be a band"):
        load_catalog(bad)


def test_grammar_helpers():
    assert parse_member("detail:0.5@0.4:").band == (0.4, 1.0)
    assert parse_member("a@:").band is None and parse_member("a@0:1").band is None
    assert parse_member("a@0.2:0.6").spec() == "a@0.2:0.6"
    assert uncovered([(0.0, 0.4), (0.6, 1.0)]) == [(0.4, 0.6)]
    assert uncovered([None, (0.2, 0.3)]) == []
    with pytest.raises(UsageError):
        parse_member("a@0.7:0.2")
