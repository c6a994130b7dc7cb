"""Session fixtures: tiny real SD / SDXL pipelines, LoRAs in every format and a second UNet.

Built once from configs by ``mixdiff_cli.testing`` and cached on disk under ``tests/.cache/`` (or
``$MIXDIFF_TEST_CACHE``) in a folder keyed by the builders' source and the library versions, so a
changed builder rebuilds. Each fixture is built in a temporary folder and renamed into place under a
file lock: parallel or killed runs never see half a fixture.
"""

from __future__ import annotations

import hashlib
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
BUILDER_SOURCES = ("mixdiff_cli/testing.py", "mixdiff_cli/core/tokenizer.py", "mixdiff_cli/catalog/formats.py")
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


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test sees a real catalog or the network."""
    monkeypatch.setenv("MIXDIFF_CATALOG", str(tmp_path / "mixdiff-env" / "experts.yaml"))
    monkeypatch.setenv("MIXDIFF_HOME", str(tmp_path / "mixdiff-env" / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def packaged_files() -> dict[str, str]:
    """sha256 of every file under mixdiff_cli/data/, by path (a new file, such as a lock, shows too)."""
    import hashlib

    from mixdiff_cli.catalog.schema import packaged_data_dir

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

