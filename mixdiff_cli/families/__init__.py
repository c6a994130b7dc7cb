"""Model families, one module each, behind one interface (`base.Family`), and their registry. A new family
is one module that subclasses `Family` and calls `register`; nothing else in mixdiff names it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mixdiff_cli.core.errors import MixdiffError
from mixdiff_cli.families.base import Family, read_folder
from mixdiff_cli.families.sd1 import SD1, SD2
from mixdiff_cli.families.sdxl import SDXL

_REGISTRY: dict[str, Family] = {}


class UnknownFamily(MixdiffError):
    """A model of no registered family."""


def register(family: Family) -> Family:
    """Make `family` known to every part of mixdiff (a later registration of the same name replaces it)."""
    _REGISTRY[family.name] = family
    return family


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> Family:
    """The family called `name` (a catalog's `arch`)."""
    if name not in _REGISTRY:
        raise UnknownFamily(f"unknown model family {name!r}", f"use one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def detect(pipeline: str, denoiser_config: Mapping[str, Any]) -> Family | None:
    """The family of a `pipeline` class whose denoiser has `denoiser_config`, None if none claims it."""
    return next((f for f in _REGISTRY.values() if f.matches(pipeline, denoiser_config)), None)


def of_folder(path: Path) -> Family | None:
    """The family of a diffusers folder, from its JSON files."""
    for denoiser in dict.fromkeys(f.denoiser for f in _REGISTRY.values()):
        cls, config = read_folder(path, denoiser)
        if config and (family := detect(cls, config)) is not None:
            return family
    return None


def of_pipeline(pipe: Any) -> Family:
    """The family of a loaded pipeline."""
    cls = type(pipe).__name__
    for family in _REGISTRY.values():
        denoiser = getattr(pipe, family.denoiser, None)
        config = dict(getattr(denoiser, "config", None) or {})
        if family.matches(cls, config) and (config or cls in family.pipelines):
            return family
    raise UnknownFamily(f"a {cls} is of no model family mixdiff knows", f"known families: {', '.join(_REGISTRY)}")


for _family in (SD1(), SD2(), SDXL()):
    register(_family)
