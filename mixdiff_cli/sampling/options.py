"""Generation options as one value: built by the CLI (or a Python user), taken by `generate_images`,
`run_batch` and `evaluate_samples`, checked in one place. Import-light: no torch here."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from mixdiff_cli.core.errors import UsageError
from mixdiff_cli.routing.route import Member, OnStale, band_steps, check_routing, format_band, parse_members

SchedulerName = Literal["ddim", "euler", "euler-a", "dpm++"]
BlendMode = Literal["noise", "merge"]
BandsMode = Literal["none", "auto"]
SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)
BLEND_MODES: tuple[str, ...] = get_args(BlendMode)
MAX_SEED = 2**32 - 1
DEFAULT_STEPS = 30
# Upper bounds, so that a typo is an error and not an hour-long hang or a 14 GB allocation: the schedulers
# have 1,000 training timesteps; guidance past 100 only saturates; a side of 8,192 px is 16x SDXL's.
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0
MAX_SIDE = 8192
DEFAULT_SCHEDULER: SchedulerName = "ddim"


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes from a size: "6GB" (powers of 10), "512MiB" (powers of 2), "1.5 gb" or a plain number of bytes."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise UsageError(f"{text!r} is not a memory size", "write a number and a unit, e.g. 6GB, 512MiB or 1.5GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def check_image(*, steps: int | None = None, guidance: float | None = None, width: int | None = None,
                height: int | None = None, scheduler: str | None = None, seed: int | None = None) -> None:
    """Per-image values in range (None: not given, the default applies)."""
    if steps is not None and not 1 <= steps <= MAX_STEPS:
        raise UsageError(f"--steps must be 1 to {MAX_STEPS}, got {steps}", "pass e.g. --steps 30")
    if guidance is not None and not (0 <= guidance <= MAX_GUIDANCE and math.isfinite(guidance)):
        raise UsageError(f"--guidance must be a number from 0 to {MAX_GUIDANCE:g}, got {guidance}", "e.g. --guidance 7.5")
    for name, size in (("width", width), ("height", height)):
        if size is not None and (size <= 0 or size % 8):
            raise UsageError(f"--{name} {size} is not a positive multiple of 8", f"pass e.g. --{name} 512")
        if size is not None and size > MAX_SIDE:
            raise UsageError(f"--{name} {size} is over {MAX_SIDE} pixels", f"pass at most --{name} {MAX_SIDE}")
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise UsageError(f"unknown scheduler {scheduler!r}", f"use one of: {', '.join(SCHEDULERS)}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise UsageError(f"--seed {seed} is out of range", f"use 0 to {MAX_SEED}")


@dataclass
class GenerationOptions:
    """Everything a generation takes besides its prompts and output folder. None means the default:
    the value recorded in the image under `--from`, else the catalog base's, else the pipeline's."""

    # each image
    negative: str | None = None
    steps: int | None = None  # None: 30
    guidance: float | None = None  # None: the catalog base's `guidance`, else 7.5 (SD) / 5.0 (SDXL)
    seed: int | None = None  # None: drawn once; image i of a run gets seed + i
    width: int | None = None  # None: the base's native size
    height: int | None = None
    scheduler: SchedulerName | None = None  # None: ddim
    # how many, and how many at once
    num_images: int = 1
    batch_size: int = 1
    # the route: fixed experts (NAME[:WEIGHT] specs or Members), else the router's top-k
    experts: tuple[Member, ...] = ()
    top_k: int = 1
    temperature: float = 1.0
    threshold: float | None = None  # None: the router's calibrated abstention; a number: abstain when no expert has p >= it
    abstain: bool = True  # False: always route to an expert (--no-abstain)
    encoder: str | None = None  # the router's prompt encoder; None: the checkpoint's
    on_stale: OnStale = "error"
    blend: BlendMode | None = None  # None: noise
    bands: BandsMode = "none"  # auto: the router's experts take consecutive parts of the run (routing.route.spread_bands)
    # the engine
    device: str | None = None
    dtype: str | None = None
    max_loaded: int = 4
    max_memory: int | None = None  # bytes the loaded experts may take (LRU, beside max_loaded); None: no limit
    allow_over_memory: bool = False  # a route whose experts alone pass max_memory runs anyway (else it is refused)
    compile: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # room for callers' own settings (recorded, not read)

    def __post_init__(self) -> None:
        self.experts = parse_members(self.experts)

    def updated(self, **changes: Any) -> GenerationOptions:
        return replace(self, **changes)

    def check(self, n_experts: int = 0) -> GenerationOptions:
        """Every value in range (`n_experts`: the catalog's count, for --top-k); returns self."""
        check_image(steps=self.steps, guidance=self.guidance, width=self.width, height=self.height,
                    scheduler=self.scheduler, seed=self.seed)
        if self.num_images < 1 or self.batch_size < 1:
            raise UsageError("--num-images and --batch-size must be at least 1", "pass 1 or more")
        if self.blend is not None and self.blend not in BLEND_MODES:
            raise UsageError(f"unknown blend mode {self.blend!r}", f"use one of: {', '.join(BLEND_MODES)}")
        if self.bands not in get_args(BandsMode):
            raise UsageError(f"unknown --bands {self.bands!r}", "use none or auto")
        if self.on_stale not in get_args(OnStale):
            raise UsageError(f"unknown on_stale {self.on_stale!r}", "use error or prototypes")
        if self.max_loaded < 1:
            raise UsageError("--max-loaded must be at least 1", "pass --max-loaded 1 or more")
        if self.max_memory is not None and self.max_memory <= 0:
            raise UsageError(f"--max-memory must be more than 0 bytes, got {self.max_memory}", "e.g. --max-memory 6GB")
        check_routing(self.top_k, self.temperature, self.threshold, n_experts)
        steps = self.steps or DEFAULT_STEPS
        for m in self.experts:  # a band that holds no step fails here, before any model loads
            if m.band is not None and not band_steps(m.band, steps):
                raise UsageError(f"expert {m.expert}'s band {format_band(m.band)} holds no step of the {steps}-step run",
                                 f"widen it to at least 1/{steps} of the run, or raise --steps")
        return self
