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


def of_config(denoiser_config: Mapping[str, Any]) -> Family:
    """The family of a bare denoiser config (a model expert's folder); the first family if none claims it."""
    return next((f for f in _REGISTRY.values() if f.claims_config(denoiser_config)), _first())


def is_denoiser_config(config: Mapping[str, Any]) -> bool:
    """Whether `config` is a denoiser config of any family."""
    return any(f.is_denoiser_config(config) for f in _REGISTRY.values())


def _first() -> Family:
    return next(iter(_REGISTRY.values()))


_EVIDENCE = {0: "keys", 1: "shapes", 2: "metadata", 3: "shapes"}


def _strongest(evidence: dict[str, int | None]) -> tuple[str, str] | None:
    found = [(rank, i, name) for i, (name, rank) in enumerate(evidence.items()) if rank is not None]
    return (min(found)[2], _EVIDENCE[min(found)[0]]) if found else None


def of_lora(modules: list[Any], meta: Mapping[str, str], sidecar: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(family name, evidence: keys, shapes, metadata or default) of a LoRA's modules and metadata."""
    if not modules:
        found = _strongest({n: 2 if f.from_metadata(meta, sidecar) else None for n, f in _REGISTRY.items()})
        return found or (None, "metadata")
    return _strongest({n: f.lora_evidence(modules, meta, sidecar) for n, f in _REGISTRY.items()}) or (_first().name, "default")


def of_checkpoint(header: Mapping[str, dict], meta: Mapping[str, str]) -> tuple[str, str]:
    """(family name, evidence) of a whole single-file checkpoint."""
    return _strongest({n: f.checkpoint_evidence(header, meta) for n, f in _REGISTRY.items()}) or (_first().name, "default")


def kohya_prefixes() -> tuple[tuple[str, str], ...]:
    """Every family's kohya key prefixes (longest first, so `lora_te2_` is tried before `lora_te_`)."""
    pairs = dict.fromkeys(p for f in _REGISTRY.values() for p in f.kohya_prefixes)
    return tuple(sorted(pairs, key=lambda p: -len(p[0])))


def checkpoint_prefixes() -> tuple[str, ...]:
    return tuple(dict.fromkeys(p for f in _REGISTRY.values() for p in f.checkpoint_prefixes))


def components() -> tuple[str, ...]:
    """Every pipeline component a LoRA file may name (denoisers, text encoders)."""
    return tuple(dict.fromkeys(p for f in _REGISTRY.values() for p in f.lora_prefixes()))


def label(name: str | None) -> str:
    """How users read a family name."""
    return _REGISTRY[name].label if name in _REGISTRY else str(name)


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
