"""Real scale: SD 1.5 and SDXL geometry from their public configs with random weights, real-size LoRAs,
mixdiff side by side with plain diffusers in one run.

    python benchmarks/bench_scale.py                          # SD 1.5 and SDXL in float32, this CPU, 64x64 px
    python benchmarks/bench_scale.py --arch sd15 --json out.json --md table.md
    python benchmarks/bench_scale.py --device cuda --dtype fp16 --size 512 --compile   # what benchmarks/gpu.sh runs
    python benchmarks/bench_scale.py --reduced --quick        # the same code, channels and depth cut ~10x (tests, gpu.sh --dry)

Speed and memory do not depend on weight values, so random weights give true figures for memory, loading,
switching and per-step cost. Models and LoRAs are built once into $MIXDIFF_SCALE_CACHE (default
/tmp/mixdiff-scale), float16 on disk like published checkpoints, and load into the run's dtype.

Figures (targets, issue 15): peak RSS (CUDA: peak VRAM) with 1, 32 and 128 experts in the catalog (32/1 <=
1.05); expert load against load_lora_weights; route switch A -> B -> A (adapters resident, LRU reload,
hotswap); top-1 / plain diffusers (fused <= 1.0); noise k=2 / top-1 against the bare UNet's batch-doubling
cost (within 1.05x); merge / top-1; a model expert parked in memory against reloaded from disk; top-1 against
plain diffusers pixel by pixel (<= 1/255); `--max-memory` LRU (resident bytes <= budget). Times are the
fastest of interleaved repetitions (A B A B ...; `_times`).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one BLAS thread unless --threads says otherwise

CACHE = Path(os.environ.get("MIXDIFF_SCALE_CACHE", "/tmp/mixdiff-scale"))
PROMPT = "a photo of a red cat"
ATTN = ("to_q", "to_k", "to_v", "to_out.0")
TRANSFORMER = ATTN + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")  # kohya's default: every layer of Transformer2DModel
ARCHS = ("sd15", "sdxl")

# ------------------------------------------------------------------------------------------ geometry

# The VAE of SD 1.5 and SDXL (the UNet and text-encoder configs are mixdiff_cli.catalog.geometry.public_configs())
SD_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4,
          "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4, "sample_size": 512}


def geometry(arch: str, reduced: bool = False) -> dict[str, Any]:
    """UNet, VAE and text-encoder configs: the public SD 1.5 / SDXL ones, or (`reduced`) the same layout with
    channels and depth cut ~10x, for tests. `ranks`: the two LoRA ranks benchmarked."""
    from mixdiff_cli.catalog.geometry import public_configs

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    public, sdxl = public_configs()[arch][1], arch == "sdxl"
    unet = public["unet"]
    texts = [public[k] for k in ("text_encoder", "text_encoder_2") if k in public]
    vae = {**SD_VAE, "scaling_factor": 0.13025 if sdxl else 0.18215}
    if not reduced:
        return {"unet": unet, "vae": vae, "text": texts, "ranks": (32, 128)}
    unet = {**unet, "block_out_channels": (32, 64, 128, 128), "cross_attention_dim": 32}
    if sdxl:  # two text encoders of 32 -> cross attention 64; 6 time ids x 8 + pooled 32
        unet.update(block_out_channels=(32, 64, 128), transformer_layers_per_block=(1, 2, 2), attention_head_dim=(1, 2, 4),
                    cross_attention_dim=64, addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, "projection_dim": 32,
             "vocab_size": None}
    vae = {**vae, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1}
    return {"unet": unet, "vae": vae, "text": [{**t, **small} for t in texts], "ranks": (4, 16)}


def random_module(cls: type, config: dict[str, Any], dtype: Any, device: str = "cpu", seed: int = 0, gain: float = 0.5) -> Any:
    """`cls(**config)` with random weights made directly in `dtype` on `device` (parameters start on the meta
    device: no float32 copy); PyTorch's default init, linear and conv weights scaled by `gain` so that
    activations stay finite through a deep random UNet."""
    import torch

    with torch.device("meta"):
        model = cls.from_config(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.weight.mul_(gain)
    return model


def build_pipeline(folder: Path, arch: str, reduced: bool = False, device: str = "cpu") -> Path:
    """Write a diffusers pipeline folder of `arch` geometry with random float16 weights."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from mixdiff_cli.families.unet_tiny import scheduler as _scheduler, tokenizer as _tokenizer
    from mixdiff_cli.testing import VOCAB

    geo, sdxl, dtype = geometry(arch, reduced), arch == "sdxl", torch.float16
    toks = [_tokenizer(folder / "tokenizer", VOCAB)] + ([_tokenizer(folder / "tokenizer_2", VOCAB, pad="!")] if sdxl else [])
    encoders = []
    for i, (cfg, tok) in enumerate(zip(geo["text"], toks)):
        config = CLIPTextConfig(**{**cfg, "vocab_size": cfg["vocab_size"] or len(tok)}, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(2000 + 1000 * i)
        with torch.device(device):  # transformers' own init (std 0.02), then float16
            encoders.append((CLIPTextModelWithProjection if i else CLIPTextModel)(config).to(dtype))
    unet = random_module(UNet2DConditionModel, geo["unet"], dtype, device, seed=0)
    vae = random_module(AutoencoderKL, geo["vae"], dtype, device, seed=1000)
    parts = {"vae": vae, "text_encoder": encoders[0], "tokenizer": toks[0], "unet": unet, "scheduler": _scheduler()}
    if sdxl:
        pipe = StableDiffusionXLPipeline(text_encoder_2=encoders[1], tokenizer_2=toks[1], force_zeros_for_empty_prompt=True,
                                         add_watermarker=False, **parts)
    else:
        pipe = StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False, **parts)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_model_expert(folder: Path, base: Path, device: str = "cpu") -> Path:
    """A second UNet of the base's config with other random weights (float16), as a diffusers model folder."""
    import torch
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(base / "unet")
    random_module(UNet2DConditionModel, config, torch.float16, device, seed=7).save_pretrained(folder, safe_serialization=True)
    return folder


def build_lora(base: Path, out: Path, fmt: str, rank: int, seed: int, targets: tuple[str, ...] = TRANSFORMER, scale: float = 0.01) -> Path:
    """A random float16 LoRA of real size for the UNet of `base`, diffusers or kohya layout, made on the meta
    device (no UNet weights are read). A ~ N(0, 1/fan_in) like PEFT's init; B ~ N(0, scale^2) so it acts."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = UNet2DConditionModel.load_config(base / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    lora = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets))
    unet.add_adapter(lora)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, meta in get_peft_model_state_dict(unet).items():
        w = torch.randn(meta.shape, generator=gen)
        state[key] = (w / math.prod(meta.shape[1:]) ** 0.5 if ".lora_A." in key else w * scale).half()  # (r, in[, k, k]) / (out, r[, 1, 1])
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "kohya":
        kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
        save_file({k: v.contiguous() for k, v in kohya.items()}, out, metadata={"format": "pt", "ss_network_dim": str(rank)})
        return out
    pipe_cls = StableDiffusionXLPipeline if config.get("addition_embed_type") == "text_time" else StableDiffusionPipeline
    pipe_cls.save_lora_weights(out.parent, unet_lora_layers=state, weight_name=out.name, unet_lora_adapter_metadata=lora.to_dict())
    return out


@dataclass
class Kit:
    """What one architecture's benchmark runs on, all on disk."""

    arch: str
    base: Path
    loras: dict[str, Path]  # a, b: rank R1 (kohya, diffusers); c, d: rank R2 (kohya, diffusers)
    model: Path  # a second UNet: a `kind: model` expert
    speed: Path  # catalog with a, b, c, d and m
    catalogs: dict[int, Path] = field(default_factory=dict)  # n -> a catalog of n experts (hard links of lora b)


def _catalog(folder: Path, base: Path, experts: dict[str, Path]) -> Path:
    from mixdiff_cli.experts.manage import add_expert, init_catalog

    path = folder / "experts.yaml"
    init_catalog(path, base=str(base))
    for name, source in experts.items():
        add_expert(path, str(source), name=name, prompts=[f"a {name} picture"])
    return path


def _many(folder: Path, base: Path, lora: Path, n: int) -> Path:
    """A catalog of `n` experts, each its own file (hard links of `lora`: distinct paths, no disk cost)."""
    files = {}
    for i in range(n):
        files[f"e{i:03d}"] = folder / f"e{i:03d}{lora.suffix}"
        os.link(lora, files[f"e{i:03d}"])
    return _catalog(folder, base, files)


def kit(arch: str, reduced: bool = False, counts: tuple[int, ...] = (1, 32, 128), device: str = "cpu", cache: Path | None = None) -> Kit:
    """Build (once, into `cache`, default CACHE) the pipeline, four LoRAs, a model expert and the catalogs of `arch`."""
    from mixdiff_cli.core.quiet import quiet_frameworks
    from mixdiff_cli.testing import cached

    root = (cache or CACHE) / f"{arch}{'-reduced' if reduced else ''}"
    r1, r2 = geometry(arch, reduced)["ranks"]
    targets = ATTN if arch == "sdxl" and not reduced else TRANSFORMER  # SDXL: 93 MB at rank 32, 372 MB at 128
    with quiet_frameworks():
        base = cached(root, "base", lambda d: build_pipeline(d, arch, reduced, device))
        specs = {"a": ("kohya", r1), "b": ("diffusers", r1), "c": ("kohya", r2), "d": ("diffusers", r2)}
        lora_dir = cached(root, "loras", lambda d: [build_lora(base, d / f"{n}.safetensors", fmt, r, seed=i, targets=targets)
                                                    for i, (n, (fmt, r)) in enumerate(specs.items())])
        loras = {n: lora_dir / f"{n}.safetensors" for n in specs}
        model = cached(root, "model", lambda d: build_model_expert(d, base, device))
        speed = cached(root, "speed", lambda d: _catalog(d, base, {**loras, "m": model})) / "experts.yaml"
        catalogs = {n: cached(root, f"cat{n}", lambda d, n=n: _many(d, base, loras["b"], n)) / "experts.yaml" for n in counts}
    return Kit(arch, base, loras, model, speed, catalogs)


# ------------------------------------------------------------------------------------------ measuring


@dataclass
class Settings:
    """How a run measures."""

    device: str = "cpu"
    dtype: str | None = None  # None: float16 on CUDA, float32 on CPU (SDXL: plain shares the UNet, see SharedPlain)
    size: int | None = None  # pixels; None: native on CUDA (512 SD 1.5, 1024 SDXL), 64 on CPU
    steps: int | None = None  # None: 20 on CUDA; on CPU 10 (SDXL: 4)
    reps: int = 3
    counts: tuple[int, ...] = (1, 32, 128)  # experts in the catalogs whose peak memory is compared
    reduced: bool = False
    compile: tuple[str, ...] = ()  # archs whose hotswap engine is torch.compiled and sampled (accelerators)
    deadline: float = float("inf")  # time.monotonic() after which the sections left are skipped
    share: bool | None = None  # plain diffusers on the engine's UNet (None: where two UNets do not fit in memory)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def dtype_for(self, arch: str) -> str:
        return self.dtype or ("float16" if self.cuda else "float32")  # CPU bfloat16 is emulated without AVX-512 BF16

    def steps_for(self, arch: str) -> int:
        return self.steps or (20 if self.cuda else 4 if arch == "sdxl" and not self.reduced else 10)

    def size_for(self, arch: str) -> int:
        return self.size or (1024 if arch == "sdxl" else 512) if self.cuda else self.size or 64


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _clock(fn: Callable[[], object], device: str) -> float:
    """Wall seconds of one call of `fn` (device work included)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _times(runs: dict[str, Callable[[], object]], s: Settings, reps: int | None = None) -> dict[str, float]:
    """The fastest of `reps` calls of each run, calls interleaved (A B C A B C ...) after one warm-up call
    each: process CPU seconds on CPU, wall seconds on CUDA. Other jobs sharing the machine only ever slow a
    call down (memory bandwidth, caches), so the fastest call is the steadiest estimate of its cost."""
    clock = time.perf_counter if s.cuda else time.process_time
    best = dict.fromkeys(runs, math.inf)
    for fn in runs.values():
        fn()
    for _ in range(reps or s.reps):
        for name, fn in runs.items():
            _sync(s.device)
            start = clock()
            fn()
            _sync(s.device)
            best[name] = min(best[name], clock() - start)
    return best


def _request(s: Settings, arch: str, seed: int = 1, n: int = 1) -> list[Any]:
    from mixdiff_cli.sampling.engine import Request

    return [Request(PROMPT, seed=seed + i, steps=s.steps_for(arch), width=s.size_for(arch), height=s.size_for(arch)) for i in range(n)]


def _plain_image(plain: Any, s: Settings, arch: str, seed: int = 1) -> Any:
    import torch

    generator = torch.Generator(device=s.device).manual_seed(seed)
    return plain(PROMPT, num_inference_steps=s.steps_for(arch), width=s.size_for(arch), height=s.size_for(arch), generator=generator,
                 output_type="np").images[0]


def _with_fuse(engine: Any, mode: str, fn: Callable[[], Any]) -> Any:
    engine.fuse = mode
    try:
        return fn()
    finally:
        engine.fuse = "auto"


def _unet_inputs(unet: Any, n: int, size: int, s: Settings, dtype: Any) -> tuple[Any, Any, dict | None]:
    """Random (latents, text states, SDXL added conditioning) for `n` UNet samples at `size` px."""
    import torch

    cfg, lat, gen = unet.config, size // 8, torch.Generator().manual_seed(0)
    x = torch.randn(n, cfg.in_channels, lat, lat, generator=gen).to(s.device, dtype)  # (n, 4, h/8, w/8)
    ctx = torch.randn(n, 77, cfg.cross_attention_dim, generator=gen).to(s.device, dtype)  # (n, 77, D)
    if cfg.addition_embed_type != "text_time":
        return x, ctx, None
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * n, dtype=dtype, device=s.device)
    return x, ctx, {"text_embeds": torch.randn(n, pooled, generator=gen).to(s.device, dtype), "time_ids": time_ids}


class SharedPlain:
    """Plain diffusers on the engine's own UNet, for a machine where two UNets do not fit (SDXL in float32 on
    24 GB): the same modules in a diffusers pipeline of their own, its LoRAs as adapters named `plain_*`.
    Every use gives the engine's fused weights back first and leaves the engine to set its adapter state anew
    (`_adapters_changed`); a call sets plain's own adapter (`set_adapters`, ~1% of one denoiser call)."""

    prefix = "plain_"

    def __init__(self, engine: Any, lora: Path) -> None:
        self._engine = engine
        self._pipe = type(engine.pipe).from_pipe(engine.pipe, dtype=engine.denoiser.dtype)  # the same modules
        self._pipe.set_progress_bar_config(disable=True)
        self._touch()
        self._pipe.load_lora_weights(str(lora), adapter_name=self.prefix + "a")
        self.active = [self.prefix + "a"]

    def _touch(self, on_off: bool = True) -> None:
        """The engine's fused weights back, and its cached adapter state forgotten (`on_off`: whether the
        LoRA layers may be switched on or off too)."""
        if on_off:
            self._engine._adapters_changed()
        else:
            self._engine.unfuse()
            self._engine._active_key = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._touch()
        self._pipe.enable_lora()
        self._pipe.set_adapters(self.active)
        try:
            return self._pipe(*args, **kwargs)
        finally:
            self._touch(on_off=False)
            self._engine._lora_on = True  # as enable_lora left them

    def __getattr__(self, name: str) -> Any:
        self._touch(on_off=name not in ("set_adapters", "unet"))
        return getattr(self._pipe, name)


def _plain_name(plain: Any, name: str) -> str:
    return getattr(plain, "prefix", "") + name


def equality(engine: Any, plain: Any, s: Settings, arch: str) -> dict[str, float]:
    """Top-1 (fused and unfused) against plain diffusers with the same LoRA: max pixel difference on [0, 1]."""
    import numpy as np

    ref = _plain_image(plain, s, arch, seed=3)
    out = {}
    for mode in ("never", "always"):
        image = _with_fuse(engine, mode, lambda: engine.generate(_request(s, arch, seed=3), [("a", 1.0)], output_type="np")[0])
        out[f"top1_{'un' if mode == 'never' else ''}fused_max_diff"] = float(np.abs(np.asarray(image, np.float64) - ref).max())
    return out


def speed(engine: Any, plain: Any, s: Settings, arch: str) -> dict[str, Any]:
    """Whole images, interleaved: plain diffusers with LoRA a; mixdiff top-1 (fused, unfused), noise and merge
    k=2 (a, b); then one denoiser call of each (`blend_overhead`).

    Fused top-1 twice: among the other runs each of its images fuses anew (the route changed in between: a
    route's first image), and then against plain alone, where the fusion stays from one image to the next
    (the route's later images: a prompt file, --num-images). The fuse itself is timed on its own."""
    from peft.tuners.lora.layer import LoraLayer

    def top1(mode: str) -> Callable[[], Any]:
        return lambda: _with_fuse(engine, mode, lambda: engine.generate(_request(s, arch), [("a", 1.0)], output_type="np"))

    pair = [("a", 0.5), ("b", 0.5)]
    runs = {
        "plain": lambda: _plain_image(plain, s, arch),
        "top1_unfused": top1("never"),
        "top1_fused": top1("always"),
        "noise2": lambda: engine.generate(_request(s, arch), pair, blend="noise", output_type="np"),
        "merge2": lambda: engine.generate(_request(s, arch), pair, blend="merge", output_type="np"),
    }
    t = _times(runs, s)
    fuse_s = fuse_seconds(engine, s)
    if isinstance(plain, SharedPlain):  # each plain image unfuses the shared UNet: later images = first - fuse
        t.update(plain_again=t["plain"], top1_fused_later=t["top1_fused"] - fuse_s)
    else:
        t.update({k + ("_later" if k == "top1_fused" else "_again"): v for k, v in _times({k: runs[k] for k in ("plain", "top1_fused")}, s).items()})
    adapter, latent = engine._loaded["a"].adapter, s.size_for(arch) // engine.pipe.vae_scale_factor
    fused = engine._fuse_pays([m for m in engine.denoiser.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A], [adapter],
                              2 * s.steps_for(arch) * latent * latent)  # what generate decides for one image with CFG
    t["top1"] = t["top1_fused" if fused else "top1_unfused"]
    steps = s.steps_for(arch)
    out: dict[str, Any] = {"steps": steps, "size": s.size_for(arch), "top1_default": "fused" if fused else "unfused",
                           "fused_later": "first image - fuse" if isinstance(plain, SharedPlain) else "measured"}
    out.update({f"{k}_per_step_s": round(v / steps, 4) for k, v in t.items()})
    out.update({
        "top1_over_plain": round(t["top1"] / t["plain"], 3),
        "top1_fused_over_plain": round(t["top1_fused_later"] / t["plain_again"], 3),
        "top1_fused_first_over_plain": round(t["top1_fused"] / t["plain"], 3),
        "fuse_s": round(fuse_s, 3),
        "fuse_paid_back_images": round(fuse_s / (t["plain_again"] - t["top1_fused_later"]), 1) if t["plain_again"] > t["top1_fused_later"] else None,
        "top1_unfused_over_plain": round(t["top1_unfused"] / t["plain"], 3),
        "noise2_over_top1": round(t["noise2"] / t["top1"], 3),
        "merge2_over_top1": round(t["merge2"] / t["top1"], 3),
    })
    out.update(blend_overhead(engine, plain, s, arch))
    return out


def fused_call(engine: Any, plain: Any, s: Settings, arch: str) -> dict[str, Any]:
    """One denoiser call (one image with CFG), interleaved: mixdiff's top-1 with LoRA a fused (the fusion kept
    between calls, as between a route's images) against plain diffusers' UNet with the same LoRA, and bare.
    Per call, the fuse wins what the LoRA layers cost, which grows with the canvas (their tokens)."""
    from mixdiff_cli.sampling.engine import Active
    from mixdiff_cli.sampling.mixture import ACTIVE, Blend

    if isinstance(plain, SharedPlain):  # plain's calls would unfuse the engine's UNet
        return {}
    x, ctx, added = _unet_inputs(plain.unet, 2, s.size_for(arch), s, plain.unet.dtype)
    engine.fuse = "always"
    engine.plan([Active(engine.catalog.expert("a"), 1.0)], "noise")
    engine._fuse([engine._loaded["a"].adapter])

    def fused() -> Any:
        with engine.mixture.routed(Blend([ACTIVE])):
            return engine.mixture(x, 500, ctx, added_cond_kwargs=added)

    def bare() -> Any:
        plain.disable_lora()
        try:
            return plain.unet(x, 500, ctx, added_cond_kwargs=added)
        finally:
            plain.enable_lora()

    try:
        t = _times({"plain_lora": lambda: plain.unet(x, 500, ctx, added_cond_kwargs=added), "fused": fused, "bare": bare}, s, reps=4 * s.reps)
    finally:
        engine.unfuse()
        engine.fuse = "auto"
    return {"call_size": s.size_for(arch), **{f"call_{k}_s": round(v, 4) for k, v in t.items()},
            "call_fused_over_plain": round(t["fused"] / t["plain_lora"], 3), "call_plain_lora_over_bare": round(t["plain_lora"] / t["bare"], 3)}


def fuse_seconds(engine: Any, s: Settings) -> float:
    """The fastest of `reps` fuses of LoRA a into the base UNet (what a route's first fused image adds)."""
    from mixdiff_cli.sampling.engine import Active

    engine.fuse = "always"
    try:
        engine.plan([Active(engine.catalog.expert("a"), 1.0)], "noise")
        adapter = engine._loaded["a"].adapter

        def fuse() -> None:
            engine.unfuse()  # a pointer swap back
            engine._fuse([adapter])

        best = _times({"fuse": fuse}, s)["fuse"]  # the clock of the images' figures
        engine.unfuse()
        return best
    finally:
        engine.fuse = "auto"


def blend_overhead(engine: Any, plain: Any, s: Settings, arch: str) -> dict[str, Any]:
    """One denoiser call, interleaved, four times as many repetitions as whole images: the mixture at top-1
    (batch 2: one image with CFG) and at noise k=2 (batch 4, each adapter on its slice), against the bare UNet
    at batch 2 and 4. The blend's own cost is what noise / top-1 adds beyond the bare UNet's batch doubling."""
    from mixdiff_cli.sampling.engine import Active
    from mixdiff_cli.sampling.mixture import ACTIVE, Blend

    engine.plan([Active(engine.catalog.expert("a"), 1.0)], "noise")  # top-1 a active; the slices name their own
    x, ctx, added = _unet_inputs(plain.unet, 4, s.size_for(arch), s, plain.unet.dtype)  # (4, ...): 2 images x CFG
    half = None if added is None else {k: v[:2] for k, v in added.items()}

    def mixture(blend: Blend) -> Callable[[], Any]:
        def call() -> Any:
            with engine.mixture.routed(blend):
                return engine.mixture(x[:2], 500, ctx[:2], added_cond_kwargs=half)
        return call

    shared = isinstance(plain, SharedPlain)

    def bare(n: int) -> Callable[[], Any]:
        def call() -> Any:
            if shared:  # the engine's UNet with its LoRA layers off for this call (two passes over the modules)
                plain.disable_lora()
            try:
                return plain.unet(x[:n], 500, ctx[:n], added_cond_kwargs=half if n == 2 else added)
            finally:
                if shared:
                    plain.enable_lora()
        return call

    if not shared:
        plain.disable_lora()
    try:
        t = _times({"unet_b2": bare(2), "unet_b4": bare(4),
                    "mix_top1": mixture(Blend([ACTIVE])),
                    "mix_noise2": mixture(Blend(["a", "b"], weights=[0.5, 0.5]))}, s, reps=4 * s.reps)
    finally:
        if not shared:
            plain.enable_lora()
    limit = t["unet_b4"] / t["unet_b2"]
    out = {f"{k}_s": round(v, 4) for k, v in t.items()}
    out.update({"unet_batch4_over_batch2": round(limit, 3), "unet_noise2_over_top1": round(t["mix_noise2"] / t["mix_top1"], 3),
                "noise2_over_batch_limit": round(t["mix_noise2"] / t["mix_top1"] / limit, 3)})
    return out


def loading(engine: Any, plain: Any, kit: Kit, s: Settings) -> dict[str, float]:
    """An expert load (LRU miss) against plain `load_lora_weights`, per LoRA (two ranks x kohya/diffusers),
    each into a UNet holding one other adapter (a load's cost grows with the adapters present)."""
    samples: dict[str, list[float]] = {}
    for _ in range(s.reps):
        for name, path in kit.loras.items():
            for other in engine.loaded:
                engine.evict(other)
            engine.ensure_loaded(["b" if name == "a" else "a"])  # one other adapter, as plain holds a
            before = engine.resident_bytes
            samples.setdefault(f"load_{name}_s", []).append(_clock(lambda: engine.ensure_loaded([name]), s.device))
            samples[f"resident_{name}_mib"] = [(engine.resident_bytes - before) / 2**20]
            samples.setdefault(f"plain_load_{name}_s", []).append(
                _clock(lambda: plain.load_lora_weights(str(path), adapter_name="probe"), s.device))
            plain.delete_adapters("probe")
    out = {k: round(statistics.median(v), 4) for k, v in samples.items()}
    out.update({f"file_{n}_mib": round(p.stat().st_size / 2**20, 1) for n, p in kit.loras.items()})
    return out


def switching(engine: Any, plain: Any, kit: Kit, s: Settings) -> dict[str, float]:
    """Route switch A -> B -> A (per switch): both adapters resident (mixdiff's plan against plain
    set_adapters), and through the LRU with room for one expert (unload + load)."""
    from mixdiff_cli.sampling.engine import Active

    engine.ensure_loaded(["a", "b"])
    routes = [[Active(engine.catalog.expert(n), 1.0)] for n in ("b", "a")]
    plain.load_lora_weights(str(kit.loras["b"]), adapter_name=_plain_name(plain, "b"))
    samples: dict[str, list[float]] = {"switch_resident_ms": [], "plain_switch_ms": [], "switch_lru_s": []}
    for _ in range(s.reps):
        for route, name in zip(routes, ("b", "a")):
            setter = plain.set_adapters  # (a shared UNet's engine state is reset here, outside the clock)
            samples["switch_resident_ms"].append(1000 * _clock(lambda: engine.plan(route, "noise"), s.device))
            samples["plain_switch_ms"].append(1000 * _clock(lambda: setter([_plain_name(plain, name)]), s.device))
    plain.delete_adapters(_plain_name(plain, "b"))
    plain.set_adapters([_plain_name(plain, "a")])
    loaded, engine.max_loaded = engine.max_loaded, 1
    engine.ensure_loaded(["a"])
    for _ in range(s.reps):
        for name in ("b", "a"):
            samples["switch_lru_s"].append(_clock(lambda: engine.ensure_loaded([name]), s.device))
    engine.max_loaded = loaded
    return {k: round(statistics.median(v), 4) for k, v in samples.items()}


def budget(engine: Any, s: Settings) -> dict[str, Any]:
    """`--max-memory`: a budget of 1.2x the rank-R2 adapter; a sequence of single-expert routes; the
    resident bytes after each load never pass it."""
    for name in list(engine.loaded):
        engine.evict(name)
    engine.ensure_loaded(["c"])
    limit = int(1.2 * engine.resident_bytes)
    engine.evict("c")
    engine.max_memory, evicted = limit, len(engine.evictions)
    resident = []
    for name in ("a", "b", "c", "a", "d", "b", "a"):
        engine.ensure_loaded([name])
        resident.append(engine.resident_bytes)
    engine.max_memory = None
    return {"budget_mib": round(limit / 2**20, 1), "max_resident_mib": round(max(resident) / 2**20, 1),
            "under_budget": max(resident) <= limit, "budget_evictions": len(engine.evictions) - evicted}


def model_expert(engine: Any, s: Settings) -> dict[str, Any]:
    """A full-model expert (a second UNet): loaded from disk (cold, then warm page cache) against re-activated
    from CPU memory where the engine parks it (accelerators; on CPU a parked UNet costs what a loaded one does,
    so the engine frees it)."""
    for name in list(engine.loaded):
        engine.evict(name)
    out: dict[str, Any] = {"model_load_disk_s": round(_clock(lambda: engine.ensure_loaded(["m"]), s.device), 3)}
    out["model_mib"] = round(engine.resident_bytes / 2**20, 1)
    engine.evict("m")
    if s.cuda:
        out["model_parked_s"] = round(_clock(lambda: engine.ensure_loaded(["m"]), s.device), 3)
        engine.evict("m")
        engine._parked.clear()
    out["model_reload_disk_s"] = round(_clock(lambda: engine.ensure_loaded(["m"]), s.device), 3)
    engine.evict("m")
    return out


def hotswap(kit: Kit, s: Settings, arch: str) -> dict[str, Any]:
    """Compile mode: adapters hotswapped into one slot (A -> B -> A, per switch); with `s.compile`, sample
    before and after a switch and count the graphs torch.compile made (a switch should add none)."""
    from mixdiff_cli.sampling.engine import Engine

    engine = Engine(kit.speed, device=s.device, dtype=s.dtype_for(arch), max_loaded=1, compile=True)
    engine.ensure_loaded(["a"])
    switches = [_clock(lambda n=n: engine.ensure_loaded([n]), s.device) for _ in range(s.reps) for n in ("b", "a")]
    out: dict[str, Any] = {"hotswap_switch_s": round(statistics.median(switches), 4)}
    if arch in s.compile:
        from torch._dynamo.utils import counters

        out["compiled_first_image_s"] = round(_clock(lambda: engine.generate(_request(s, arch), ["a"], output_type="np"), s.device), 2)
        graphs = counters["stats"]["unique_graphs"]
        out["compiled_image_s"] = round(_clock(lambda: engine.generate(_request(s, arch), ["a"], output_type="np"), s.device), 3)
        out["compiled_after_hotswap_image_s"] = round(_clock(lambda: engine.generate(_request(s, arch), ["c"], output_type="np"), s.device), 3)
        out["graphs_added_by_switch"] = counters["stats"]["unique_graphs"] - graphs
    del engine
    gc.collect()
    return out


def _anon_peak() -> Callable[[], int | None]:
    """Sample this process's anonymous resident memory (Linux RssAnon: allocations, not the file pages of mapped
    weights, which come and go with the page cache) every 5 ms; returns a function giving the peak so far."""
    import threading

    peak: list[int | None] = [None]

    def sample() -> None:
        while True:
            try:
                with open("/proc/self/status") as fh:
                    kib = next(int(line.split()[1]) for line in fh if line.startswith("RssAnon:"))
            except (OSError, StopIteration):
                return
            peak[0] = max(peak[0] or 0, kib * 1024)
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    return lambda: peak[0]


def _child(spec: dict[str, Any]) -> None:
    """Subprocess body: load (and make one image) in a fresh process, then its peak memory as one JSON line."""
    import torch

    from mixdiff_cli.core.runtime import pick_dtype

    anon = _anon_peak()
    device = torch.device(spec["device"])
    before: list[int | None] = [None]  # the whole process's peak RSS up to `_reset_peak` (loading the base)
    weights = None
    if spec["kind"] == "load":  # the base alone, in the run's dtype from float16 files
        from mixdiff_cli.models.pipeline import load_pipeline

        pipe = load_pipeline(spec["base"], pick_dtype(spec["dtype"], device), device)
        weights = sum(p.numel() * p.element_size() for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters())
        loads: list[str] = []
    elif spec["kind"] == "plain":
        from mixdiff_cli.models.pipeline import load_pipeline

        pipe = load_pipeline(spec["base"], pick_dtype(spec["dtype"], device), device)
        before[0] = _reset_peak()
        pipe.load_lora_weights(spec["lora"], adapter_name="e")
        pipe(PROMPT, num_inference_steps=2, width=spec["size"], height=spec["size"], generator=torch.Generator(device).manual_seed(1))
        loads = ["e"]
    else:
        from mixdiff_cli.sampling.engine import Engine, Request

        engine = Engine(spec["catalog"], device=spec["device"], dtype=spec["dtype"])
        before[0] = _reset_peak()
        engine.generate([Request(PROMPT, seed=1, steps=2, width=spec["size"], height=spec["size"])], ["e000"])
        loads = engine.loads
    vram = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # since the reset, if there was one
    run = rss if before[0] is not None else None
    rss = max(rss, before[0] or 0)
    print(json.dumps({"rss": rss, "anon": anon(), "run": run, "vram": vram, "weights": weights, "loads": loads}))


def _status_bytes(field: str) -> int | None:
    """A field of /proc/self/status in bytes (Linux), else None."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def _reset_peak() -> int | None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux: 5 > /proc/self/clear_refs); what
    follows is measured apart from loading the base, whose transient peak (the float16 file mapped while the
    weights are converted) varies by up to 15% between identical runs. Returns the peak before the reset
    (None where the mark cannot be reset: then nothing is measured apart)."""
    peak = _status_bytes("VmHWM")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    return peak


def peak_memory(kit: Kit, s: Settings, arch: str) -> dict[str, Any]:
    """Peak memory of fresh processes: the base alone (loaded in the run's dtype from float16 files), plain
    diffusers with one LoRA making one image, and mixdiff with 1, 32, 128 experts in the catalog (one routed).
    Peak RSS (median of runs), peak anonymous RSS, peak RSS once the base is loaded (routing, expert loads and
    the image: what the catalog's size could change) and, on CUDA, peak VRAM. Run before anything loads here."""
    common = {"device": s.device, "dtype": s.dtype_for(arch), "size": s.size_for(arch)}
    specs = {"load": {**common, "kind": "load", "base": str(kit.base)},
             "plain": {**common, "kind": "plain", "base": str(kit.base), "lora": str(kit.loras["b"])}}
    specs.update({str(n): {**common, "kind": "mixdiff", "catalog": str(path)} for n, path in kit.catalogs.items()})
    runs = 1 if s.reduced or s.cuda else s.reps
    at_once = len(specs) if s.reduced or s.cuda else 1  # real models on CPU: one at a time, to stay in memory
    names = [n for _ in range(runs) for n in specs]
    peaks: dict[str, list[dict[str, Any]]] = {}
    for i in range(0, len(names), at_once):
        procs = [(n, subprocess.Popen([sys.executable, __file__, "--child", json.dumps(specs[n])], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)) for n in names[i:i + at_once]]
        for name, proc in procs:
            stdout, stderr = proc.communicate()
            if proc.returncode:
                raise RuntimeError(f"child {name} failed:\n{stderr[-3000:]}")
            peaks.setdefault(name, []).append(json.loads(stdout.strip().splitlines()[-1]))

    def peak(name: str, key: str) -> float | None:
        values = [p[key] for p in peaks[name] if p[key] is not None]
        return statistics.median(values) if values else None

    one, out = str(min(kit.catalogs)), {}
    for key in ("rss", "anon", "run", "vram"):
        if peak(one, key) is None:
            continue
        for name in specs:
            if peak(name, key) is not None:
                out[f"{key}_{name}_mib"] = round(peak(name, key) / 2**20, 1)
        for n in kit.catalogs:
            out[f"{key}_{n}_over_1"] = round(peak(str(n), key) / peak(one, key), 3)
        out[f"{key}_1_over_plain"] = round(peak(one, key) / peak("plain", key), 3)
    spread = [p["rss"] for name in specs for p in peaks[name]]  # every process loads the same base first
    out["rss_spread"] = round(max(spread) / min(spread), 3)
    out["weights_mib"] = round(peaks["load"][0]["weights"] / 2**20, 1)
    return out


SECTIONS = ("memory", "equality", "speed", "fused", "switching", "loading", "budget", "model", "hotswap")


def _two_unets_do_not_fit(engine: Any, s: Settings) -> bool:
    """Whether a second copy of the engine's UNet would pass 90% of this CPU machine's memory (on top of what
    the process holds now: the base, its text encoders and VAE, the adapters)."""
    if s.cuda:
        return False
    unet = sum(p.numel() * p.element_size() for p in engine.denoiser.parameters())
    return _rss_bytes() + unet > 0.9 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_arch(arch: str, s: Settings, sections: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
    """Every section for one architecture; the parts that need the base loaded share one engine and one plain
    pipeline (its own UNet, the engine's text encoders and VAE: nothing adapts those)."""
    import torch
    from diffusers import UNet2DConditionModel

    from mixdiff_cli.core.quiet import quiet_frameworks
    from mixdiff_cli.core.runtime import pick_dtype
    from mixdiff_cli.sampling.engine import Engine

    clock = time.perf_counter()
    kit_ = kit(arch, s.reduced, s.counts, device="cuda" if s.cuda else "cpu")
    out: dict[str, Any] = {"arch": arch, "dtype": s.dtype_for(arch), "device": s.device, "reduced": s.reduced,
                           "size": s.size_for(arch), "steps": s.steps_for(arch), "build_s": round(time.perf_counter() - clock, 1)}
    skipped = out.setdefault("skipped", [])

    def section(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        """Run one section if asked for and time is left; record its figures and seconds."""
        if name not in sections:
            return
        if time.monotonic() > s.deadline:
            skipped.append(name)
            return
        start = time.perf_counter()
        figures = fn()
        figures[f"{name}_section_s"] = round(time.perf_counter() - start, 1)
        out.update(figures)
        print(json.dumps({"arch": arch, "section": name, **figures}), file=sys.stderr, flush=True)  # a long run's partial figures

    with quiet_frameworks(), torch.no_grad():
        section("memory", lambda: peak_memory(kit_, s, arch))
        engine = Engine(kit_.speed, device=s.device, dtype=s.dtype_for(arch), max_loaded=8)
        dtype = pick_dtype(s.dtype_for(arch), engine.device)
        share = s.share if s.share is not None else _two_unets_do_not_fit(engine, s)
        out["plain_unet"] = "shared with the engine" if share else "its own"
        if share:
            unet, plain = None, SharedPlain(engine, kit_.loras["a"])
        else:
            unet = UNet2DConditionModel.from_pretrained(kit_.base / "unet", dtype=dtype, local_files_only=True).to(s.device)
            plain = type(engine.pipe).from_pipe(engine.pipe, unet=unet, dtype=dtype)  # from_pipe casts to float32 unless told
            plain.set_progress_bar_config(disable=True)
            plain.load_lora_weights(str(kit_.loras["a"]), adapter_name="a")
        engine.ensure_loaded(["a", "b"])
        section("equality", lambda: equality(engine, plain, s, arch))
        section("speed", lambda: speed(engine, plain, s, arch))
        section("fused", lambda: fused_call(engine, plain, s, arch))
        section("switching", lambda: switching(engine, plain, kit_, s))
        section("loading", lambda: loading(engine, plain, kit_, s))
        section("budget", lambda: budget(engine, s))
        del plain, unet
        gc.collect()
        if share and "model" in sections:  # a model expert is a second UNet: it would not fit either
            skipped.append("model")
        else:
            section("model", lambda: model_expert(engine, s))
        del engine
        gc.collect()
        section("hotswap", lambda: hotswap(kit_, s, arch))
    out["seconds"] = round(time.perf_counter() - clock, 1)
    return out


# ------------------------------------------------------------------------------------------ report

ROWS = [  # (figure, key, target)
    ("the base loaded in the run's dtype from float16 files: weights / peak anonymous RSS (MiB)", ("weights_mib", "anon_load_mib"), "no float32 copy"),
    ("peak RSS, mixdiff with 1 expert in the catalog / plain diffusers with 1 LoRA (MiB)", ("rss_1_mib", "rss_plain_mib"), ""),
    ("peak RSS of the whole process, 32 experts / 1", "rss_32_over_1", "(load transient)"),
    ("peak RSS of the whole process, 128 experts / 1", "rss_128_over_1", ""),
    ("peak RSS of the whole process, largest / smallest over every run (the base's load transient)", "rss_spread", ""),
    ("peak RSS once the base is loaded, mixdiff 1 expert / plain diffusers 1 LoRA (MiB)", ("run_1_mib", "run_plain_mib"), ""),
    ("peak RSS once the base is loaded, 32 experts / 1; 128 / 1", ("run_32_over_1", "run_128_over_1"), "<= 1.05"),
    ("peak anonymous RSS, 1 expert (MiB); 32 / 1; 128 / 1", ("anon_1_mib", "anon_32_over_1", "anon_128_over_1"), "<= 1.05"),
    ("peak VRAM, mixdiff with 1 expert / plain diffusers (MiB)", ("vram_1_mib", "vram_plain_mib"), ""),
    ("peak VRAM, 32 experts / 1", "vram_32_over_1", "<= 1.05"),
    ("LoRA file: rank R1 / R2 (MiB)", ("file_a_mib", "file_c_mib"), ""),
    ("LoRA load, rank R1 kohya: mixdiff / plain (s)", ("load_a_s", "plain_load_a_s"), ""),
    ("LoRA load, rank R1 diffusers: mixdiff / plain (s)", ("load_b_s", "plain_load_b_s"), ""),
    ("LoRA load, rank R2 kohya: mixdiff / plain (s)", ("load_c_s", "plain_load_c_s"), ""),
    ("LoRA load, rank R2 diffusers: mixdiff / plain (s)", ("load_d_s", "plain_load_d_s"), ""),
    ("route switch A->B->A, adapters resident: mixdiff / plain set_adapters (ms)", ("switch_resident_ms", "plain_switch_ms"), ""),
    ("route switch through the LRU (unload + load, s)", "switch_lru_s", ""),
    ("route switch by hotswap into a slot (compile mode, s)", "hotswap_switch_s", ""),
    ("top-1 as mixdiff runs it (fused where that pays) / plain diffusers", "top1_over_plain", ""),
    ("fused top-1 / plain diffusers, a route's later images (the fusion stays between images)", "top1_fused_over_plain", "<= 1.0"),
    ("fused top-1 / plain diffusers, a route's first image (its fuse included)", "top1_fused_first_over_plain", ""),
    ("the fuse (s); the images of one route it takes to pay back", ("fuse_s", "fuse_paid_back_images"), ""),
    ("one denoiser call: fused top-1 / plain diffusers' UNet with the LoRA; that over the bare UNet", ("call_fused_over_plain", "call_plain_lora_over_bare"), "<= 1.0"),
    ("unfused top-1 / plain diffusers", "top1_unfused_over_plain", ""),
    ("plain diffusers per step (s)", "plain_per_step_s", ""),
    ("noise k=2 / top-1, whole images", "noise2_over_top1", "<= 1.15 (GPU)"),
    ("one denoiser call: bare UNet batch 4 / batch 2 (the batch-doubling limit)", "unet_batch4_over_batch2", ""),
    ("one denoiser call: noise k=2 / top-1", "unet_noise2_over_top1", ""),
    ("that over the batch-doubling limit (the blend's own cost)", "noise2_over_batch_limit", "<= 1.05"),
    ("merge k=2 / top-1", "merge2_over_top1", ""),
    ("model expert: load from disk, cold / warm cache (s)", ("model_load_disk_s", "model_reload_disk_s"), ""),
    ("model expert: back from CPU memory (parked, s)", "model_parked_s", ""),
    ("top-1 vs plain diffusers, max pixel difference (unfused / fused)", ("top1_unfused_max_diff", "top1_fused_max_diff"), "<= 1/255 = 0.0039"),
    ("--max-memory: budget / most resident (MiB)", ("budget_mib", "max_resident_mib"), "resident <= budget"),
    ("torch.compile: image before / after a hotswap (s); graphs added", ("compiled_image_s", "compiled_after_hotswap_image_s", "graphs_added_by_switch"), "0 graphs"),
]


def _cell(result: dict[str, Any], key: str | tuple[str, ...]) -> str:
    keys = (key,) if isinstance(key, str) else key
    values = [result.get(k) for k in keys]
    if all(v is None for v in values):
        return "-"
    return " / ".join("-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in values)


def table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table: one row a figure, one column an architecture."""
    archs = list(results)
    head = {a: f"{'SD 1.5' if a == 'sd15' else 'SDXL'} ({results[a]['device']}, {results[a]['dtype']}, "
               f"{results[a].get('size', '?')} px, {results[a].get('steps', '?')} steps)" for a in archs}
    lines = ["| figure | " + " | ".join(head.values()) + " | target |", "| --- |" + " --- |" * (len(archs) + 1)]
    for label, key, target in ROWS:
        cells = [_cell(results[a], key) for a in archs]
        if any(c != "-" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {target} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: float16 on CUDA, float32 on CPU)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: native on CUDA, 64 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 20 on CUDA; CPU 10, SDXL 4)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads on CPU")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 32, 128], help="catalog sizes for peak memory")
    parser.add_argument("--reduced", action="store_true", help="channels and depth cut ~10x (seconds; tests and gpu.sh --dry)")
    parser.add_argument("--compile", nargs="*", choices=ARCHS, default=[], help="archs sampled with torch.compile + hotswap")
    parser.add_argument("--share-unet", choices=["auto", "yes", "no"], default="auto",
                        help="plain diffusers on the engine's UNet (auto: where two UNets do not fit in memory, e.g. SDXL float32 in 24 GB)")
    parser.add_argument("--budget-s", type=float, default=None, help="skip the sections left after this many seconds")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--json", type=Path, default=None, help="write the figures here (after each arch)")
    parser.add_argument("--md", type=Path, default=None, help="write the markdown table here (after each arch)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        _child(json.loads(args.child))
        return
    deadline = time.monotonic() + (args.budget_s if args.budget_s is not None else float("inf"))
    s = Settings(args.device, args.dtype, args.size, args.steps, args.reps, tuple(args.counts), args.reduced,
                 tuple(args.compile), deadline, {"auto": None, "yes": True, "no": False}[args.share_unet])
    results: dict[str, dict[str, Any]] = {}
    for arch in args.arch:
        results[arch] = run_arch(arch, s, tuple(args.sections))
        print(json.dumps(results[arch]), file=sys.stderr, flush=True)
        for path, text in ((args.json, json.dumps(results, indent=2) + "\n"), (args.md, table(results))):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    print(table(results))


if __name__ == "__main__":
    main()
