"""Session fixtures: tiny real SD / SDXL pipelines, LoRAs in every format and a second UNet.

Built once from configs by ``mixdiff_cli.testing`` and cached on disk under ``tests/.cache/`` (or
``$MIXDIFF_TEST_CACHE``) in a folder keyed by the builders' source and the library versions, so a
changed builder rebuilds. Each fixture is built in a temporary folder and renamed into place under a
file lock: parallel or killed runs never see half a fixture.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import pytest

# Before anything imports huggingface_hub (it reads these once): never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# One intra-op thread unless told otherwise: on a busy 2-core machine two spinning OpenMP threads turn a
# 0.15 s tiny generation into 10 s; one thread stays under 1 s. Must be set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
FIXTURE_VERSION = "1"  # bump to force a rebuild without a source change
# Sources whose change invalidates the cache (formats.py: the single-file writer uses its name map).
BUILDER_SOURCES = (*sorted(str(p.relative_to(REPO)) for p in (REPO / "mixdiff_cli" / "testing").glob("*.py")),
                   "mixdiff_cli/families/unet_tiny.py", "mixdiff_cli/families/unet_checkpoint.py", "mixdiff_cli/core/tokenizer.py",
                   "mixdiff_cli/catalog/formats.py", "mixdiff_cli/catalog/geometry.py")
PACKAGES = ("torch", "diffusers", "transformers", "peft", "safetensors")

# (arch, format) -> how each fixture LoRA is made; every one is rank 4 on to_q/to_k/to_v/to_out.0.
LORA_SPECS: dict[tuple[str, str], dict] = {
    ("sd1", "diffusers"): {"seed": 11, "alpha": 4.0, "metadata": None},
    ("sd1", "peft"): {"seed": 12, "alpha": 8.0, "metadata": None},
    ("sd1", "kohya"): {
        "seed": 13,
        "alpha": 2.0,
        "metadata": {
            "ss_network_dim": "4",
            "ss_network_alpha": "2",
            "ss_output_name": "pixel_style",
            "ss_base_model_version": "sd_v1",
            "ss_tag_frequency": '{"10_pixel": {"pixel art": 10, "cat": 4, "red": 2}}',
        },
    },
    ("sdxl", "diffusers"): {
        "seed": 21,
        "alpha": 4.0,
        "metadata": {
            "modelspec.title": "Tiny XL Ink",
            "modelspec.trigger_phrase": "inkd, ink drawing",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.description": "black ink drawings",
        },
    },
    ("sdxl", "peft"): {"seed": 22, "alpha": 8.0, "metadata": None},
    ("sdxl", "kohya"): {"seed": 23, "alpha": 4.0, "metadata": {"ss_base_model_version": "sdxl_base_v1-0"}},
}
LORA_RANK = 4
# LoRAs on the UNet and the text encoder(s): (arch, format) -> seed.
LORA_TE_SPECS: dict[tuple[str, str], int] = {("sd1", "diffusers"): 31, ("sd1", "kohya"): 32, ("sdxl", "diffusers"): 41, ("sdxl", "kohya"): 42}


def cache_key() -> str:
    """``v<FIXTURE_VERSION>-<hash of builder sources and package versions>``."""
    h = hashlib.sha256()
    for rel in BUILDER_SOURCES:
        h.update((REPO / rel).read_bytes())
    for pkg in PACKAGES:
        h.update(f"{pkg}=={metadata.version(pkg)};".encode())
    return f"v{FIXTURE_VERSION}-{h.hexdigest()[:12]}"


def cache_root() -> Path:
    parent = Path(os.environ.get("MIXDIFF_TEST_CACHE") or REPO / "tests" / ".cache")
    root = parent / cache_key()
    _prune_stale(parent, keep=root.name)
    return root


def _prune_stale(parent: Path, keep: str, age_s: float = 3600) -> None:
    """Delete other fixture versions untouched for an hour (a concurrent run of another version keeps its own)."""
    import shutil
    import time

    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        if entry.name != keep and entry.name.startswith("v") and entry.is_dir() and time.time() - entry.stat().st_mtime > age_s:
            shutil.rmtree(entry, ignore_errors=True)


def cached(name: str, build: Callable[[Path], object]) -> Path:
    from mixdiff_cli.testing import cached as build_once

    return build_once(cache_root(), name, build)


def _lora_name(arch: str, fmt: str, te: bool = False) -> str:
    return f"{arch}-{fmt}{'-te' if te else ''}" + ("" if fmt == "peft" else ".safetensors")


def _build_loras(folder: Path, pipes: dict[str, Path]) -> None:
    from mixdiff_cli.testing import make_lora

    for (arch, fmt), spec in LORA_SPECS.items():
        make_lora(pipes[arch], folder / _lora_name(arch, fmt), fmt=fmt, rank=LORA_RANK, seed=spec["seed"], alpha=spec["alpha"], metadata=spec["metadata"])
    for (arch, fmt), seed in LORA_TE_SPECS.items():
        make_lora(pipes[arch], folder / _lora_name(arch, fmt, te=True), fmt=fmt, rank=LORA_RANK, seed=seed, text_encoder=True)


@pytest.fixture(scope="session")
def tiny_sd() -> Path:
    """A StableDiffusionPipeline folder (64x64 images, whole-word tokenizer)."""
    from mixdiff_cli.testing import build_tiny_sd

    return cached("sd", build_tiny_sd)


@pytest.fixture(scope="session")
def tiny_sdxl() -> Path:
    """A StableDiffusionXLPipeline folder (two text encoders, text_time UNet)."""
    from mixdiff_cli.testing import build_tiny_sdxl

    return cached("sdxl", build_tiny_sdxl)


@pytest.fixture(scope="session")
def _lora_dir(tiny_sd, tiny_sdxl) -> Path:
    return cached("loras", lambda folder: _build_loras(folder, {"sd1": tiny_sd, "sdxl": tiny_sdxl}))


@pytest.fixture(scope="session")
def lora_files(_lora_dir) -> dict[tuple[str, str], Path]:
    """(arch, format) -> UNet LoRA: a .safetensors file, or the folder for "peft". See LORA_SPECS."""
    return {key: _lora_dir / _lora_name(*key) for key in LORA_SPECS}


@pytest.fixture(scope="session")
def lora_te_files(_lora_dir) -> dict[tuple[str, str], Path]:
    """(arch, format) -> LoRA on the UNet and the text encoder(s), for "diffusers" and "kohya"."""
    return {key: _lora_dir / _lora_name(*key, te=True) for key in LORA_TE_SPECS}


@pytest.fixture(scope="session")
def lora_specs() -> dict[tuple[str, str], dict]:
    """How each ``lora_files`` entry was made: seed, alpha, metadata (rank is LORA_RANK)."""
    return {key: {**spec, "rank": LORA_RANK} for key, spec in LORA_SPECS.items()}


def _build_full(folder: Path, pipe: Path) -> None:
    from mixdiff_cli.testing import make_full_model

    make_full_model(pipe, folder / "unet", seed=7, single_file=folder / "tiny-sd-other.safetensors")


@pytest.fixture(scope="session")
def _full_dir(tiny_sd) -> Path:
    return cached("full", lambda folder: _build_full(folder, tiny_sd))


@pytest.fixture(scope="session")
def full_model(_full_dir) -> Path:
    """A diffusers UNet folder: same config as ``tiny_sd``'s UNet, other weights (a ``kind: model`` expert)."""
    return _full_dir / "unet"


@pytest.fixture(scope="session")
def full_model_file(_full_dir) -> Path:
    """The same UNet as ``full_model`` as one original-layout ``.safetensors`` (model.diffusion_model.*)."""
    return _full_dir / "tiny-sd-other.safetensors"


# The compatibility corpus (tests/test_compat.py): (arch, layout) -> seed of a rank-4 LoRA with alpha 2, in
# mixdiff_cli.testing.make_layout's layouts. Pairs that share a seed hold the same weights: the reference for a
# layout diffusers cannot load is the same LoRA in one it can (attn-procs ~ diffusers-noalpha, alphas ~ kohya).
COMPAT_SPECS: dict[tuple[str, str], int] = {
    ("sd1", "diffusers-peft"): 101, ("sd1", "diffusers-noalpha"): 102, ("sd1", "attn-procs"): 102,
    ("sd1", "diffusers-script"): 103, ("sd1", "kohya"): 104, ("sd1", "diffusers-alphas"): 104, ("sd1", "kohya-locon"): 105,
    ("sd1", "kohya-fp16"): 106, ("sd1", "kohya-bf16"): 107, ("sd1", "kohya-te"): 108, ("sd1", "peft"): 109,
    ("sd1", "peft-modules-to-save"): 110,
    ("sdxl", "diffusers-script"): 201, ("sdxl", "kohya"): 202, ("sdxl", "kohya-te"): 203, ("sdxl", "diffusers-peft"): 204,
}  # fmt: skip
COMPAT_ALPHA, COMPAT_SCALE = 2.0, 0.1
FULL_LAYOUTS = (("sd1", "fp16-variant"), ("sd1", "single-file"), ("sdxl", "single-file"), ("sd1", "v-prediction"),
                ("sd1", "inpainting"), ("sd1", "inpainting-file"))  # fmt: skip


def _compat_name(arch: str, layout: str) -> str:
    folder = layout.startswith("peft") or layout in ("fp16-variant", "v-prediction", "inpainting")
    return f"{arch}-{layout}" + ("" if folder else ".safetensors")


def _build_compat(folder: Path, pipes: dict[str, Path]) -> None:
    from mixdiff_cli.testing import REFUSED, make_full_layout, make_layout, make_refused

    for (arch, layout), seed in COMPAT_SPECS.items():
        make_layout(pipes[arch], folder / _compat_name(arch, layout), layout, seed=seed, alpha=COMPAT_ALPHA, scale=COMPAT_SCALE)
    for kind in REFUSED:
        make_refused(pipes["sd1"], folder / _compat_name("sd1", kind), kind)
    for arch, kind in FULL_LAYOUTS:
        make_full_layout(pipes[arch], folder / _compat_name(arch, kind), kind)


@pytest.fixture(scope="session")
def compat_files(tiny_sd, tiny_sdxl) -> dict[tuple[str, str], Path]:
    """(arch, layout) -> a file (or folder) of the compatibility corpus: COMPAT_SPECS' LoRAs, the refused
    adapter kinds (testing.REFUSED, on sd1) and FULL_LAYOUTS' full models."""
    from mixdiff_cli.testing import REFUSED

    folder = cached("compat", lambda f: _build_compat(f, {"sd1": tiny_sd, "sdxl": tiny_sdxl}))
    keys = [*COMPAT_SPECS, *(("sd1", k) for k in REFUSED), *FULL_LAYOUTS]
    return {key: folder / _compat_name(*key) for key in keys}


def _build_real(folder: Path) -> None:
    from mixdiff_cli.catalog.geometry import public_configs
    from mixdiff_cli.testing import write_real_checkpoint, write_real_lora

    for name, (_, configs) in public_configs().items():
        for layout in ("kohya", "diffusers-script"):
            write_real_lora(name, folder / f"{name}-{layout}.safetensors", layout)
        write_real_checkpoint(name, folder / f"{name}-checkpoint.safetensors")
        write_real_checkpoint(name, folder / f"{name}-inpainting.safetensors", in_channels=9)
        base = folder / f"{name}-base"  # a pipeline folder of configs only: enough for init and add-expert
        for component, config in configs.items():
            file = base / component / ("scheduler_config.json" if component == "scheduler" else "config.json")
            file.parent.mkdir(parents=True)
            file.write_text(json.dumps(config))
        (base / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline" if name == "sdxl" else "StableDiffusionPipeline"}))


@pytest.fixture(scope="session")
def real_geometry() -> Path:
    """Header-only files in the real SD 1.5 / SD 2.1 / SDXL geometry (sparse data: a header costs the disk):
    ``<name>-kohya``, ``<name>-diffusers-script`` LoRAs, ``<name>-checkpoint`` / ``<name>-inpainting`` single
    files, and ``<name>-base`` pipeline folders holding only the public configs."""
    return cached("real-geometry", _build_real)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test sees a real catalog or the network."""
    monkeypatch.setenv("MIXDIFF_CATALOG", str(tmp_path / "mixdiff-env" / "experts.yaml"))
    monkeypatch.setenv("MIXDIFF_HOME", str(tmp_path / "mixdiff-env" / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def packaged_files() -> dict[str, str]:
    """sha256 of every file under mixdiff_cli/data/, by path (a new file, such as a lock, shows too)."""
    import hashlib

    from mixdiff_cli.catalog.discovery import packaged_data_dir

    root = packaged_data_dir()
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def no_catalog(tmp_path, monkeypatch) -> Path:
    """Nothing to discover but the packaged demo: empty HOME, data folders and working directory (tmp/cwd)."""
    monkeypatch.delenv("MIXDIFF_CATALOG", raising=False)
    for var, folder in (("HOME", "home"), ("MIXDIFF_HOME", "mixdiff-home"), ("XDG_DATA_HOME", "xdg")):
        (tmp_path / folder).mkdir()
        monkeypatch.setenv(var, str(tmp_path / folder))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path

