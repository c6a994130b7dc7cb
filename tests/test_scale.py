"""Real scale, at reduced size: the SD 1.5 layout of benchmarks/bench_scale.py (public configs, channels and
depth cut ~10x, random float16 weights on disk, LoRAs on every transformer layer) through the CLI and the
engine: top-1 equals plain diffusers, a fused top-1 restores the base bit for bit, --max-memory keeps the
loaded experts under the budget (bytes counted on the model), bfloat16 runs end to end on CPU; and
benchmarks/gpu.sh --dry runs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mixdiff_cli.cli import app

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a photo of a red cat"
runner = CliRunner()


def mixdiff(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def bench():
    """benchmarks/bench_scale.py as a module."""
    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "benchmarks" / "bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scale")


@pytest.fixture(scope="module")
def sd15(bench, cache):
    """The reduced SD 1.5 kit: base, LoRAs a, b (rank 4: kohya, diffusers), c, d (rank 16), a model expert m."""
    return bench.kit("sd15", reduced=True, counts=(), cache=cache)


def lora_bytes(engine) -> int:
    """Bytes of every LoRA tensor in the engine's UNet and text encoder, counted on the model itself."""
    models = [engine.denoiser, engine.pipe.text_encoder]
    return sum(p.numel() * p.element_size() for m in models for n, p in m.named_parameters() if ".lora_" in n)


def test_reduced_kit_keeps_the_sd15_layout(bench, sd15):
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sd15.base / "unet", local_files_only=True)
    full = bench.geometry("sd15")["unet"]
    for key in ("down_block_types", "up_block_types", "layers_per_block", "attention_head_dim"):
        assert list(np.atleast_1d(unet.config[key])) == list(np.atleast_1d(full[key])), key
    assert list(unet.config.block_out_channels) == [32, 64, 128, 128]  # SD 1.5: 320, 640, 1280, 1280
    with open(sd15.base / "unet" / "diffusion_pytorch_model.safetensors", "rb") as fh:  # float16 on disk, like published files
        assert b'"dtype":"F16"' in fh.read(20000)
    assert all(torch.isfinite(p).all() for p in unet.parameters())


def test_top1_equals_plain_diffusers_at_real_geometry(sd15, tmp_path):
    import torch

    from mixdiff_cli.models.pipeline import load_pipeline

    out = tmp_path / "out"
    res = mixdiff("generate", PROMPT, "--catalog", sd15.speed, "--expert", "a", "--steps", 3, "--seed", 5,
                  "--width", 64, "--height", 64, "--out", out)
    assert res.exit_code == 0, res.output
    plain = load_pipeline(sd15.base, torch.float32)
    plain.load_lora_weights(str(sd15.loras["a"]), adapter_name="a")
    ref = plain(PROMPT, num_inference_steps=3, width=64, height=64, generator=torch.Generator().manual_seed(5)).images[0]
    mine = pixels(next(out.glob("*.png")))
    theirs = np.asarray(ref.convert("RGB"), dtype=np.int16)
    assert mine.std() > 2  # an image, not a flat field
    assert np.abs(mine - theirs).max() <= 1  # <= 1/255


def test_fused_top1_matches_unfused_and_restores_the_base_bit_for_bit(sd15):
    import torch

    from mixdiff_cli.sampling.engine import Engine, Request

    engine = Engine(sd15.speed, device="cpu")
    request = [Request(PROMPT, seed=5, steps=3, width=64, height=64)]
    engine.ensure_loaded(["c"])
    base = {n: p.detach().clone() for n, p in engine.denoiser.named_parameters() if ".lora_" not in n}
    images = {}
    for mode in ("never", "always", "again"):
        engine.fuse = "always" if mode == "always" else "never"
        images[mode] = engine.generate(request, ["c"], output_type="np")[0]
    diff = float(np.abs(images["never"] - images["always"]).max())
    assert 0 < diff <= 1 / 255  # fused: other float sums, the same image
    assert np.array_equal(images["never"], images["again"])  # the base came back exactly
    assert all(torch.equal(p, base[n]) for n, p in engine.denoiser.named_parameters() if ".lora_" not in n)
    engine.fuse = "auto"  # small layers on CPU: fusing pays (bench_scale measures where it does not)
    layers = [m for m in engine.denoiser.modules() if hasattr(m, "lora_A") and "c" in m.lora_A]
    assert engine._fuse_pays(layers)


def test_a_fused_route_stays_fused_between_runs_and_anything_else_gets_the_base_back(sd15, monkeypatch):
    import torch

    from mixdiff_cli.sampling import fusion as fusion
    from mixdiff_cli.sampling.engine import Active, Engine, Request

    calls = []
    plus_delta = fusion._plus_delta
    monkeypatch.setattr(fusion, "_plus_delta", lambda *a, **k: calls.append(1) or plus_delta(*a, **k))
    engine = Engine(sd15.speed, device="cpu")
    engine.fuse = "always"
    request = [Request(PROMPT, seed=5, steps=2, width=64, height=64)]
    engine.ensure_loaded(["a", "c"])
    base = {n: p.detach().clone() for n, p in engine.denoiser.named_parameters() if ".lora_" not in n}

    def base_back() -> bool:
        return not engine.fused and all(torch.equal(p, base[n]) for n, p in engine.denoiser.named_parameters() if ".lora_" not in n)

    first = engine.generate(request, ["c"], output_type="np")[0]
    fuses = len(calls)
    assert fuses > 0 and engine.fused == (engine._loaded["c"].adapter,)
    buffers = {id(b) for b in engine._fuse_buffers.values()}
    assert len(buffers) == fuses  # one per fused layer, written into by every later fuse
    again = engine.generate(request, ["c"], output_type="np")[0]
    assert len(calls) == fuses and np.array_equal(first, again)  # the next image of the route: no second fuse

    engine.generate(request, [("a", 0.5), ("c", 0.5)], blend="noise", output_type="np")  # another route
    assert base_back()
    engine.generate(request, ["c"], output_type="np")
    engine.plan([Active(engine.catalog.expert("c"), 1.0)], "noise")  # what canvas and evaluation call
    assert base_back()
    engine.generate(request, ["c"], output_type="np")
    engine.evict("a")  # an adapter deleted
    assert base_back()
    engine.generate(request, ["c"], output_type="np")
    engine.fuse = "never"
    unfused = engine.generate(request, ["c"], output_type="np")[0]
    assert base_back() and 0 < np.abs(unfused - first).max() <= 1 / 255
    assert len(calls) == 4 * fuses
    assert {id(b) for b in engine._fuse_buffers.values()} == buffers  # no fuse allocated anew
    engine.unfuse(release=True)
    assert not engine._fuse_buffers


def test_auto_fuses_on_cpu_where_the_runs_lora_cost_passes_the_fuse(sd15, monkeypatch):
    from mixdiff_cli.sampling import fusion as fusion
    from mixdiff_cli.sampling.engine import Engine, Request

    engine = Engine(sd15.speed, device="cpu")
    engine.ensure_loaded(["c"])
    adapter = engine._loaded["c"].adapter
    layers = [m for m in engine.denoiser.modules() if hasattr(m, "lora_A") and adapter in m.lora_A]
    assert engine._fuse_pays(layers, [adapter], 1)  # small layers: always
    monkeypatch.setattr(fusion, "_CPU_FUSE_MAX_PER_LAYER", 0)  # judge these layers by cost alone
    weights = sum(m.get_base_layer().weight.numel() for m in layers)
    lora = sum(m.lora_A[adapter].weight.numel() + m.lora_B[adapter].weight.numel() for m in layers)
    even = weights * fusion._CPU_FUSE_S_PER_WEIGHT / (lora * fusion._CPU_LORA_S_PER_PARAM_TOKEN)
    assert not engine._fuse_pays(layers, [adapter], int(0.9 * even)) and engine._fuse_pays(layers, [adapter], int(1.1 * even) + 1)
    assert not engine._fuse_pays(layers, [adapter], None)
    seen = []  # generate passes the run's tokens: images x 2 (CFG) x steps x latent pixels
    monkeypatch.setattr(Engine, "_fuse_pays", lambda self, layers, adapters=(), tokens=None: seen.append(tokens) or False)
    engine.generate([Request(PROMPT, seed=1, steps=3, width=64, height=128)], ["c"], output_type="np")
    scale = engine.pipe.vae_scale_factor
    assert seen == [2 * 3 * (64 // scale) * (128 // scale)] and not engine.fused


def test_plain_diffusers_on_the_engines_own_unet_stays_plain(bench, sd15):
    """bench_scale's SharedPlain (SDXL float32 in 24 GB: one UNet for both): plain images are not touched by the
    engine's fused weights, nor the engine's by plain's adapter."""
    from mixdiff_cli.sampling.engine import Engine

    engine = Engine(sd15.speed, device="cpu")
    s = bench.Settings(reduced=True, steps=2, reps=1, share=True)
    plain = bench.SharedPlain(engine, sd15.loras["a"])
    engine.fuse = "always"

    def mine():
        return engine.generate(bench._request(s, "sd15", seed=3), [("a", 1.0)], output_type="np")[0]

    theirs, ours = bench._plain_image(plain, s, "sd15", seed=3), mine()
    assert engine.fused  # and left fused when plain runs next
    assert 0 < np.abs(ours - theirs).max() <= 1 / 255
    assert np.array_equal(bench._plain_image(plain, s, "sd15", seed=3), theirs) and not engine.fused
    assert np.array_equal(mine(), ours)  # plain's adapter, set in between, is not the engine's
    plain.disable_lora()
    assert np.array_equal(mine(), ours)  # nor its LoRA layers switched off
    plain.set_adapters(["plain_a"])
    assert np.array_equal(mine(), ours)


def test_max_memory_keeps_the_loaded_experts_under_the_budget(sd15, tmp_path, monkeypatch):
    from mixdiff_cli.sampling.engine import Engine

    seen = []  # after each load: (budget, LoRA bytes on the model, the engine's count, evictions so far)
    ensure_loaded = Engine.ensure_loaded

    def spy(self, names):
        ensure_loaded(self, names)
        seen.append((self.max_memory, lora_bytes(self), self.resident_bytes, len(self.evictions)))

    monkeypatch.setattr(Engine, "ensure_loaded", spy)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"{PROMPT} {i} --expert {name} --steps 1 --w 64 --h 64\n" for i, name in enumerate("acbdab")))
    res = mixdiff("generate", "--prompts", prompts, "--catalog", sd15.speed, "--max-memory", "3MiB", "--max-loaded", 8,
                  "--seed", 1, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    budget = 3 * 2**20
    assert len(seen) >= 4 and all(limit == budget for limit, *_ in seen)
    on_model = [b for _, b, _, _ in seen]
    assert max(on_model) <= budget  # the bytes really resident, after every load
    assert max(on_model) > 2 * 2**20  # the rank-16 expert (2.5 MiB in float32) was among them
    assert all(b == counted for _, b, counted, _ in seen)  # the engine counts what the model holds
    assert seen[-1][-1] >= 2  # experts were unloaded to stay under it (--max-loaded 8 never binds)


def test_max_memory_is_a_promise_a_route_over_it_is_refused(sd15, tmp_path):
    """Issue 20: `--max-memory 1MB` with a larger expert generated anyway ("the caps bend to the route")."""
    from mixdiff_cli.core.errors import OverMemory
    from mixdiff_cli.sampling.engine import Engine

    common = ("--catalog", sd15.speed, "--steps", 1, "-W", 64, "-H", 64, "--seed", 1, "--max-memory", "1MiB")
    res = mixdiff("generate", PROMPT, "--expert", "c", *common, "--out", tmp_path / "c")
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "take 2.5 MiB (c 2.5 MiB), more than --max-memory 1.0 MiB" in lines[0], res.stderr
    assert not list((tmp_path / "c").glob("*.png"))
    res = mixdiff("generate", PROMPT, "--expert", "c", *common, "--allow-over-memory", "--out", tmp_path / "c")
    assert res.exit_code == 0 and len(list((tmp_path / "c").glob("*.png"))) == 1, res.output

    engine = Engine(sd15.speed, max_memory=2**20)
    engine.ensure_loaded(["a"])
    with pytest.raises(OverMemory, match=r"\(b 0.6 MiB, a 0.6 MiB\)|\(a 0.6 MiB, b 0.6 MiB\)"):
        engine.ensure_loaded(["a", "b"])  # each fits, the two together do not: nothing to evict
    assert engine.resident_bytes <= 2**20 and engine.loaded == ["a"]  # the budget held through the refusal


@pytest.mark.parametrize(("value", "message"), [("6XB", "'6XB' is not a memory size"), ("0", "'0' is not a memory size")])
def test_bad_max_memory_is_a_usage_error(sd15, tmp_path, value, message):
    res = mixdiff("generate", PROMPT, "--catalog", sd15.speed, "--max-memory", value, "--out", tmp_path / "out")
    assert res.exit_code == 2, res.output
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_max_memory_sizes():
    from mixdiff_cli.sampling.options import parse_size

    assert parse_size("6GB") == 6 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5 gib") == 3 * 2**29
    assert parse_size("4096") == 4096


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_bf16_runs_end_to_end_on_cpu(bench, cache, arch, tmp_path):
    from mixdiff_cli.sampling.pngmeta import read_record

    kit = bench.kit(arch, reduced=True, counts=(), cache=cache)
    images = {}
    for dtype in ("float32", "bf16"):
        out = tmp_path / dtype
        res = mixdiff("generate", PROMPT, "--catalog", kit.speed, "--expert", "a", "--steps", 3, "--seed", 5,
                      "--width", 64, "--height", 64, "--dtype", dtype, "--out", out)
        assert res.exit_code == 0, res.output
        png = next(out.glob("*.png"))
        images[dtype] = pixels(png)
    assert read_record(png)["dtype"] == "bfloat16"
    assert images["bf16"].std() > 2
    assert np.abs(images["bf16"] - images["float32"]).mean() < 8  # bfloat16 rounding, the same picture


def test_gpu_sh_dry_runs_the_real_scale_benchmark(bench, tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "gpu"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry"], env=env, capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu" / "gpu.json").read_text())
    assert set(results) == {"sd15", "sdxl"}
    for arch, r in results.items():
        assert r["skipped"] == [] and r["reduced"] is True, arch
        # a ratio is its parts' quotient (the MiB are rounded to 0.1): machine-independent, unlike the ratio itself
        assert abs(r["rss_4_over_1"] - r["rss_4_mib"] / r["rss_1_mib"]) < 0.01, arch
        assert r["top1_unfused_max_diff"] <= 1 / 255 and r["top1_fused_max_diff"] <= 1 / 255
        assert r["under_budget"] is True and r["budget_evictions"] > 0
        missing = [key for key in ("top1_over_plain", "noise2_over_top1", "merge2_over_top1", "noise2_over_batch_limit", "load_c_s",
                                   "switch_lru_s", "hotswap_switch_s", "model_load_disk_s", "fuse_s", "top1_fused_first_over_plain")
                   if key not in r]
        assert not missing, (arch, missing)  # every section measured what README's table shows
    table = (tmp_path / "gpu" / "gpu.md").read_text()
    assert table.startswith("| figure | SD 1.5 (cpu, float32, 64 px, 2 steps) | SDXL (cpu, float32, 64 px, 2 steps) | target |")
    for label, key, target in bench.ROWS:  # each row holds the JSON's figures, in the architectures' order
        cells = [bench._cell(results[a], key) for a in ("sd15", "sdxl")]
        if any(c != "-" for c in cells):
            assert f"| {label} | {cells[0]} | {cells[1]} | {target} |" in table, label
    assert "| peak RSS, 32 experts / 1 |" not in table and "| fused top-1 / plain diffusers, a route's later images (the fusion stays between images) |" in table
