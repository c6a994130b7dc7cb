"""Regional canvases (`generate --region BOX=TEXT`): one region over a native canvas is plain `generate`;
two regions with two experts over two tiles equal a hand-written Mixture-of-Diffusers loop; bad regions
are one-line errors naming the region; the record replays and `inspect` shows it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mixdiff_cli.cli import app
from mixdiff_cli.sampling.regions import parse_region, region_map, tile_starts, tile_weights, tiles
from test_bands import arch, setup  # noqa: F401  (fixtures: SD 1.x and SDXL, LoRAs ink and pixel, plain diffusers beside)
from test_engine import PROMPT

ONE = 1 / 255  # the acceptance bar on [0, 1] pixels
STEPS = 6
runner = CliRunner()


def png(path) -> np.ndarray:
    """A PNG as its 8-bit levels (two PNGs one level apart differ by exactly ONE)."""
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int64)


def diff(a, b) -> float:
    """Max difference on [0, 1] pixels; integer arrays are 8-bit levels."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "iu" and b.dtype.kind in "iu":
        return float(np.abs(a - b).max()) / 255
    a, b = (x / 255 if x.dtype.kind in "iu" else x for x in (a, b))
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def cli(catalog, out, *args) -> list:
    res = runner.invoke(app, ["generate", *args, "--catalog", str(catalog), "--steps", str(STEPS), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return sorted(out.glob("*.png"))


@pytest.mark.parametrize(("scheduler", "guidance"), [("ddim", None), ("euler-a", None), ("dpm++", None), ("euler", "1")])
def test_one_region_over_a_native_canvas_is_plain_generate(setup, tmp_path, scheduler, guidance):
    _, _, catalog = setup
    common = ["--seed", "3", "--scheduler", scheduler, "-N", "2", "-b", "2"] + (["--guidance", guidance] if guidance else [])  # 1: no CFG
    plain = cli(catalog, tmp_path / "plain", PROMPT, "-e", "ink", *common)
    region = cli(catalog, tmp_path / "region", "-r", f"0:1,0:1={PROMPT} --expert ink", *common)
    assert len(plain) == len(region) == 2
    for a, b in zip(plain, region):
        assert diff(png(a), png(b)) <= ONE
    other = cli(catalog, tmp_path / "other", "-r", f"0:1,0:1={PROMPT} --expert pixel", *common)
    assert diff(png(plain[0]), png(other[0])) > ONE  # the region's expert is applied


def test_a_routed_region_takes_the_router_choice(setup, tmp_path):
    _, _, catalog = setup
    plain = runner.invoke(app, ["generate", "a ink picture", "--catalog", str(catalog), "--steps", str(STEPS), "--seed", "1",
                                "--out", str(tmp_path / "plain"), "--json"])
    assert plain.exit_code == 0, plain.output
    region = runner.invoke(app, ["generate", "-r", "0:1,0:1=a ink picture", "--catalog", str(catalog), "--steps", str(STEPS),
                                 "--seed", "1", "--out", str(tmp_path / "region"), "--json"])
    assert region.exit_code == 0, region.output
    import json

    chosen = json.loads(plain.stdout)["route"]["chosen"]
    assert [c["expert"] for c in chosen] == ["ink"]  # the prototype router picks the expert named in the prompt
    assert json.loads(region.stdout)["route"]["regions"][0]["chosen"] == chosen
    assert diff(png(tmp_path / "plain" / "00001-1.png"), png(tmp_path / "region" / "00001-1.png")) <= ONE


def reference(pipe, arch: str, regions: list[tuple[str, str, str]], size: tuple[int, int], overlap: int, feather: float,
              seed: int, guidance: float) -> np.ndarray:
    """A hand-written Mixture of Diffusers loop: crop each tile, run each region that touches it with its
    own adapter (set_adapters, one forward per region and tile, CFG per forward), blend with the tile
    Gaussian x region map, normalise, one DDIM step on the whole canvas; decode each region's cells on their
    own and blend them with the region maps. A region's prompt runs on its own tile only: the native window
    centred on its box (each region here fits in one)."""
    import torch
    from diffusers import DDIMScheduler

    f = pipe.vae_scale_factor
    native = pipe.unet.config.sample_size
    height, width = size[0] // f, size[1] // f
    grid = tiles(height, width, native, overlap // f)
    maps = [region_map(parse_region(f"{box}=x").box, height, width, feather) for box, _, _ in regions]

    def own_tile(box: str) -> tuple[int, int]:  # the native window centred on the region's box (each fits in one)
        x0, x1, y0, y1 = parse_region(f"{box}=x").box
        return tuple(min(max(0, round((a + b) * n / 2 - native / 2)), n - native) if n > native else 0
                     for a, b, n in ((y0, y1, height), (x0, x1, width)))

    owns = [own_tile(box) for box, _, _ in regions]
    conds = []
    with torch.no_grad():
        for _, prompt, _ in regions:
            if arch == "sdxl":
                pe, npe, ppe, nppe = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
                conds.append((torch.cat([npe, pe]), torch.cat([nppe, ppe])))
            else:
                pe, npe = pipe.encode_prompt(prompt, "cpu", 1, True)
                conds.append((torch.cat([npe, pe]), None))
        pipe.enable_lora()
        sched = DDIMScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(STEPS)
        latents = torch.randn((1, 4, height, width), generator=torch.Generator().manual_seed(seed)) * sched.init_noise_sigma
        for t in sched.timesteps:
            num = torch.zeros_like(latents, dtype=torch.float64)
            den = torch.zeros(height, width, dtype=torch.float64)
            for tile in grid:
                rows, cols = slice(tile.y0, tile.y0 + tile.h), slice(tile.x0, tile.x0 + tile.w)
                x = sched.scale_model_input(torch.cat([latents[:, :, rows, cols]] * 2), t)
                for (_, _, adapter), m, (context, pooled), own in zip(regions, maps, conds, owns):
                    w = tile_weights(tile.h, tile.w) * m[rows, cols]
                    if w.max() <= 0 or own != (tile.y0, tile.x0):  # a region's prompt runs on its own tile only
                        continue
                    pipe.set_adapters([adapter])
                    added = None
                    if arch == "sdxl":
                        ids = torch.tensor([[size[0], size[1], tile.y0 * f, tile.x0 * f, tile.h * f, tile.w * f]], dtype=context.dtype)
                        added = {"text_embeds": pooled, "time_ids": ids.repeat(2, 1)}
                    uncond, cond = pipe.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample.chunk(2)
                    num[:, :, rows, cols] += w * (uncond + guidance * (cond - uncond))
                    den[rows, cols] += w
            latents = sched.step((num / den).float(), t, latents).prev_sample
        # each region decoded on its own cells, blended with its map at pixel resolution
        num = torch.zeros((1, 3, size[0], size[1]), dtype=torch.float64)
        den = torch.zeros(size, dtype=torch.float64)
        for box, _, _ in regions:
            weight = region_map(parse_region(f"{box}=x").box, size[0], size[1], feather)
            ys, xs = torch.nonzero(weight > 0, as_tuple=True)
            y0, y1, x0, x1 = int(ys.min()) // f, -(-(int(ys.max()) + 1) // f), int(xs.min()) // f, -(-(int(xs.max()) + 1) // f)
            crop = pipe.vae.decode(latents[:, :, y0:y1, x0:x1] / pipe.vae.config.scaling_factor).sample
            num[:, :, y0 * f : y1 * f, x0 * f : x1 * f] += weight[y0 * f : y1 * f, x0 * f : x1 * f] * crop
            den[y0 * f : y1 * f, x0 * f : x1 * f] += weight[y0 * f : y1 * f, x0 * f : x1 * f]
        image = (num / den).float()
        return pipe.image_processor.postprocess(image, output_type="np")[0]


def test_two_regions_two_experts_two_tiles_equal_the_reference_loop(arch, setup, tmp_path):
    _, pipe, catalog = setup
    guidance = {"sd1": 7.5, "sdxl": 5.0}[arch]
    regions = [("0:0.6,0:1", "a photo of a red cat", "ink"), ("0.4:1,0:1", "a photo of a blue dog", "pixel")]
    args = ["-W", "96", "-H", "64", "--tile-overlap", "16", "--feather", "0.2", "--seed", "4", "--guidance", str(guidance)]
    [got] = cli(catalog, tmp_path / "canvas", *args, *[x for box, p, e in regions for x in ("-r", f"{box}={p} --expert {e}")])
    from mixdiff_cli.sampling.pngmeta import read_record

    assert read_record(got)["canvas"]["tiles"] == 2 and Image.open(got).size == (96, 64)
    want = reference(pipe, arch, regions, (64, 96), 16, 0.2, 4, guidance)
    assert diff(png(got), want) <= ONE
    # each region's expert matters: the loop with the experts swapped is another picture
    swapped = [(b, p, "pixel" if e == "ink" else "ink") for b, p, e in regions]
    assert diff(want, reference(pipe, arch, swapped, (64, 96), 16, 0.2, 4, guidance)) > 5 * ONE


@pytest.mark.parametrize(("spec", "message", "code"), [
    ("0.6:0.2,0:1=a cat", "region 1 ('0.6:0.2,0:1=a cat'): x span 0.6:0.2 is empty", 2),
    ("0:1,0:1.5=a cat", "region 1 ('0:1,0:1.5=a cat'): y span 0:1.5 lies outside 0..1", 2),
    ("0:1,0.3:0.3=a cat", "y span 0.3:0.3 is empty", 2),
    ("0:1,-0.1:1=a cat", "y span -0.1:1 lies outside 0..1", 2),
    ("0:1=a cat", "the box '0:1' is not x0:x1,y0:y1", 2),
    ("0:1,0:1 a cat", "has no '='", 2),
    ("0:1,0:1=a cat --expert ink:0", "the weight must be a positive number", 2),
    ("0:1,0:1=a cat --seed 3", "--seed does not apply to one region", 2),
    ("0:1,0:1=a cat --expert nope", "region 1 ('0:1,0:1=a cat --expert nope'): expert 'nope' is not in the catalog", 1),
])
def test_bad_regions_are_one_line_errors_naming_the_region(arch, setup, tmp_path, spec, message, code):
    if arch == "sdxl":
        pytest.skip("the grammar does not depend on the architecture")
    _, _, catalog = setup
    res = runner.invoke(app, ["generate", "-r", "0:1,0:1=a dog", "-r", spec, "--catalog", str(catalog), "--out", str(tmp_path / "o")])
    assert res.exit_code == code, res.output
    assert message.replace("region 1", "region 2") in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.png"))


def test_uncovered_canvas_needs_a_background(arch, setup, tmp_path):
    if arch == "sdxl":
        pytest.skip("geometry only")
    _, _, catalog = setup
    args = ["generate", "-r", "0:0.5,0:1=a cat --expert ink", "--feather", "0", "--catalog", str(catalog), "--steps", "2", "--out", str(tmp_path / "o")]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "the regions leave 50% of the canvas uncovered" in res.stderr, res.output
    ok = runner.invoke(app, args + ["", "-e", "pixel"])  # a background PROMPT covers the rest
    assert ok.exit_code == 0, ok.output


def test_record_replays_and_inspect_shows_the_regions(arch, setup, tmp_path):
    if arch == "sdxl":
        pytest.skip("metadata does not depend on the architecture")
    _, _, catalog = setup
    [first] = cli(catalog, tmp_path / "a", "a plain background", "-e", "pixel", "-W", "96", "--seed", "7",
                  "-r", "0:0.5,0:1=a photo of a red cat --expert ink", "-r", "0.5:1,0.2:1=a photo of a blue dog", "--no-abstain")
    from mixdiff_cli.sampling.pngmeta import read_record

    record = read_record(first)
    assert [(r["box"], r["prompt"]) for r in record["regions"]] == [("0:0.5,0:1", "a photo of a red cat"), ("0.5:1,0.2:1", "a photo of a blue dog")]
    assert [e["name"] for e in record["regions"][0]["experts"]] == ["ink"] and record["regions"][1]["experts"]  # pinned; routed
    assert record["experts"][0]["name"] == "pixel" and record["prompt"] == "a plain background" and record["blend"] == "regions"
    again = runner.invoke(app, ["generate", "--from", str(first), "--catalog", str(catalog), "--out", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    assert np.array_equal(png(first), png(tmp_path / "b" / "00001-7.png"))
    shown = runner.invoke(app, ["inspect", str(first)])
    assert shown.exit_code == 0 and "0:0.5,0:1=a photo of a red cat (ink 1)" in shown.stdout, shown.output


def test_a_canvas_records_every_expert_it_uses_and_prints_the_backgrounds_route(arch, setup, tmp_path):
    if arch == "sdxl":
        pytest.skip("metadata does not depend on the architecture")
    from mixdiff_cli.sampling.pngmeta import read_record

    _, _, catalog = setup
    args = ["--catalog", str(catalog), "--steps", str(STEPS), "-W", "96", "--seed", "7"]
    res = runner.invoke(app, ["generate", "a plain background", "-e", "pixel", "-r", "0:0.5,0:1=a photo of a red cat --expert ink",
                              "-r", "0.5:1,0:1=a photo of a blue dog --expert ink", *args, "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "background: pixel (1.00)" in res.output
    first = tmp_path / "a" / "00001-7.png"
    record = read_record(first)
    assert [e["name"] for e in record["experts"]] == ["pixel", "ink"]  # the background's and the regions'
    assert record["canvas"]["background_experts"] == [{"name": "pixel", "weight": 1.0}]
    parameters = Image.open(first).info["parameters"]
    assert "ink: " in parameters.split("Lora hashes: ")[1] and "pixel: " in parameters.split("Lora hashes: ")[1], parameters
    again = runner.invoke(app, ["generate", "--from", str(first), "--catalog", str(catalog), "--out", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    assert np.array_equal(png(first), png(tmp_path / "b" / "00001-7.png"))  # the background replays with its own expert only
    # a canvas of regions only: its experts are the regions'
    res = runner.invoke(app, ["generate", "-r", "0:0.5,0:1=a photo of a red cat --expert ink", "-r", "0.5:1,0:1=a photo of a blue dog --expert pixel",
                              *args, "--out", str(tmp_path / "c")])
    assert res.exit_code == 0 and "background:" not in res.output, res.output
    shown = runner.invoke(app, ["inspect", str(tmp_path / "c" / "00001-7.png")])
    assert shown.exit_code == 0 and "bare base" not in shown.stdout.split("regions")[0] and "ink (1" in shown.stdout, shown.output


def test_batches_do_not_change_a_canvas(arch, setup, tmp_path):
    if arch == "sdxl":
        pytest.skip("batching does not depend on the architecture")
    _, _, catalog = setup
    regions = ["-r", "0:0.5,0:1=a red cat --expert ink", "-r", "0.5:1,0:1=a blue dog --expert pixel", "-W", "96"]
    one = cli(catalog, tmp_path / "one", *regions, "--seed", "2", "-N", "3", "-b", "1")
    three = cli(catalog, tmp_path / "three", *regions, "--seed", "2", "-N", "3", "-b", "3")
    assert len(one) == len(three) == 3
    assert all(np.array_equal(png(a), png(b)) for a, b in zip(one, three))
    assert diff(png(one[0]), png(one[1])) > ONE  # the seeds differ


def test_geometry_helpers():
    assert tile_starts(32, 32, 8) == [0] and tile_starts(48, 32, 8) == [0, 16] and tile_starts(64, 32, 8) == [0, 16, 32]
    assert tile_starts(64, 32, 0) == [0, 32]
    ramp = region_map((0.0, 0.5, 0.0, 1.0), 1, 20, 0.2)[0]
    # a soft edge 0.2 wide centred on x = 0.5 (cells 8..11), the canvas border x = 0 not feathered
    assert ramp[:8].tolist() == [1.0] * 8 and ramp[12:].tolist() == [0.0] * 8
    assert float(ramp[9]) == pytest.approx(0.625) and float(ramp[9] + ramp[10]) == pytest.approx(1.0)
    hard = region_map((0.0, 0.5, 0.0, 1.0), 1, 20, 0.0)[0]
    assert hard.tolist() == [1.0] * 10 + [0.0] * 10
    w = tile_weights(8, 8)
    assert float(w[0, 0]) < 1e-5 < float(w[3, 3]) and bool((w > 0).all())


# The embedded demo: a 128x64 canvas, a landscape on the left half and stripes on the right (README).
LANDSCAPE = ("a landscape at daytime with the sun above green grass", "landscapes", "ground", "grass")
STRIPES = ("horizontal stripes in red and blue", "stripes", "pattern", "horizontal")


def test_demo_canvas_each_half_routed_to_its_expert_and_passing_its_checker(tmp_path):
    """Each half is read back by its domain's checker on the attribute its expert draws better than the
    bare base (tests/test_demo.py): at least 6 of 8 seeds. Measured 2026-11-29: 8/8 and 8/8."""
    import json

    from mixdiff_cli.catalog.discovery import packaged_catalog_path
    from mixdiff_cli.demo import measure

    res = runner.invoke(app, ["generate", "-W", "128", "-r", f"0:0.5,0:1={LANDSCAPE[0]}", "-r", f"0.5:1,0:1={STRIPES[0]}",
                              "--catalog", str(packaged_catalog_path()), "--steps", "12", "--seed", "0", "-N", "8", "-b", "8",
                              "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert [r["chosen"] for r in result["route"]["regions"]] == [[{"expert": "landscapes", "weight": 1.0}], [{"expert": "stripes", "weight": 1.0}]]
    passed = {LANDSCAPE[1]: 0, STRIPES[1]: 0}
    for item in result["images"]:
        image = Image.open(item["path"])
        assert image.size == (128, 64)
        for (_, domain, attribute, value), box in ((LANDSCAPE, (0, 0, 64, 64)), (STRIPES, (64, 0, 128, 64))):
            passed[domain] += measure.check(domain, image.crop(box), {attribute: value})[attribute]
    assert passed[LANDSCAPE[1]] >= 6 and passed[STRIPES[1]] >= 6, passed


# Regions side by side, one native tile each, in colours and patterns no other region test uses.
TWO = [("a blue triangle on a white background", "shapes"), ("green and yellow checks", "stripes")]
THREE = [("a yellow circle on a black background", "shapes"), ("a landscape at sunset with the sun above sand", "landscapes"),
         ("vertical stripes in blue and green", "stripes")]
# what a prompt asks of each domain's picture: its colours and its pattern (not where the noise puts a shape)
ASKED = {"shapes": ("colour", "background"), "stripes": ("pattern", "colour_a", "colour_b"), "landscapes": ("time", "ground")}
# RGB distance (0..255) between a region's mean colour and its prompt's alone. The same prompt alone over six
# seeds spreads up to 28 (2026-12-07); a region also sees its neighbour across the feather. Measured: at most
# 41 with regions decoded on their own cells, 42-104 (most regions over 55) with the canvas decoded whole.
COLOUR_TOLERANCE = 45


@pytest.mark.parametrize("items", [TWO, THREE], ids=["two", "three"])
def test_demo_regions_keep_the_colours_and_pattern_of_their_prompt_alone(items, tmp_path):
    """Each region of a demo canvas, against its prompt rendered alone at the native size with the same
    seed: the checker reads the same colours and pattern, and the mean colours lie within COLOUR_TOLERANCE."""
    from mixdiff_cli.catalog.discovery import packaged_catalog_path
    from mixdiff_cli.demo import measure

    catalog, n = packaged_catalog_path(), len(items)
    common = ["--catalog", str(catalog), "--steps", "20", "--seed", "0", "-N", "3", "-b", "3"]
    boxes = [x for i, (prompt, _) in enumerate(items) for x in ("-r", f"{i / n:g}:{(i + 1) / n:g},0:1={prompt}")]
    res = runner.invoke(app, ["generate", "-W", str(64 * n), *boxes, *common, "--out", str(tmp_path / "canvas")])
    assert res.exit_code == 0, res.output
    canvases = sorted((tmp_path / "canvas").glob("*.png"))
    failures = []
    for i, (prompt, domain) in enumerate(items):
        res = runner.invoke(app, ["generate", prompt, *common, "--out", str(tmp_path / f"alone{i}")])
        assert res.exit_code == 0, res.output
        for canvas, alone in zip(canvases, sorted((tmp_path / f"alone{i}").glob("*.png"))):
            crop, alone = Image.open(canvas).convert("RGB").crop((64 * i, 0, 64 * (i + 1), 64)), Image.open(alone).convert("RGB")
            distance = float(np.linalg.norm(png_mean(crop) - png_mean(alone)))
            got, want = measure.measure(domain, crop), measure.measure(domain, alone)
            if distance > COLOUR_TOLERANCE or any(got[a] != want[a] for a in ASKED[domain]):
                failures.append(f"{canvas.name} region {i + 1} ({prompt!r}): colour distance {distance:.0f}, read {got}, alone {want}")
    assert len(canvases) == 3 and not failures, "\n".join(failures)


def png_mean(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(0)


def test_prompt_file_items_take_regions(arch, setup, tmp_path):
    if arch == "sdxl":
        pytest.skip("prompt files do not depend on the architecture")
    import json

    _, _, catalog = setup
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"prompt": PROMPT, "seed": 1, "steps": STEPS, "experts": ["ink"]}) + "\n"
        + json.dumps({"seed": 5, "steps": STEPS, "width": 96, "regions": ["0:0.5,0:1=a photo of a red cat --expert ink",
                                                                          {"box": "0.5:1,0:1", "prompt": "a photo of a blue dog", "experts": ["pixel"]}]}) + "\n"
    )
    res = runner.invoke(app, ["generate", "--prompts", str(prompts), "--catalog", str(catalog), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    lines = {x["index"]: x for x in map(json.loads, (tmp_path / "out" / "manifest.jsonl").read_text().splitlines())}
    assert set(lines) == {0, 1} and lines[1]["width"] == 96
    from mixdiff_cli.sampling.pngmeta import read_record

    record = read_record(tmp_path / "out" / lines[1]["path"])
    assert [(r["box"], [e["name"] for e in r["experts"]]) for r in record["regions"]] == [("0:0.5,0:1", ["ink"]), ("0.5:1,0:1", ["pixel"])]
    [same] = cli(catalog, tmp_path / "cli", "-W", "96", "--seed", "5", "-r", "0:0.5,0:1=a photo of a red cat --expert ink",
                 "-r", "0.5:1,0:1=a photo of a blue dog --expert pixel")
    assert np.array_equal(png(tmp_path / "out" / lines[1]["path"]), png(same))  # the file's item is the command's canvas
    bad = tmp_path / "bad.yaml"
    bad.write_text("- prompt: a cat\n- regions: ['0:1,0:1=a cat', '0.6:0.2,0:1=a dog']\n")
    res = runner.invoke(app, ["generate", "--prompts", str(bad), "--catalog", str(catalog), "--out", str(tmp_path / "bad")])
    assert res.exit_code == 1, res.output  # a prompt-file error, like every bad item (the file names the line)
    assert "bad.yaml:2: region 2 ('0.6:0.2,0:1=a dog'): x span 0.6:0.2 is empty" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_a_full_model_expert_in_a_region_is_plain_generate(tiny_sd, full_model, lora_files, tmp_path):
    from test_engine import make_catalog

    catalog = make_catalog(tmp_path, tiny_sd, {"other": full_model, "ink": lora_files[("sd1", "diffusers")]})
    plain = cli(catalog, tmp_path / "plain", PROMPT, "-e", "other", "--seed", "2")
    region = cli(catalog, tmp_path / "region", "-r", f"0:1,0:1={PROMPT} --expert other", "--seed", "2")
    assert diff(png(plain[0]), png(region[0])) <= ONE
    mixed = cli(catalog, tmp_path / "mixed", "-r", f"0:1,0:1={PROMPT} --expert other", "--seed", "2", PROMPT, "-e", "ink",
                "--background-weight", "1")
    assert diff(png(plain[0]), png(mixed[0])) > ONE  # a background under a LoRA expert beside the model expert


def test_terms_of_a_step_share_one_forward_in_chunks_that_do_not_change_the_image(arch, setup, tmp_path):
    if arch == "sdxl":
        pytest.skip("batching does not depend on the architecture")
    from mixdiff_cli.sampling.canvas import generate_canvas
    from mixdiff_cli.sampling.options import GenerationOptions
    from mixdiff_cli.sampling.regions import CanvasOptions

    engine, _, catalog = setup
    regions = ["0:0.6,0:1=a photo of a red cat --expert ink", "0.4:1,0:1=a photo of a blue dog --expert pixel"]
    opts = GenerationOptions(seed=6, steps=3, width=96)
    sizes: list[int] = []
    handle = engine.denoiser.register_forward_pre_hook(lambda m, args, kw: sizes.append(int((args[0] if args else kw["sample"]).shape[0])), with_kwargs=True)
    try:
        one = generate_canvas(engine, None, regions, opts, CanvasOptions(tile_overlap=16, feather=0.2), out_dir=tmp_path / "a")
        calls = len(sizes)
        two = generate_canvas(engine, None, regions, opts, CanvasOptions(tile_overlap=16, feather=0.2, max_batch=2), out_dir=tmp_path / "b")
    finally:
        handle.remove()
    # each region on its own tile: 2 conditional + 2 unconditional samples, one forward per step; max_batch 2: two forwards
    assert sizes[:calls] == [4] * 3 and sizes[calls:] == [2] * 6
    assert np.array_equal(png(one.paths[0]), png(two.paths[0]))
