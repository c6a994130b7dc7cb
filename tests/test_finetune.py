"""`mixdiff fine-tune` on the tiny SD fixtures: data handling, learning, exact resume, plain-diffusers
loading, data-parallel training and every bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mixdiff_cli.catalog.schema import load_catalog
from mixdiff_cli.cli import app
from mixdiff_cli.training.dataset import DatasetError, scan_dataset, with_trigger
from mixdiff_cli.experts.manage import init_catalog
from mixdiff_cli.training.config import FineTuneConfig, FineTuneJob, InvalidConfig
from mixdiff_cli.training.finetune import fine_tune
from mixdiff_cli.training.resume import CheckpointError
from mixdiff_cli.training.loss import denoising_loss

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Small and fast: 16x16 latents, rank 4, a fixed seed.
FAST = dict(rank=4, resolution=32, batch_size=2, seed=3, lr=1e-3)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    from mixdiff_cli.demo.data import write_dataset

    return write_dataset("shapes", tmp_path_factory.mktemp("shapes"), 64, seed=0)


@pytest.fixture(scope="session")
def small(tmp_path_factory) -> Path:
    """12 captioned shapes: enough for a few steps."""
    from mixdiff_cli.demo.data import write_dataset

    return write_dataset("shapes", tmp_path_factory.mktemp("small"), 12, seed=1)


@pytest.fixture
def catalog(tmp_path, tiny_sd) -> Path:
    path = tmp_path / "cat" / "experts.yaml"
    init_catalog(path, base=str(tiny_sd))
    return path


# --- data -----------------------------------------------------------------------------------------


def _image(path: Path, size=(40, 24), colour=(200, 30, 30)) -> Path:
    from PIL import Image

    Image.new("RGB", size, colour).save(path)
    return path


def test_scan_kohya_folder_skips_undecodable_and_hashes_content(tmp_path):
    for i in range(3):
        _image(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"a red  square {i}\n")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "bad.txt").write_text("broken")
    ds = scan_dataset(tmp_path)
    assert [r.caption for r in ds.records] == ["a red square 0", "a red square 1", "a red square 2"]
    assert [p.name for p, _ in ds.skipped] == ["bad.png"]
    before = ds.hash()
    (tmp_path / "1.txt").write_text("a blue square")
    assert scan_dataset(tmp_path).hash() != before


def test_scan_metadata_jsonl_and_trigger(tmp_path):
    sub = tmp_path / "img"
    sub.mkdir()
    _image(sub / "a.png", (64, 128))
    _image(sub / "b.jpg", (128, 64))
    rows = [{"file_name": "img/a.png", "text": "tall red"}, {"file_name": "img/b.jpg", "caption": "wide red"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = scan_dataset(tmp_path)
    assert ds.layout == "metadata.jsonl" and [r.caption for r in ds.records] == ["tall red", "wide red"]
    assert with_trigger("tall red", ["zqx"]) == "zqx, tall red"
    assert with_trigger("zqx, tall red", ["zqx"]) == "zqx, tall red"


def test_load_image_resizes_and_crops_any_size(tmp_path):
    from mixdiff_cli.training.dataset import load_image

    _image(tmp_path / "w.png", (100, 50))
    im = load_image(tmp_path / "w.png", 32, "random", flip=True, u=(1.0, 0.0))
    assert im.size == (32, 32)


@pytest.mark.parametrize(
    "setup, message",
    [
        ("empty", "no images in"),
        ("uncaptioned", "have no caption"),
        ("unreadable", "could be decoded"),
        ("missing", "does not exist"),
        ("badjson", "not valid JSON"),
    ],
)
def test_scan_errors(tmp_path, setup, message):
    data = tmp_path / "data"
    if setup != "missing":
        data.mkdir()
    if setup == "uncaptioned":
        _image(data / "a.png")
        _image(data / "b.png")
        (data / "a.txt").write_text("a caption")
    if setup == "unreadable":
        (data / "a.png").write_bytes(b"not an image")
        (data / "a.txt").write_text("a caption")
    if setup == "badjson":
        _image(data / "a.png")
        (data / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{oops\n')
    with pytest.raises(DatasetError, match=message):
        scan_dataset(data)


def test_config_validation():
    for bad in (dict(rank=0), dict(alpha=-1.0), dict(steps=5, epochs=1.0), dict(lr=0.0), dict(lr_scheduler="wobbly"),
                dict(validation_split=1.0), dict(batch_size=0), dict(target="to q"), dict(caption_dropout=1.0),
                dict(caption_dropout=-0.1)):
        with pytest.raises(InvalidConfig):
            FineTuneConfig(**bad).validate()
    assert FineTuneConfig(target="attn-ff").target_modules()[-1] == "ff.net.2"
    assert FineTuneConfig(target="to_q, to_v").target_modules() == ["to_q", "to_v"]


# --- bad input through the CLI: one line, exit code, nothing written ----------------------------


@pytest.mark.parametrize(
    "case, code, message",
    [
        ("empty", 1, "no images in"),
        ("unreadable", 1, "could be decoded"),
        ("uncaptioned", 1, "have no caption"),
        ("unknown-base", 1, "does not exist"),
        ("rank0", 2, "rank 0"),
        ("no-checkpoint", 1, "no checkpoint to resume"),
        ("duplicate", 1, "already exists"),
        ("fp16-cpu", 2, "fp16"),
        ("bad-target", 2, "--target"),
    ],
)
def test_bad_input_is_one_line_error_and_catalog_unchanged(tmp_path, catalog, small, lora_files, case, code, message):
    data = tmp_path / "data"
    data.mkdir()
    args = ["fine-tune", data, "--name", "newbie", "--catalog", catalog, "--steps", "2", "--resolution", "32"]
    if case == "empty":
        pass
    elif case == "unreadable":
        (data / "a.png").write_bytes(b"garbage")
        (data / "a.txt").write_text("a red square")
    elif case == "uncaptioned":
        _image(data / "a.png")
    else:
        args[1] = small
    if case == "unknown-base":
        args += ["--base", tmp_path / "nope", "--no-register"]
    if case == "rank0":
        args += ["--rank", "0"]
    if case == "no-checkpoint":
        args += ["--resume", "latest"]
    if case == "duplicate":
        assert run("add-expert", lora_files[("sd1", "diffusers")], "--catalog", catalog, "--name", "newbie").exit_code == 0
    if case == "fp16-cpu":
        args += ["--mixed-precision", "fp16", "--device", "cpu"]
    if case == "bad-target":
        args += ["--target", "no_such_layer"]
    before = catalog.read_bytes()
    result = run(*args)
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert catalog.read_bytes() == before
    assert not (catalog.parent / "experts" / "newbie.safetensors").exists()


# --- learning -------------------------------------------------------------------------------------


PALETTE = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (245, 205, 40),
           "purple": (140, 60, 180), "orange": (240, 140, 40), "white": (240, 240, 240), "black": (20, 20, 20)}


def write_squares(folder: Path, n: int, seed: int) -> Path:
    """One visual domain: 64x64 squares of one flat colour (a little jitter), captioned with the colour."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        name = list(PALETTE)[rng.integers(len(PALETTE))]
        rgb = np.clip(np.array(PALETTE[name]) + rng.normal(0, 6, 3), 0, 255).astype(np.uint8)
        Image.fromarray(np.broadcast_to(rgb, (64, 64, 3)).copy()).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(f"a flat {name} square")
    return folder


@pytest.fixture(scope="module")
def calibrated_sd(tmp_path_factory, tiny_sd) -> Path:
    """tiny_sd with the VAE's scaling_factor set to 1/std of its latents, as Stable Diffusion chose its
    0.18215 (Rombach et al. 2022, appendix G). The fixture keeps SD's constant, which makes the random
    VAE's latents ~0.05 in std: noise then drowns every image and no domain can be learned."""
    import torch
    from diffusers import AutoencoderKL

    from mixdiff_cli.training.dataset import load_image, to_tensor

    folder = tmp_path_factory.mktemp("calibrated") / "sd"
    shutil.copytree(tiny_sd, folder)
    samples = write_squares(tmp_path_factory.mktemp("calib-data"), 16, seed=99)
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    with torch.no_grad():
        z = vae.encode(to_tensor([load_image(p, 32) for p in sorted(samples.glob("*.png"))])).latent_dist.mean
    config = json.loads((folder / "vae" / "config.json").read_text())
    config["scaling_factor"] = round(1.0 / float(z.std()), 3)
    (folder / "vae" / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def test_lora_learns_its_domain_and_not_an_unrelated_one(tmp_path, calibrated_sd):
    """A few hundred CPU steps on flat coloured squares: the held-out loss drops well below the bare
    base's on squares, and by clearly less on an unrelated domain (stripes)."""
    from mixdiff_cli.demo.data import write_dataset

    squares = write_squares(tmp_path / "squares", 64, seed=0)
    catalog = tmp_path / "cat" / "experts.yaml"
    init_catalog(catalog, base=str(calibrated_sd))
    result = run("fine-tune", squares, "--name", "squares", "--catalog", catalog, "--steps", "300", "--rank", "4",
                 "--lr", "1e-2", "--batch-size", "4", "--resolution", "32", "--seed", "0", "--checkpoint-every", "100")
    assert result.exit_code == 0, result.output
    lora = catalog.parent / "experts" / "squares.safetensors"
    assert result.stdout.strip() == str(lora)
    assert "held-out loss: base" in result.stderr and "step 300/300" in result.stderr  # the progress report
    told = "".join(result.stderr.split())  # rich wraps long lines, inside a long path too
    assert "".join(f"training on 58 image(s) of {squares}, 6 held out".split()) in told  # issue 20: it never said how many
    assert load_catalog(catalog).names == ["squares"]

    on_squares = denoising_loss(calibrated_sd, write_squares(tmp_path / "squares-heldout", 32, seed=9), lora, resolution=32)
    on_stripes = denoising_loss(calibrated_sd, write_dataset("stripes", tmp_path / "stripes", 32, seed=9), lora, resolution=32)
    print(f"squares: {on_squares}, stripes: {on_stripes}")
    assert on_squares.improvement > 0.35  # measured 0.49: 1.118 -> 0.568
    assert on_stripes.improvement < on_squares.improvement - 0.025  # measured 0.44
    assert on_stripes.lora > on_squares.lora * 1.05

# --- caption dropout --------------------------------------------------------------------------------


@pytest.mark.parametrize("train_text_encoder", [False, True], ids=["cached-embeddings", "text-encoder-trains"])
def test_dropped_captions_never_reach_the_model(tmp_path, tiny_sd, train_text_encoder):
    """Same images, different captions: with every caption dropped the LoRAs are identical; without, not."""

    def train(word: str, p: float) -> dict:
        folder = tmp_path / f"{word}-{p}"
        folder.mkdir()
        for i in range(4):
            _image(folder / f"{i}.png", colour=(60 * i, 30, 200 - 40 * i))
            (folder / f"{i}.txt").write_text(f"a {word} square number {i}")
        cfg = FineTuneConfig(**FAST, steps=2, caption_dropout=p, train_text_encoder=train_text_encoder, validation_split=0)
        out = fine_tune(FineTuneJob(None, folder, "x", cfg, base=tiny_sd, register=False, output=folder / "x.safetensors", output_dir=folder / "run"))
        return tensors(out.lora_path)

    # p = 0.999: each of the 4 captions drawn survives with probability 0.001 (seeded: the same draws in both runs)
    assert max_diff(train("red", 0.999), train("blue", 0.999)) == 0.0
    assert max_diff(train("red", 0.0), train("blue", 0.0)) > 1e-6


# --- exact resume -----------------------------------------------------------------------------------


RESUME = dict(FAST, steps=8, checkpoint_every=3, keep=2, grad_accum=2, random_flip=True, lr_scheduler="cosine", warmup=2, noise_offset=0.05,
              caption_dropout=0.3)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_sd, small) -> Path:
    """The reference: the RESUME run without interruption."""
    folder = tmp_path_factory.mktemp("ref")
    result = fine_tune(FineTuneJob(None, small, "ref", FineTuneConfig(**RESUME), base=tiny_sd, register=False,
                                   output=folder / "ref.safetensors", output_dir=folder / "run"))
    assert result.finished and len(result.history) == 3  # steps 3, 6, 8
    return result.lora_path


def test_stopped_run_resumes_to_the_same_weights(tmp_path, tiny_sd, small, uninterrupted):
    kw = dict(base=tiny_sd, register=False, output=tmp_path / "x.safetensors", output_dir=tmp_path / "run")
    first = fine_tune(FineTuneJob(None, small, "x", FineTuneConfig(**RESUME), stop_after=4, **kw))
    assert not first.finished and first.lora_path is None and first.step == 4
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-000003", "checkpoint-000004"]
    # a checkpoint is safetensors + JSON only: nothing a loader would unpickle
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoint-000004").iterdir()) == ["lora.safetensors", "optimizer.safetensors", "state.json"]
    with pytest.raises(CheckpointError, match="earlier run"):
        fine_tune(FineTuneJob(None, small, "x", FineTuneConfig(**RESUME), **kw))
    with pytest.raises(CheckpointError, match="different run"):
        fine_tune(FineTuneJob(None, small, "x", FineTuneConfig(**{**RESUME, "lr": 2e-3}), resume="latest", **kw))
    events = []
    second = fine_tune(FineTuneJob(None, small, "x", FineTuneConfig(**RESUME), resume="latest", **kw), on_event=events.append)
    assert second.finished and second.step == 8
    assert type(events[0]).__name__ == "Note" and "step 4/8" in events[0].text
    assert [e.step for e in events if type(e).__name__ == "StepEvent"] == [5, 6, 7, 8]
    assert max_diff(tensors(second.lora_path), tensors(uninterrupted)) < 1e-6
    assert len(list((tmp_path / "run").glob("checkpoint-*"))) == 2  # --keep 2


# `mixdiff fine-tune ...` that SIGKILLs itself as soon as checkpoint-000003 is on disk
KILLED_AFTER_CHECKPOINT_3 = """
import os, signal, sys
import mixdiff_cli.training.trainer as trainer
save_state = trainer.save_state


def save_then_die(*args, **kwargs):
    path = save_state(*args, **kwargs)
    if path.name == "checkpoint-000003":
        os.kill(os.getpid(), signal.SIGKILL)
    return path


trainer.save_state = save_then_die
from mixdiff_cli.cli import main
sys.argv = ["mixdiff", *sys.argv[1:]]
main()
"""


def test_killed_cli_run_resumes_to_the_same_weights(tmp_path, tiny_sd, small, uninterrupted):
    """A real SIGKILL right after the first checkpoint is written (the run signals itself there: the kill
    lands at the same point on any machine), then `--resume latest`."""
    args = ["fine-tune", str(small), "--name", "k", "--base", str(tiny_sd), "--no-register", "--output", str(tmp_path / "k.safetensors"),
            "--output-dir", str(tmp_path / "run"), "--rank", "4", "--resolution", "32", "--batch-size", "2", "--seed", "3",
            "--lr", "1e-3", "--steps", "8", "--checkpoint-every", "3", "--keep", "2", "--grad-accum", "2", "--random-flip",
            "--lr-scheduler", "cosine", "--warmup", "2", "--noise-offset", "0.05", "--caption-dropout", "0.3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killer = tmp_path / "killed_at_3.py"
    killer.write_text(KILLED_AFTER_CHECKPOINT_3)
    proc = subprocess.Popen([sys.executable, str(killer), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc.wait(timeout=300)
    first = tmp_path / "run" / "checkpoint-000003"
    assert proc.returncode == -signal.SIGKILL and first.exists() and not (tmp_path / "k.safetensors").exists()
    assert not (tmp_path / "run" / "checkpoint-000006").exists()  # killed at step 3, not later
    result = run(*args, "--resume", "latest")
    assert result.exit_code == 0, result.output
    assert max_diff(tensors(tmp_path / "k.safetensors"), tensors(uninterrupted)) < 1e-6


# --- the LoRA file --------------------------------------------------------------------------------


def test_lora_is_registered_and_loads_in_plain_diffusers(tmp_path, catalog, small, tiny_sd):
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from mixdiff_cli.training.export import base_hash
    from mixdiff_cli.training.plan import _split

    result = run("fine-tune", small, "--name", "sq", "--catalog", catalog, "--steps", "6", "--rank", "4", "--alpha", "8",
                 "--resolution", "32", "--batch-size", "2", "--seed", "1", "--lr", "1e-2", "--trigger", "zqx", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    path = Path(data["lora_path"])
    assert path == catalog.parent / "experts" / "sq.safetensors" and data["registered"] and data["finished"]
    assert data["lora_loss"] < data["base_loss"]

    with safe_open(str(path), "pt") as fh:
        meta, keys = fh.metadata(), list(fh.keys())
    ds = scan_dataset(small)
    assert meta["modelspec.title"] == "sq" and meta["modelspec.trigger_phrase"] == "zqx"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.date"][:4].isdigit()
    assert (meta["mixdiff.rank"], meta["mixdiff.alpha"], meta["mixdiff.steps"], meta["mixdiff.learning_rate"]) == ("4", "8.0", "6", "0.01")
    assert meta["mixdiff.base_sha256"] == base_hash(tiny_sd) and meta["mixdiff.arch"] == "sd1"
    assert meta["mixdiff.dataset_sha256"] == ds.hash() and json.loads(meta["mixdiff.trigger"]) == ["zqx"]
    assert keys and all(k.startswith("unet.") for k in keys)

    exp = load_catalog(catalog).expert("sq")
    assert (exp.kind, exp.format, exp.rank, exp.alpha, exp.trigger) == ("lora", "diffusers", 4, 8.0, ["zqx"])
    assert exp.sha256 == sha(path) and exp.prompts and set(exp.prompts) <= {r.caption for r in ds.records}

    # plain diffusers: the file changes the output, with scale alpha/rank = 2
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def image():
        gen = torch.Generator().manual_seed(0)
        return pipe("zqx, a red square", num_inference_steps=4, generator=gen, output_type="np").images[0]

    before = image()
    pipe.load_lora_weights(str(path))
    after = image()
    assert abs(after - before).mean() > 1e-3
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.scaling["default_0"] == pytest.approx(2.0)

    # and reproduces the held-out loss measured during training
    _, val = _split(ds, 0.1)
    held = tmp_path / "held"
    held.mkdir()
    for rec in val:
        shutil.copy(rec.path, held / rec.path.name)
        (held / rec.path.with_suffix(".txt").name).write_text(rec.caption)
    report = denoising_loss(tiny_sd, held, path, resolution=32, trigger=["zqx"])
    assert report.base == pytest.approx(data["base_loss"], abs=1e-4)
    assert report.lora == pytest.approx(data["lora_loss"], abs=1e-4)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_text_encoder_lora_random_crops_and_samples(tmp_path, tiny_sd, tiny_sdxl, arch):
    """Odd image sizes, random crops and flips, min-SNR, the text encoder(s) trained, sample images."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open

    from mixdiff_cli.demo.data import generate

    base = tiny_sd if arch == "sd1" else tiny_sdxl
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i, s in enumerate(generate("stripes", 6, seed=4)):
        name = f"img{i}.png"
        s.image.resize((48 + 16 * (i % 3), 64 - 8 * (i % 2))).save(data / name)
        rows.append(json.dumps({"file_name": name, "text": s.caption}))
    (data / "metadata.jsonl").write_text("\n".join(rows))
    cfg = FineTuneConfig(**{**FAST, "lr": 1e-2}, steps=3, crop="random", random_flip=True, snr_gamma=5.0, train_text_encoder=True,
                         validation_prompts=["red stripes"], validation_inference_steps=2, validation_split=0.34)
    events = []
    result = fine_tune(FineTuneJob(None, data, "st", cfg, base=base, register=False, output=tmp_path / "st.safetensors",
                                   output_dir=tmp_path / "run"), on_event=events.append)
    assert result.finished and (result.n_train, result.n_val) == (4, 2)
    shots = [e.samples for e in events if type(e).__name__ == "CheckpointEvent"][-1]
    assert [p.name for p in shots] == ["step-000003-0.png"] and shots[0].is_file()
    with safe_open(str(result.lora_path), "pt") as fh:
        prefixes = {k.split(".")[0] for k in fh.keys()}
    assert prefixes == ({"unet", "text_encoder"} if arch == "sd1" else {"unet", "text_encoder", "text_encoder_2"})

    cls = StableDiffusionPipeline if arch == "sd1" else StableDiffusionXLPipeline
    extra = {"safety_checker": None, "requires_safety_checker": False} if arch == "sd1" else {}
    pipe = cls.from_pretrained(base, **extra)
    pipe.set_progress_bar_config(disable=True)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    before = pipe("red stripes", num_inference_steps=3, generator=gen(), output_type="np").images[0]
    pipe.load_lora_weights(str(result.lora_path))
    after = pipe("red stripes", num_inference_steps=3, generator=gen(), output_type="np").images[0]
    assert abs(after - before).mean() > 1e-3


# --- data parallel ----------------------------------------------------------------------------------


def test_two_processes_train_one_lora_like_one_process_with_twice_the_batch(tmp_path, catalog, small, tiny_sd):
    common = ["--rank", "4", "--resolution", "32", "--seed", "5", "--lr", "1e-3", "--steps", "4", "--validation-split", "0.2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "mixdiff_cli", "fine-tune", str(small),
           "--name", "dp", "--catalog", str(catalog), "--batch-size", "1", "--json", *common]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)  # one JSON document: only the main process prints
    assert data["registered"] and load_catalog(catalog).names == ["dp"]
    assert sorted(p.name for p in (catalog.parent / "experts").iterdir()) == ["dp.safetensors"]

    single = fine_tune(FineTuneJob(None, small, "one", FineTuneConfig(rank=4, resolution=32, seed=5, lr=1e-3, steps=4, validation_split=0.2, batch_size=2),
                                   base=tiny_sd, register=False, output=tmp_path / "one.safetensors", output_dir=tmp_path / "run1"))
    assert max_diff(tensors(catalog.parent / "experts" / "dp.safetensors"), tensors(single.lora_path)) < 1e-5
    assert data["lora_loss"] == pytest.approx(single.lora_loss, abs=1e-5)


def test_bf16_gradient_checkpointing_and_epochs(tmp_path, tiny_sd, small):
    """bf16 autocast on CPU (a fresh accelerate state after float32 runs), checkpointed gradients, --epochs."""
    from safetensors import safe_open

    cfg = FineTuneConfig(**{**FAST, "lr": 1e-2}, epochs=0.5, mixed_precision="bf16", gradient_checkpointing=True, validation_split=0.2)
    result = fine_tune(FineTuneJob(None, small, "bf", cfg, base=tiny_sd, register=False, output=tmp_path / "bf.safetensors", output_dir=tmp_path / "run"))
    assert (result.n_train, result.total_steps) == (10, 3)  # ceil(0.5 * 10 images / batch 2)
    assert result.finished and 0 < result.train_loss < 10 and result.lora_loss < result.base_loss
    with safe_open(str(result.lora_path), "pt") as fh:
        assert {str(fh.get_tensor(k).dtype) for k in fh.keys()} == {"torch.float32"}
