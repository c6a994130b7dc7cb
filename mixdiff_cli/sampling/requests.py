"""The values the engine works with: requests, route members, what it records, and its errors."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from mixdiff_cli.catalog.model import Expert
from mixdiff_cli.core.errors import MixdiffError
from mixdiff_cli.routing.route import Band
from mixdiff_cli.sampling.options import BlendMode, SchedulerName

if TYPE_CHECKING:
    from mixdiff_cli.models.text import Encoded


class EngineError(MixdiffError):
    """A generation request the engine cannot run."""


class NonFiniteError(EngineError):
    """Sampling went to NaN or Inf: an expert's weights, its strength or the guidance."""


def check_finite(tensors: dict, step: int, steps: int) -> None:
    """Stop a run whose latents hold NaN or Inf: it would save a black image and exit 0."""
    import torch

    latents = tensors.get("latents")
    if latents is not None and not bool(torch.isfinite(latents).all()):
        raise NonFiniteError(f"sampling went to NaN or Inf at step {step} of {steps}; no image was written",
                             "check the experts ('mixdiff experts verify'), their weights and --guidance")


class ExpertLoadError(MixdiffError):
    """An expert's weights could not be loaded into the base."""


@dataclass
class Request:
    """One image to make. Requests in one `generate` call share the route; anything else may differ."""

    prompt: str
    negative: str | None = None
    seed: int | None = None  # None: drawn at random, recorded in the image metadata
    steps: int = 30
    guidance: float | None = None  # None: the catalog base's `guidance`, else the pipeline's default (7.5 SD 1.x, 5.0 SDXL)
    width: int | None = None  # None: the base's native size
    height: int | None = None
    scheduler: SchedulerName = "ddim"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Active:
    """An expert of the route being run: its catalog entry, mixture weight (renormalised) and, through
    `expert.default_weight`, its adapter strength."""

    expert: Expert
    weight: float
    band: Band | None = None  # the part of the run it covers (its own, else the catalog's); None: all

    @property
    def name(self) -> str:
        return self.expert.name


@dataclass
class _Stage:
    """The members that run over a span of steps (one band layout), with their text conditioning."""

    members: list[Active]  # weights renormalised among themselves
    mode: BlendMode
    encoded: Encoded  # the text conditioning the pipeline gets while this stage runs
    per_member: list[Encoded | None] | None  # member conditioning overrides (text-encoder LoRAs)
    adapted: bool = False  # encoded through a text-encoder LoRA


@dataclass
class _Loaded:
    expert: Expert
    adapter: str | None = None  # adapter name inside the base denoiser (LoRA experts)
    model: Any = None  # the expert's own denoiser (model experts)
    text_encoder: bool = False  # the LoRA also adapts a text encoder
    nbytes: int = 0


@dataclass
class RouteInfo:
    """What the image metadata records about how the experts were chosen."""

    source: Literal["router", "explicit"] = "explicit"
    decision: dict[str, Any] | None = None  # Route.to_dict() when a router decided
    extra: dict[str, Any] = field(default_factory=dict)

