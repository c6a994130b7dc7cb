"""`mixdiff generate` / `mixdiff inspect` end to end on the tiny SD fixture, and the PNG metadata."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mixdiff_cli.cli import app
from mixdiff_cli.experts.manage import add_expert, init_catalog
from mixdiff_cli.sampling.pngmeta import MetadataError, a1111_parameters, parse_a1111, read_png, read_record, save_png

runner = CliRunner()


@pytest.fixture(scope="module")
def catalog(tiny_sd, lora_files, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "experts.yaml"
    init_catalog(path, base=str(tiny_sd))
    add_expert(path, str(lora_files[("sd1", "diffusers")]), name="ink", prompts=["an ink drawing of a cat"], trigger=["ink"])
    add_expert(path, str(lora_files[("sd1", "kohya")]), name="pixel", prompts=["pixel art of a house"], trigger=["pixel art"])
    return path


def mixdiff(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_generate_writes_pngs_with_both_metadata_chunks(catalog, tmp_path):
    out = tmp_path / "out"
    res = mixdiff("generate", "a red cat, ink: bold", "--catalog", catalog, "--steps", 3, "--seed", 7, "--expert", "ink:0.7",
                  "--expert", "pixel:0.3", "--negative", "blurry", "--out", out)
    assert res.exit_code == 0, res.output
    paths = [Path(line) for line in res.stdout.split()]
    assert paths == [out / "00001-7.png"] and paths[0].is_file()
    assert not list(out.glob(".*"))  # no temporary files left behind

    meta = read_png(paths[0])
    params = parse_a1111(meta.parameters)
    assert params["prompt"] == "a red cat, ink: bold" and params["negative"] == "blurry"
    assert params["Steps"] == "3" and params["Seed"] == "7" and params["Sampler"] == "DDIM" and params["Size"] == "64x64"
    assert params["CFG scale"] == "7.5"
    hashes = dict(item.split(": ") for item in params["Lora hashes"].split(", "))
    record = meta.record
    assert hashes == {e["name"]: e["sha256"][:10] for e in record["experts"]}
    assert [(e["name"], e["weight"]) for e in record["experts"]] == [("ink", 0.7), ("pixel", 0.3)]
    assert record["blend"] == "noise" and record["route"]["source"] == "explicit"

    res = mixdiff("inspect", paths[0], "--json")
    assert res.exit_code == 0
    assert json.loads(res.stdout) == {"parameters": meta.parameters, "mixdiff": record}
    res = mixdiff("inspect", paths[0])
    assert res.exit_code == 0 and "Lora hashes" in res.stdout and "ink (0.7), pixel (0.3)" in res.stdout


def test_from_reproduces_images_bit_exactly_even_from_a_batch(catalog, tmp_path, monkeypatch):
    res = mixdiff("generate", "pixel art of a red cat", "--catalog", catalog, "--steps", 3, "--seed", 11, "--num-images", 3,
                  "--batch-size", 2, "--scheduler", "euler-a", "--out", tmp_path / "a", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [img["seed"] for img in data["images"]] == [11, 12, 13]
    assert data["route"]["chosen"] == [{"expert": "pixel", "weight": 1.0}]  # the router: trigger word
    paths = [Path(img["path"]) for img in data["images"]]
    assert (pixels(paths[0]) != pixels(paths[1])).any()

    for original in paths[1:]:  # the second image shared its batch; the third ran alone
        res = mixdiff("generate", "--from", original, "--catalog", catalog, "--out", tmp_path / "b", "--json")
        assert res.exit_code == 0, res.output
        copy = Path(json.loads(res.stdout)["images"][0]["path"])
        assert np.array_equal(pixels(copy), pixels(original)), original
        want, got = read_record(original), read_record(copy)
        for key in ("prompt", "seed", "steps", "guidance", "scheduler", "experts", "blend"):
            assert got[key] == want[key], key

    monkeypatch.delenv("MIXDIFF_CATALOG")
    res = mixdiff("generate", "--from", paths[0], "--seed", 99, "--out", tmp_path / "c", "--json")  # its recorded catalog
    assert res.exit_code == 0  # options override the record
    changed = Path(json.loads(res.stdout)["images"][0]["path"])
    assert read_record(changed)["seed"] == 99 and (pixels(changed) != pixels(paths[0])).any()


def test_batch_size_does_not_change_images(catalog, tmp_path):
    n = 2
    common = ["--catalog", catalog, "--steps", 2, "--seed", 5, "--num-images", n, "--expert", "ink", "--json"]
    runs = {}
    for size in (1, 2):
        res = mixdiff("generate", "a cat", *common, "--batch-size", size, "--out", tmp_path / f"batch-{size}")
        assert res.exit_code == 0, res.output
        runs[size] = [Path(image["path"]) for image in json.loads(res.stdout)["images"]]
        assert len(runs[size]) == n and all(p.is_file() for p in runs[size]), runs[size]  # never a vacuous zip
    for a, b in zip(runs[1], runs[2]):
        assert np.array_equal(pixels(a), pixels(b))


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["a cat", "--expert", "nope"], 1, "error: expert 'nope' is not in the catalog"),
        (["a cat", "--expert", "ink:abc"], 2, "bad expert 'ink:abc': the weight is not a number"),
        (["a cat", "--top-k", "3"], 2, "--top-k 3 is out of range: the catalog has 2 experts"),
        (["a cat", "--width", "60", "--expert", "ink"], 2, "not a positive multiple of 8"),
        (["a cat", "--resume"], 2, "--resume and --keep-going apply to --prompts"),
        ([], 2, "no prompt given"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(catalog, tmp_path, args, code, message):
    out = tmp_path / "out"
    res = mixdiff("generate", *args, "--catalog", catalog, "--out", out, "--steps", 1)
    assert res.exit_code == code, res.output
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.output
    assert not out.exists() or not list(out.iterdir())


def test_unwritable_out_fails_before_loading(catalog, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    res = mixdiff("generate", "a cat", "--catalog", catalog, "--expert", "ink", "--out", blocker / "sub")
    assert res.exit_code == 1 and "cannot write to --out" in res.stderr
    assert blocker.read_text() == "not a folder"


def test_inspect_rejects_images_without_metadata(catalog, tmp_path):
    from PIL import Image

    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    res = mixdiff("inspect", plain)
    assert res.exit_code == 1 and "has no generation metadata" in res.stderr
    with pytest.raises(MetadataError, match="no generation metadata"):
        read_record(plain)
    res = mixdiff("generate", "--from", plain, "--catalog", catalog)
    assert res.exit_code == 1 and "no mixdiff record" in res.stderr


def test_a1111_text_quotes_commas_and_colons_and_round_trips(tmp_path):
    from PIL import Image

    record = {
        "prompt": "a cat, watercolor", "negative": "ugly, blurry", "seed": 12, "steps": 20, "guidance": 7.0,
        "width": 512, "height": 768, "scheduler": "dpm++", "blend": "merge",
        "base": {"source": "models/sd15", "sha256": "abcdef0123456789"},
        "experts": [{"name": "water", "weight": 0.6, "kind": "lora", "sha256": "1234567890ab"},
                    {"name": "ink", "weight": 0.4, "kind": "lora", "sha256": "ba09876543"}],
        "versions": {"mixdiff": "0.1.0"},
    }
    text = a1111_parameters(record)
    assert text.splitlines()[0] == "a cat, watercolor" and text.splitlines()[1] == "Negative prompt: ugly, blurry"
    assert 'Lora hashes: "water: 1234567890, ink: ba09876543"' in text and "Model hash: abcdef0123" in text
    parsed = parse_a1111(text)
    assert parsed["Sampler"] == "DPM++ 2M" and parsed["CFG scale"] == "7" and parsed["Size"] == "512x768"
    assert parsed["Lora hashes"] == "water: 1234567890, ink: ba09876543" and parsed["Version"] == "mixdiff 0.1.0"

    # and A1111's own infotext parses the same way
    a1111 = 'a dog\nNegative prompt: bad\nSteps: 28, Sampler: Euler a, CFG scale: 6.5, Seed: 1, Size: 512x512, Lora hashes: "x: 0a1b2c3d4e"'
    assert parse_a1111(a1111)["Sampler"] == "Euler a" and parse_a1111(a1111)["Lora hashes"] == "x: 0a1b2c3d4e"

    path = save_png(Image.new("RGB", (8, 8), "red"), tmp_path / "x.png", {**record, "format": "mixdiff/1"})
    meta = read_png(path)
    assert meta.parameters == text and meta.record == {**record, "format": "mixdiff/1"}


def test_prompt_file_goes_through_the_batch_runner(catalog, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("an ink drawing of a cat\npixel art of a house\n")
    res = mixdiff("generate", "--prompts", prompts, "--catalog", catalog, "--steps", 2, "--seed", 3, "--out", tmp_path / "run", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["written"] == 2 and data["failed"] == 0
    pngs = sorted((tmp_path / "run").glob("*.png"))
    assert len(pngs) == 2 and all(read_record(p)["steps"] == 2 for p in pngs)
    assert {read_record(p)["experts"][0]["name"] for p in pngs} == {"ink", "pixel"}


def test_installed_entry_point_generates(catalog, tmp_path):
    exe = Path(sys.executable).with_name("mixdiff")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(exe), "generate", "an ink drawing of a cat", "--catalog", str(catalog), "--steps", "2", "--seed", "1",
         "--out", str(tmp_path / "sub")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip())
    assert path == tmp_path / "sub" / "00001-1.png" and read_record(path)["experts"][0]["name"] == "ink"
    assert "Traceback" not in proc.stderr and "warning" not in proc.stderr.lower()
