"""The sparse sampling engine: one base pipeline, experts loaded only when a route needs them (LRU),
and a `Mixture` installed as the pipeline's denoiser for each run.

    engine = Engine(load_catalog("experts.yaml"))
    enc = engine.encode(["a watercolor fox"], [None])         # prompt embeds + router vector, one pass
    images = engine.generate([Request("a watercolor fox", seed=1)], [("watercolor", 1.0)], encoded=enc)
"""

from __future__ import annotations

import contextlib
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mixdiff_cli.catalog.model import Catalog
from mixdiff_cli.catalog.schema import load_catalog
from mixdiff_cli.core.errors import UsageError
from mixdiff_cli.core.runtime import pick_device, pick_dtype, versions
from mixdiff_cli.sampling.options import BLEND_MODES, MAX_SEED, SCHEDULERS, BlendMode, GenerationOptions, check_image
from mixdiff_cli.catalog.headers import sha256_file as file_sha256
from mixdiff_cli.sampling.fusion import Fusion
from mixdiff_cli.sampling.loaders import Loaders
from mixdiff_cli.sampling.planning import Planning
from mixdiff_cli.sampling.requests import Active, Request, RouteInfo, _Loaded, _Stage, check_finite
from mixdiff_cli.sampling.residency import Residency

if TYPE_CHECKING:

    from mixdiff_cli.models.text import Encoded
    from mixdiff_cli.sampling.mixture import Blend


def make_scheduler(name: str, config: Any) -> Any:
    """A fresh scheduler of kind `name` configured like the base's own."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    classes = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "euler-a": EulerAncestralDiscreteScheduler,
               "dpm++": DPMSolverMultistepScheduler}
    if name not in classes:
        raise UsageError(f"unknown scheduler {name!r}", f"use one of: {', '.join(SCHEDULERS)}")
    if name == "dpm++":  # DPM++ 2M (Lu et al. 2022, Algorithm 2)
        return classes[name].from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    return classes[name].from_config(config)



class Engine(Residency, Loaders, Fusion, Planning):
    """Loads the base once; loads experts on demand into an LRU of at most `max_loaded` experts and
    `max_memory` bytes (None: no byte limit)."""

    def __init__(
        self,
        catalog: Catalog | str | Path,
        device: str | None = None,
        dtype: str | None = None,
        max_loaded: int = 4,
        compile: bool = False,
        memory_fraction: float = 0.9,
        max_memory: int | None = None,
        allow_over_memory: bool = False,
    ):
        from mixdiff_cli.families import of_pipeline
        from mixdiff_cli.models.pipeline import load_base
        from mixdiff_cli.sampling.mixture import Mixture

        if max_loaded < 1:
            raise UsageError("--max-loaded must be at least 1", "pass --max-loaded 1 or more")
        if max_memory is not None and max_memory <= 0:
            raise UsageError(f"--max-memory must be more than 0 bytes, got {max_memory}", "e.g. --max-memory 6GB")
        self.catalog = catalog if isinstance(catalog, Catalog) else load_catalog(catalog)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.max_loaded = max_loaded
        self.max_memory = max_memory  # bytes of loaded experts (adapters and model experts' denoisers where they run)
        self.allow_over_memory = allow_over_memory  # False: a route whose experts alone pass max_memory is refused
        self.memory_fraction = memory_fraction
        self.fuse: Literal["auto", "always", "never"] = "auto"  # fuse single-LoRA and merge routes (see _fuse_pays)
        self.compile = compile
        self.pipe = load_base(self.catalog, self.device, self.dtype)
        self.family = of_pipeline(self.pipe)
        self.denoiser = getattr(self.pipe, self.family.denoiser)  # the base denoiser; adapters live in it
        self.mixture = Mixture(self.denoiser, self.family)
        self._invariance: Any = None  # the batch-invariant kernels while `batch_invariant` holds
        self.loads: list[str] = []  # every expert load, in order (tests and benchmarks read this)
        self.evictions: list[str] = []
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()  # LRU, most recent last
        self._parked: OrderedDict[str, Any] = OrderedDict()  # idle model experts waiting in CPU memory
        self._slots: list[str | None] = []  # compile mode: adapter slots reused by hotswap
        self._compiled = False
        self._active_key: tuple | None = None  # the adapter state set (set_adapters once per route, see _activate)
        self._lora_layers: list[Any] | None = None  # the UNet's LoRA layers (_fuse), until the adapters change
        self._fusion: tuple[tuple, list, list] | None = None  # (key, (weight, own data) pairs, layers) of the fused route
        self._fuse_buffers: dict[Any, Any] = {}  # base weight -> the tensor its fused copies are written into
        self._lora_on: bool | None = None  # whether the LoRA layers are enabled (None: not known)
        self._scheduler_config = self.pipe.scheduler.config
        self._schedulers: dict[str, Any] = {}
        self._hashes: dict[Path, str] = {}
        self._versions = versions()
        if compile:
            ranks = [e.rank for e in self.catalog.experts if e.kind == "lora" and e.rank]
            self.pipe.enable_lora_hotswap(target_rank=max(ranks, default=128))

    @classmethod
    def from_options(cls, catalog: Catalog, opts: GenerationOptions, device: str | None = None) -> Engine:
        """The engine a run of `opts` asks for (device, dtype, LRU budgets, compile); `device` overrides theirs."""
        return cls(catalog, device=device or opts.device, dtype=opts.dtype, max_loaded=opts.max_loaded, compile=opts.compile,
                   max_memory=opts.max_memory, allow_over_memory=opts.allow_over_memory)

    def encode(self, prompts: Sequence[str], negatives: Sequence[str | None] | None = None) -> Encoded:
        """Prompt embeds (and negatives) plus the router vector, in one pass of the bare text encoders."""
        from mixdiff_cli.models.text import bare_text_encoders, encode

        with bare_text_encoders(self.pipe):
            return encode(self.pipe, prompts, negatives, device=self.device)

    def native_size(self) -> int:
        """The base's native image side in pixels."""
        return self.family.native_size(self.denoiser.config, self.pipe.vae_scale_factor)

    def uses_cfg(self, guidance: float) -> bool:
        """Whether a run at `guidance` has an unconditional half (classifier-free guidance)."""
        return self.family.uses_cfg(self.denoiser.config, guidance)

    def scheduler_for(self, name: str) -> Any:
        """A fresh scheduler of kind `name` configured like the base's own."""
        return make_scheduler(name, self._scheduler_config)

    @contextlib.contextmanager
    def batch_invariant(self, on: bool | None = None) -> Iterator[None]:
        """Each image's bytes independent of its batch for the duration (`invariant.batch_invariant`: base,
        model experts loaded meanwhile included, text encoders, VAE). `on`: None = on CPU without compile."""
        on = self.device.type == "cpu" and not self.compile if on is None else on
        if not on or self._invariance is not None:
            yield
            return
        from mixdiff_cli.sampling.invariant import batch_invariant

        with batch_invariant(*self.mixture.denoisers(), getattr(self.pipe, "vae", None), *self.family.encoders(self.pipe)) as cover:
            self._invariance = cover
            try:
                yield
            finally:
                self._invariance = None

    @contextlib.contextmanager
    def routed(self, members: list[Active], mode: BlendMode = "noise") -> Iterator[Any]:
        """The mixture blending `members` (loaded, adapters set), to call as the base denoiser."""
        from mixdiff_cli.sampling.mixture import Blend

        self.ensure_loaded([m.name for m in members])
        slices, models, weights = self.plan(members, mode)[:3]
        with self.mixture.routed(Blend(slices=slices, models=models, weights=weights)) as mixture:
            yield mixture

    def slots(self, names: Sequence[str]) -> dict[str, tuple[str, str | None]]:
        """For loaded experts `names`: (kind, adapter name in the base denoiser or None for a model expert)."""
        return {n: (self._loaded[n].expert.kind, self._loaded[n].adapter) for n in names}

    def text_adapted(self, names: Sequence[str]) -> list[str]:
        """The loaded experts among `names` whose LoRA also adapts a text encoder."""
        return [n for n in names if self._loaded[n].text_encoder]

    def default_guidance(self) -> float:
        """The catalog base's `guidance`, else the pipeline's own default."""
        import inspect

        if self.catalog.base is not None and self.catalog.base.guidance is not None:
            return float(self.catalog.base.guidance)
        return inspect.signature(type(self.pipe).__call__).parameters["guidance_scale"].default

    def _normalise(self, requests: Iterable[Request]) -> list[Request]:
        out = []
        for req in requests:
            width, height = req.width or self.native_size(), req.height or self.native_size()
            check_image(steps=req.steps, guidance=req.guidance, width=width, height=height, scheduler=req.scheduler, seed=req.seed)
            seed = req.seed if req.seed is not None else random.randint(0, MAX_SEED)
            guidance = float(req.guidance if req.guidance is not None else self.default_guidance())
            out.append(Request(req.prompt, req.negative, seed, req.steps, guidance, width, height, req.scheduler))
        return out

    def generate(
        self,
        requests: Sequence[Request] | Request,
        route: Any = (),
        blend: BlendMode | None = None,
        *,
        encoded: Encoded | None = None,
        output_type: Literal["pil", "np"] = "pil",
        route_info: RouteInfo | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Any]:
        """Images for `requests`, all under one route: a router `Route`, [(expert, weight), ...] or names
        (weights renormalised; empty = bare base). `encoded`: `self.encode(prompts, negatives)` of the same
        requests, reused so that routing costs no second encoder pass. PIL images carry their metadata
        record in `image.info["mixdiff"]` and A1111 text in `image.info["parameters"]`."""
        from mixdiff_cli.sampling.pngmeta import a1111_parameters

        requests = [requests] if isinstance(requests, Request) else list(requests)
        if not requests:
            return []
        if blend is not None and blend not in BLEND_MODES:
            raise UsageError(f"unknown blend mode {blend!r}", f"use one of: {', '.join(BLEND_MODES)}")
        mode: BlendMode = blend or "noise"
        reqs = self._normalise(requests)
        members = self._members(route)
        self.ensure_loaded([m.name for m in members])

        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault((r.steps, r.width, r.height, r.scheduler, r.guidance), []).append(i)
        layouts, stages, explicit, label = self._stages(members, mode, reqs, list(dict.fromkeys(key[0] for key in groups)), encoded)

        results: list[Any] = [None] * len(reqs)
        total = sum(reqs[idx[0]].steps for idx in groups.values())
        done = 0
        for (steps, width, height, scheduler, guidance), idx in groups.items():
            cfg = self.uses_cfg(guidance)
            spans = [(start, stages[tuple(m.name for m in active)]) for start, active in layouts[steps]]
            blends = [self._blend(stage, idx, cfg, explicit) for _, stage in spans]
            images = self._sample(
                spans[0][1].encoded.take(idx), [reqs[i] for i in idx], [(start, stage, blend) for (start, stage), blend in zip(spans, blends)],
                (steps, width, height, scheduler, guidance), output_type, (progress, done, total),
            )
            done += steps
            for i, image in zip(idx, images):
                results[i] = image
        if output_type == "pil":
            for req, image in zip(reqs, results):
                record = self.record(req, members, label, route_info)
                image.info["mixdiff"] = record
                image.info["parameters"] = a1111_parameters(record)
        return results

    @contextlib.contextmanager
    def installed(self, denoiser: Any) -> Iterator[None]:
        """`denoiser` as the pipeline's for the duration (the mixture for a run; the plain base denoiser
        for adapter calls), then what was there before."""
        attribute = self.family.denoiser
        before = getattr(self.pipe, attribute)
        setattr(self.pipe, attribute, denoiser)
        try:
            yield
        finally:
            setattr(self.pipe, attribute, before)

    def _scheduler(self, name: str) -> Any:
        if name not in self._schedulers:
            self._schedulers[name] = make_scheduler(name, self._scheduler_config)
        return self._schedulers[name]

    def _sample(self, enc: Encoded, reqs: list[Request], spans: list[tuple[int, _Stage, Blend]], settings: tuple,
                output_type: str, progress: tuple[Any, int, int]) -> list[Any]:
        """One pipeline call. `spans`: (first step, stage, blend) in order; at the end of the step before
        each later span the callback activates its adapters (`plan`) and hands its blend to the mixture,
        so both sets stay loaded and a switch costs one `set_adapters`."""
        import torch

        steps, width, height, scheduler, guidance = settings
        tick, done, total = progress
        generators = [torch.Generator(device=self.device).manual_seed(r.seed) for r in reqs]  # one per image
        self.pipe.scheduler = self._scheduler(scheduler)
        starts = {start: (stage, blend) for start, stage, blend in spans[1:]}

        cfg = self.uses_cfg(guidance)
        scale = self.pipe.vae_scale_factor
        tokens = len(reqs) * (2 if cfg else 1) * steps * (height // scale) * (width // scale)  # through the UNet

        def activate(stage: _Stage) -> None:  # each one-LoRA (or merged) stage fused while it runs, where that pays
            self._fuse(self._apply(stage.members, stage.mode)[4], tokens)

        def on_step(pipe: Any, i: int, t: Any, tensors: dict) -> dict:
            check_finite(tensors, i + 1, steps)
            if i + 1 in starts:
                stage, blend = starts[i + 1]
                with self.installed(self.denoiser):  # adapter calls need the plain denoiser in the pipeline
                    activate(stage)
                self.mixture.switch(blend)
            if tick is not None:
                tick(done + i + 1, total)
            return tensors

        _, stage, blend = spans[0]
        activate(stage)
        with self.installed(self.mixture), self.mixture.routed(blend):
            out = self.pipe(
                **enc.pipeline_kwargs(),
                num_inference_steps=steps,
                guidance_scale=guidance,
                width=width,
                height=height,
                generator=generators,
                output_type=output_type,
                callback_on_step_end=on_step,
            )
        images = out.images
        return list(images) if output_type == "pil" else [images[i] for i in range(len(reqs))]

    def _hash(self, path: Path) -> str:
        path = Path(path)
        if path not in self._hashes:
            self._hashes[path] = file_sha256(path)
        return self._hashes[path]

    def record(self, req: Request, members: list[Active], label: str, info: RouteInfo | None = None) -> dict[str, Any]:
        """Everything needed to reproduce one image (the `mixdiff` PNG chunk)."""
        info = info or RouteInfo()
        cat = self.catalog
        router = None
        if info.source == "router" and cat.router_path() is not None and cat.router_path().is_file():
            router = {"checkpoint": cat.router, "sha256": self._hash(cat.router_path())}
        return {
            "format": "mixdiff/1",
            "prompt": req.prompt,
            "negative": req.negative,
            "seed": req.seed,
            "steps": req.steps,
            "guidance": req.guidance,
            "width": req.width,
            "height": req.height,
            "scheduler": req.scheduler,
            "blend": label,
            "experts": [
                {"name": m.name, "weight": m.weight, "strength": m.expert.default_weight, "kind": m.expert.kind,
                 "format": m.expert.format, "sha256": m.expert.sha256, "source": m.expert.source,
                 **({"band": list(m.band)} if m.band is not None else {})}
                for m in members
            ],
            "route": {"source": info.source, "decision": info.decision, "router": router, **info.extra},
            "base": cat.base.to_dict() if cat.base else None,
            "catalog": {"path": str(cat.path), "hash": cat.hash()},
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "versions": self._versions,
        }
