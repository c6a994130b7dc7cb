"""Tiny real pipelines, built by their families from configs, and the helpers every fixture uses: a cache
folder built once, loading a fixture's pipeline or one of its components, fixed random streams."""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mixdiff_cli import families
from mixdiff_cli.core.fsutil import atomic_folder
from mixdiff_cli.models.pipeline import load_pipeline as _load_pipeline

# A small general vocabulary, meant to be one token per word (see mixdiff_cli.core.tokenizer).
VOCAB: tuple[str, ...] = tuple(
    """
    a an the of in on at with and or by for to from over under near behind
    photo picture painting drawing sketch render illustration portrait landscape closeup poster
    anime cartoon watercolor oil pixel art style realistic photorealistic cinematic detailed vintage
    red orange yellow green blue purple pink brown black white gray grey gold silver colorful dark bright
    circle square triangle star heart stripes stripe dots pattern shape shapes background
    cat dog bird horse fish car house tree flower mountain river sea sky city street forest
    man woman person girl boy face robot castle dragon night day sunset snow rain
    small big tiny large old new beautiful cute happy
    high quality best low blurry ugly
    """.split()
)


def own_rng(fn: Callable) -> Callable:
    """Run `fn` (which seeds torch's global RNG) without changing the caller's random stream."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.random.fork_rng(devices=[]):
            return fn(*args, **kwargs)

    return wrapper


@own_rng
def build_tiny(family: str, folder: str | Path, seed: int = 0, words: Iterable[str] = VOCAB) -> Path:
    """Write `family`'s tiny pipeline folder (`Family.build_tiny`) atomically; returns the folder."""
    with atomic_folder(folder) as tmp:
        families.get(family).build_tiny(tmp, seed, words)
    return Path(folder)


def build_tiny_sd(folder: str | Path, seed: int = 0, words: Iterable[str] = VOCAB) -> Path:
    """The tiny SD 1.x pipeline (~1M-param UNet, 64x64 images)."""
    return build_tiny("sd1", folder, seed, words)


def build_tiny_sdxl(folder: str | Path, seed: int = 0, words: Iterable[str] = VOCAB) -> Path:
    """The tiny SDXL pipeline (two text encoders, micro-conditioned UNet)."""
    return build_tiny("sdxl", folder, seed, words)


def cached(root: str | Path, name: str, build: Callable[[Path], object]) -> Path:
    """`root/name`, first running `build(folder)` into a temporary folder renamed into place.

    A `.complete` marker and a file lock make parallel or killed runs see a whole fixture or none.
    """
    from filelock import FileLock

    root = Path(root)
    target = root / name
    if (target / ".complete").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{name}.lock")):
        if (target / ".complete").is_file():  # another process built it while we waited
            return target
        with atomic_folder(target) as tmp:  # replaces one left by a builder that died before its .complete
            build(tmp)
            (tmp / ".complete").touch()
    return target


def load_pipeline(pipe_folder: str | Path) -> Any:
    """Load a tiny fixture with plain diffusers (float32, CPU, no progress bar)."""
    import torch

    return _load_pipeline(pipe_folder, torch.float32)


def family_of(pipe_folder: str | Path) -> families.Family:
    family = families.of_folder(Path(pipe_folder))
    if family is None:
        raise ValueError(f"{pipe_folder} is not a pipeline folder of a known family")
    return family


def component_class(pipe_folder: str | Path, component: str) -> Any:
    """The class `model_index.json` names for `component` (`["diffusers", "AutoencoderKL"]` -> the class)."""
    library, name = json.loads((Path(pipe_folder) / "model_index.json").read_text())[component]
    return getattr(importlib.import_module(library), name)


def load_component(pipe_folder: str | Path, component: str) -> Any:
    """One component of a pipeline folder, loaded as `from_pretrained` loads it (float32, CPU)."""
    return component_class(pipe_folder, component).from_pretrained(Path(pipe_folder) / component, local_files_only=True)


def set_prediction_type(pipe_folder: str | Path, prediction_type: str) -> None:
    """Make a pipeline folder's scheduler predict `prediction_type` (`epsilon` / `v_prediction`)."""
    config_file = Path(pipe_folder) / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "prediction_type": prediction_type}, indent=2))
