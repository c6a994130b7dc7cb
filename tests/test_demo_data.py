"""The demo's procedural data, its checkers and wording, and the quick build of its base."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mixdiff_cli.demo import data, measure

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("domain", data.DOMAINS)
def test_generate_is_deterministic_in_seed(domain):
    a, b, c = data.generate(domain, 6, seed=3), data.generate(domain, 6, seed=3), data.generate(domain, 6, seed=4)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert [s.attrs for s in a] == [s.attrs for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert any(not np.array_equal(np.asarray(x.image), np.asarray(z.image)) for x, z in zip(a, c))
    assert all(s.image.size == (64, 64) and s.image.mode == "RGB" for s in a)


@pytest.mark.parametrize("domain", data.DOMAINS)
def test_checkers_agree_with_the_generator(domain):
    samples = data.generate(domain, 200, seed=7)
    acc = measure.accuracy(domain, [s.image for s in samples], [s.attrs for s in samples])
    assert set(acc) == set(data.ATTRIBUTES[domain]) | {"all"}
    assert acc["all"] == 1.0, acc
    # Every attribute value occurs, so the 100% is over the whole range, not one corner of it.
    seen = {v for s in samples for v in s.attrs.values()}
    assert seen == {v for values in data.ATTRIBUTES[domain].values() for v in values}


@pytest.mark.parametrize("domain", data.DOMAINS)
def test_checkers_survive_blur_and_noise(domain):
    """Generated images are soft and noisy; the checkers must still read the attributes."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    samples = data.generate(domain, 100, seed=77)
    soft = []
    for s in samples:
        a = np.asarray(s.image.filter(ImageFilter.GaussianBlur(1.0))).astype(float) + rng.normal(0, 12, (64, 64, 3))
        soft.append(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)))
    acc = measure.accuracy(domain, soft, [s.attrs for s in samples])
    assert acc["all"] >= 0.97, acc


@pytest.mark.parametrize("domain", data.DOMAINS)
def test_checkers_reject_wrong_attributes(domain):
    samples = data.generate(domain, 60, seed=8)
    wrong = 0
    for i, s in enumerate(samples):
        attr = list(data.ATTRIBUTES[domain])[i % len(data.ATTRIBUTES[domain])]
        other = next(v for v in data.ATTRIBUTES[domain][attr] if v != s.attrs[attr])
        wrong += not measure.check(domain, s.image, {**s.attrs, attr: other})[attr]
    assert wrong == len(samples)


@pytest.mark.parametrize("domain", data.DOMAINS)
def test_domains_differ_by_measurement(domain):
    """A solid colour or another domain's image does not pass as this domain's ground truth."""
    own = data.generate(domain, 40, seed=9)
    for other in data.DOMAINS:
        if other == domain:
            continue
        images = [s.image for s in data.generate(other, 40, seed=9)]
        acc = measure.accuracy(domain, images, [s.attrs for s in own])
        assert acc["all"] < 0.5, (domain, other, acc)


def test_heldout_wording_is_never_used_in_training():
    for domain in data.DOMAINS:
        train, heldout = data.all_captions(domain, "train"), data.all_captions(domain, "heldout")
        assert len(train) >= 90 and len(heldout) >= 200
        assert not train & heldout
        assert {s.caption for s in data.generate(domain, 300, seed=1)} <= train
        assert not {s.caption for s in data.generate(domain, 300, seed=1, split="heldout")} & train
    prompts = data.labeled_prompts("heldout", n_per_domain=40, seed=0)
    assert len(prompts) == 40 * len(data.DOMAINS)
    assert {p["expert"] for p in prompts} == set(data.DOMAINS)
    assert len({p["prompt"] for p in prompts}) == len(prompts)
    every_train = set().union(*(data.all_captions(d, "train") for d in data.DOMAINS))
    assert not {p["prompt"] for p in prompts} & every_train


def test_rephrased_wording_is_new_sentences_over_training_words():
    words = lambda texts: {w for t in texts for w in t.replace(":", " ").split()}  # noqa: E731
    for domain in data.DOMAINS:
        train, rephrased = data.all_captions(domain, "train"), data.all_captions(domain, "rephrased")
        assert len(rephrased) >= 60 and not train & rephrased
        assert rephrased < data.all_captions(domain, "heldout")  # the held-out set minus its unseen synonyms
        unseen = words(data.all_captions(domain, "heldout")) - words(rephrased) - words(train)
        assert unseen and not unseen & words(rephrased)  # e.g. "crimson" only in "heldout"
        drawn = {s.caption for s in data.generate(domain, 100, seed=1, split="rephrased")}
        assert drawn <= rephrased


def test_tokenizer_has_one_token_per_word_and_captions_fit(tmp_path):
    from transformers import CLIPTokenizer

    data.write_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path), model_max_length=16)
    multi = [w for w in data.vocabulary() if len(tok(w, add_special_tokens=False).input_ids) != 1]
    assert multi == []
    assert len(data.vocabulary()) > 400  # captions plus general English
    longest = max(len(tok(c).input_ids) for d in data.DOMAINS for sp in ("train", "heldout") for c in data.all_captions(d, sp))
    assert longest <= 16


def test_write_dataset_uses_the_kohya_layout(tmp_path):
    folder = data.write_dataset("glyphs", tmp_path / "glyphs", 5, seed=2)
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:04d}.png" for i in range(5)]
    samples = data.generate("glyphs", 5, seed=2)
    assert [(folder / f"{i:04d}.txt").read_text().strip() for i in range(5)] == [s.caption for s in samples]
    rows = [json.loads(line) for line in (folder / "attrs.jsonl").read_text().splitlines()]
    assert [r["glyph"] for r in rows] == [s.attrs["glyph"] for s in samples]


def test_optimizer_state_round_trips_without_pickle(tmp_path):
    import torch

    from mixdiff_cli.demo import base

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    ck = base.save_checkpoint(tmp_path, 7, model.state_dict(), opt, {"note": "x"})
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1.0)
    weights, state = base.load_checkpoint(ck, opt2)
    assert state["step"] == 7 and state["note"] == "x"
    assert torch.equal(weights["weight"], model.weight)
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-2)
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.bin"))


@pytest.fixture(scope="module")
def quick_build(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    cmd = [sys.executable, str(REPO / "scripts" / "build_demo"), "--quick", "--workdir", str(work), "--stages", "1-3", "--threads", "1"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return work, first.stdout, again


def test_quick_build_gives_a_pipeline_that_diffusers_loads(quick_build):
    import torch
    from diffusers import StableDiffusionPipeline

    work, _, _ = quick_build
    pipe = StableDiffusionPipeline.from_pretrained(str(work / "base"))
    assert pipe.safety_checker is None
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on a white background", num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    sizes = sum(p.stat().st_size for p in (work / "base").rglob("*.safetensors"))
    assert sizes < 12e6  # fp16 UNet and VAE: well inside the 25 MB budget left for experts


def test_rerun_skips_finished_stages(quick_build):
    _, first, again = quick_build
    assert again.returncode == 0, again.stderr
    assert "stage 3 base: done in" in first
    for n, name in [(1, "data"), (2, "vae"), (3, "base")]:
        assert f"stage {n} {name}: done already" in again.stdout


def test_training_resumes_from_its_last_checkpoint(quick_build, tmp_path):
    import shutil

    from mixdiff_cli.demo import base

    work, _, _ = quick_build
    copy = tmp_path / "w"
    shutil.copytree(work, copy)
    lines: list[str] = []
    cfg = base.BaseConfig.quick()
    cfg.unet_steps = 6
    ck = base.train_unet(copy, cfg, lines.append)
    assert any("resuming at step 4" in line for line in lines), lines
    assert ck.name == "step-0000006"
    assert [p.name for p in sorted((copy / "ckpt" / "unet").glob("step-*"))] == ["step-0000004", "step-0000006"]


def test_snapshot_restores_a_build_on_a_fresh_workdir(quick_build, tmp_path):
    work, _, _ = quick_build
    script = [sys.executable, str(REPO / "scripts" / "build_demo"), "--quick", "--threads", "1"]
    snap = tmp_path / "snap"
    made = subprocess.run([*script, "--workdir", str(work), "--snapshot", str(snap)], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stdout + made.stderr
    assert not list(snap.rglob("optimizer.safetensors"))
    assert sum(p.stat().st_size for p in snap.rglob("*") if p.is_file()) < 0.5 * sum(
        p.stat().st_size for p in (work / "ckpt").rglob("*") if p.is_file()
    ) + 3e6
    fresh = tmp_path / "fresh"
    run = subprocess.run([*script, "--workdir", str(fresh), "--stages", "1-3", "--restore", str(snap)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "restored" in run.stdout and "resuming at step 4" in run.stdout
    assert "params" not in run.stdout.split("stage 2 vae: start")[1].split("stage 3")[0]  # VAE kept, not retrained
    assert (fresh / "tokenizer" / "vocab.json").read_bytes() == (work / "tokenizer" / "vocab.json").read_bytes()
    assert (fresh / "base" / "model_index.json").is_file()
