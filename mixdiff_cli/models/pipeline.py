"""The base pipeline: what a diffusers folder holds (configs only) and one loader for it, used by the
engine, the router's text encoders, fine-tune, the evaluations and the test fixtures."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixdiff_cli.core.errors import MixdiffError
from mixdiff_cli.families.base import Family, read_folder

if TYPE_CHECKING:
    from mixdiff_cli.catalog.model import Catalog


class BaseModelError(MixdiffError):
    """The base model is missing, or not a pipeline mixdiff can load or train."""


@dataclass
class BaseInfo:
    """What we know about a base from its configs, before loading any weights."""

    path: Path
    family: Family
    vae_scale: int
    size_multiple: int  # image sides must be multiples of this many pixels
    native_resolution: int

    @property
    def arch(self) -> str:
        return self.family.name


def inspect_base(path: str | Path) -> BaseInfo:
    """Check that `path` is a diffusers folder of a known family and read its geometry (configs only)."""
    from mixdiff_cli import families

    path = Path(path).expanduser()
    if not path.exists():
        raise BaseModelError(f"base model {path} does not exist", "pass --base with a diffusers pipeline folder, or fix the catalog's base")
    if path.is_file():
        raise BaseModelError(
            f"base {path} is a single-file checkpoint", "fine-tune needs a diffusers folder: convert it with diffusers' from_single_file(...).save_pretrained(DIR)"
        )
    index = path / "model_index.json"
    if not index.is_file():
        raise BaseModelError(f"{path} has no model_index.json", "pass a diffusers pipeline folder (as written by save_pretrained)")
    try:
        cls = json.loads(index.read_text())["_class_name"]
        family = families.of_folder(path)
        vae_cfg = json.loads((path / "vae" / "config.json").read_text())
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise BaseModelError(f"cannot read the configs of base {path}: {exc}", "check the folder is a complete diffusers pipeline") from None
    if family is None:
        known = " and ".join(dict.fromkeys(p for name in families.names() for p in families.get(name).pipelines))
        raise BaseModelError(f"base {path} is a {cls}", f"fine-tune trains LoRAs for {known} bases")
    config = read_folder(path, family.denoiser)[1]
    vae_scale = 2 ** (len(vae_cfg.get("block_out_channels", [0])) - 1)
    return BaseInfo(path, family, vae_scale, family.size_multiple(config, vae_scale), family.native_size(config, vae_scale))


@contextlib.contextmanager
def _loading(path: Path, hint: str) -> Iterator[None]:
    """Framework chatter off; a loader's OSError/ValueError becomes a BaseModelError naming `path`."""
    from mixdiff_cli.core.quiet import quiet_frameworks

    try:
        with quiet_frameworks():
            yield
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"could not load the base model {path}: {str(exc).splitlines()[0]}", hint) from None


def _ready(pipe: Any, device: Any) -> Any:
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(path: str | Path, dtype: Any = None, device: Any = None, *, text_only: bool = False, safety_checker: bool = True) -> Any:
    """The text-to-image pipeline in a local diffusers folder (SD 1.x/2.x, SDXL, ...): safetensors only, in
    `dtype` (None: float32), on `device` (None: where it loads), without progress bars. `text_only`
    leaves out the UNet and VAE; `safety_checker=False` leaves out an SD 1.x safety checker."""
    from mixdiff_cli import families

    path = Path(path)
    family = families.of_folder(path) or families.get(families.names()[0])  # an unknown class fails in the loader
    kwargs: dict[str, Any] = {family.denoiser: None, "vae": None} if text_only else {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if not safety_checker and "safety_checker" in json.loads((path / "model_index.json").read_text()):
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with _loading(path, "check the folder is a complete diffusers pipeline"):
        pipe = family.load(path, **kwargs)
    return _ready(pipe, device)


def load_base(catalog: Catalog, device: Any, dtype: Any, *, text_only: bool = False) -> Any:
    """The base text-to-image pipeline of `catalog` (local diffusers folder, single file or hf://)."""
    from mixdiff_cli.catalog import sources

    if catalog.base is None:
        raise BaseModelError(f"catalog {catalog.path} has no base model", "set one with 'mixdiff init --base PATH --force' or edit 'base:'")
    path = Path(sources.resolve(catalog, catalog.base.source))
    if not path.exists():
        raise BaseModelError(f"base model {path} does not exist", f"fix 'base: source:' in {catalog.path}")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BaseModelError(f"{path} is not a diffusers pipeline folder (no model_index.json)", "point 'base:' at a diffusers folder or a .safetensors checkpoint")
        return load_pipeline(path, dtype, device, text_only=text_only)
    if path.suffix != ".safetensors":
        raise BaseModelError(f"{path} is not a .safetensors checkpoint", "mixdiff never unpickles; convert it to safetensors")
    from mixdiff_cli import families

    family = families.get(catalog.base.arch or families.names()[0])
    with _loading(path, "check 'base:' in the catalog"):
        pipe = family.load_single_file(path, dtype)
    if text_only:
        setattr(pipe, family.denoiser, None)
        pipe.vae = None
    return _ready(pipe, device)
