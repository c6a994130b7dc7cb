"""The sparse sampling engine: one base pipeline, experts loaded only when a route needs them (LRU),
and a `MixtureUNet` installed as the pipeline's denoiser for each run.

    engine = Engine(load_catalog("experts.yaml"))
    enc = engine.encode(["a watercolor fox"], [None])         # prompt embeds + router vector, one pass
    images = engine.generate([Request("a watercolor fox", seed=1)], [("watercolor", 1.0)], encoded=enc)
"""

from __future__ import annotations

import contextlib
import json
import random
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from mixdiff_cli.catalog import sources
from mixdiff_cli.catalog.schema import Catalog, Expert, load_catalog
from mixdiff_cli.core.errors import MixdiffError, MixdiffWarning, UsageError
from mixdiff_cli.core.runtime import pick_device, pick_dtype, versions
from mixdiff_cli.routing.route import Band, band_steps, check_known, format_band, parse_members, renormalise
from mixdiff_cli.sampling.options import BLEND_MODES, MAX_SEED, SCHEDULERS, BlendMode, SchedulerName, check_image
from mixdiff_cli.catalog.formats import sha256_file as file_sha256

if TYPE_CHECKING:
    import torch

    from mixdiff_cli.models.text import Encoded
    from mixdiff_cli.sampling.mixture import Blend



# Fusing a LoRA on CPU (Engine._fuse_pays): always when its layers average at most this many base-weight
# elements (a LoRA layer's fixed per-call cost dominates there); else when what the run's unfused LoRA layers
# would cost passes the fuse. Both costs measured on SD 1.5 geometry, one thread (benchmarks/bench_scale.py
# --sections speed fused): a fuse 0.40 s for 267M targeted weights; unfused, a rank-32 LoRA (13.6M
# parameters) adds 0.22 s to a denoiser call over 2 x 1024 latent tokens (256 px with CFG).
_CPU_FUSE_MAX_PER_LAYER = 400_000
_CPU_FUSE_S_PER_WEIGHT = 1.5e-9
_CPU_LORA_S_PER_PARAM_TOKEN = 7.9e-12


def _plus_delta(module: Any, adapter: str, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`weight` + the LoRA layer's delta for `adapter` (PEFT's get_delta_weight: scale * B @ A), written into
    `out` (a tensor like `weight`), or into `weight` itself when `out` is None. Linear and 1x1 conv layers
    take one addmm (one pass over the weight, no delta tensor); the rest (3x3 convs, half precision on CPU)
    PEFT's own delta."""
    import torch

    a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    flat = weight.dim() == 2 or weight.shape[2:] == (1, 1)
    exact_dtype = a.dtype == b.dtype == weight.dtype and (weight.dtype == torch.float32 or weight.device.type != "cpu")
    if flat and exact_dtype and not getattr(module, "fan_in_fan_out", False):
        w2, b2, a2 = weight.flatten(1), b.flatten(1), a.flatten(1)
        if out is None:
            w2.addmm_(b2, a2, alpha=module.scaling[adapter])
            return weight
        torch.addmm(w2, b2, a2, alpha=module.scaling[adapter], out=out.view(w2.shape))
        return out
    delta = module.get_delta_weight(adapter).to(weight.dtype)
    return weight.add_(delta) if out is None else torch.add(weight, delta, out=out)


class EngineError(MixdiffError):
    """A generation request the engine cannot run."""


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
    adapter: str | None = None  # adapter name inside the base UNet (LoRA experts)
    unet: Any = None  # the expert's own UNet (model experts)
    text_encoder: bool = False  # the LoRA also adapts a text encoder
    nbytes: int = 0


@dataclass
class RouteInfo:
    """What the image metadata records about how the experts were chosen."""

    source: Literal["router", "explicit"] = "explicit"
    decision: dict[str, Any] | None = None  # Route.to_dict() when a router decided
    extra: dict[str, Any] = field(default_factory=dict)


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


class Engine:
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
    ):
        from mixdiff_cli.models.pipeline import load_base
        from mixdiff_cli.sampling.mixture import MixtureUNet

        if max_loaded < 1:
            raise UsageError("--max-loaded must be at least 1", "pass --max-loaded 1 or more")
        if max_memory is not None and max_memory <= 0:
            raise UsageError(f"--max-memory must be more than 0 bytes, got {max_memory}", "e.g. --max-memory 6GB")
        self.catalog = catalog if isinstance(catalog, Catalog) else load_catalog(catalog)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.max_loaded = max_loaded
        self.max_memory = max_memory  # bytes of loaded experts (adapters and model UNets where they run)
        self.memory_fraction = memory_fraction
        self.fuse: Literal["auto", "always", "never"] = "auto"  # fuse single-LoRA and merge routes (see _fuse_pays)
        self.compile = compile
        self.pipe = load_base(self.catalog, self.device, self.dtype)
        self.unet = self.pipe.unet  # the base UNet; adapters live in it
        self.mixture = MixtureUNet(self.unet)
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

    # ----------------------------------------------------------------------------------- experts

    @property
    def adapters(self) -> list[str]:
        """LoRA adapters present in the base UNet."""
        return list(getattr(self.unet, "peft_config", {}) or {})

    @property
    def loaded(self) -> list[str]:
        """Loaded experts, least recently used first."""
        return list(self._loaded)

    def _members(self, route: Any) -> list[Active]:
        """A Route, Members, (name, weight) pairs or names -> the experts with weights summing to 1, each
        with its band (the member's, else the catalog's default band)."""
        given = route.members if hasattr(route, "members") else parse_members(route or ())
        check_known(given, self.catalog.names)
        bands = {m.expert: m.band for m in given}
        pairs = renormalise([(m.expert, m.weight) for m in given]) if given else []
        out = []
        for name, weight in pairs:
            expert = self.catalog.expert(name)
            default = tuple(expert.band) if expert.band and tuple(expert.band) != (0.0, 1.0) else None
            out.append(Active(expert, weight, bands.get(name) or default))  # type: ignore[arg-type]
        return out

    def ensure_loaded(self, names: Sequence[str]) -> None:
        """Load the experts `names` (others stay as they are), evicting least recently used ones."""
        for name in names:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                continue
            self._make_room(keep=set(names), incoming=self._size_hint(self.catalog.expert(name)))
            self._adapters_changed()
            item = self._load(self.catalog.expert(name))
            item.nbytes = self._resident(item)
            self._loaded[name] = item
            self.loads.append(name)
        self._make_room(keep=set(names), adding=0)  # real sizes known now (a hint may fall short)

    @property
    def resident_bytes(self) -> int:
        """Bytes the loaded experts take where they run (LoRA tensors in the base; model experts' UNets)."""
        return sum(item.nbytes for item in self._loaded.values())

    def _over_budget(self, incoming: int = 0) -> bool:
        """Loading `incoming` more bytes would pass `max_memory`, or CUDA memory is past `memory_fraction`."""
        if self.max_memory is not None and self.resident_bytes + incoming > self.max_memory:
            return True
        if self.device.type != "cuda":
            return False
        import torch

        free, total = torch.cuda.mem_get_info(self.device)
        return (total - free) > self.memory_fraction * total

    def _make_room(self, keep: set[str], incoming: int = 0, adding: int = 1) -> None:
        """Evict least recently used experts outside `keep` until `adding` more experts of `incoming` bytes
        fit under `max_loaded`, `max_memory` and (CUDA) `memory_fraction`."""
        while self._loaded and (len(self._loaded) + adding > self.max_loaded or self._over_budget(incoming)):
            victim = next((n for n in self._loaded if n not in keep), None)
            if victim is None:
                return  # everything loaded is needed now: the caps bend to the route
            self.evict(victim)

    def _size_hint(self, expert: Expert) -> int:
        """Bytes `expert` will take once loaded, from its safetensors headers (a parked UNet: its own size);
        0 when unknown (the real size is checked after the load)."""
        import math

        from mixdiff_cli.catalog.formats import read_header

        if expert.name in self._parked:
            return _module_nbytes(self._parked[expert.name])
        try:
            path = Path(sources.resolve(self.catalog, expert.source))
            folder = path / "unet" if (path / "unet").is_dir() else path
            headers = [read_header(f)[0] for f in (sorted(folder.glob("*.safetensors")) if path.is_dir() else [path])]
        except (MixdiffError, OSError):
            return 0
        shapes = {k: t.get("shape") or [] for h in headers for k, t in h.items()}
        unet = {k: v for k, v in shapes.items() if k.startswith("model.diffusion_model.")}  # a whole original checkpoint
        return sum(math.prod(v) for v in (unet or shapes).values() if len(v) > 1) * self.dtype.itemsize  # kohya alphas are scalars

    def _resident(self, item: _Loaded) -> int:
        """The bytes `item` really takes: its LoRA tensors in the UNet and text encoders, or its UNet."""
        if item.unet is not None:
            return _module_nbytes(item.unet)
        models = [m for m in (self.unet, getattr(self.pipe, "text_encoder", None), getattr(self.pipe, "text_encoder_2", None)) if m is not None]
        return _adapter_nbytes(models, item.adapter) if item.adapter is not None else 0

    def evict(self, name: str) -> None:
        """Unload an expert (LoRA: delete_adapters; model: park in CPU memory or free)."""
        import torch

        item = self._loaded.pop(name)
        self._adapters_changed()
        if item.adapter is not None:
            if self.compile:
                self._slots[self._slots.index(item.adapter)] = None  # slot reused by the next hotswap
            else:
                self.pipe.delete_adapters(item.adapter)
        if item.unet is not None:
            del self.mixture.models[name]
            if self.device.type != "cpu":
                self._parked[name] = item.unet.to("cpu")
                while len(self._parked) > self.max_loaded:
                    self._parked.popitem(last=False)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand freed blocks back, so that memory_fraction sees them
        self.evictions.append(name)

    def _expert_path(self, expert: Expert) -> Path:
        path = Path(sources.resolve(self.catalog, expert.source))
        if not path.exists():
            raise ExpertLoadError(f"expert {expert.name}: {path} does not exist", "run 'mixdiff experts verify' and fix or re-add it")
        return path

    def _load(self, expert: Expert) -> _Loaded:
        path = self._expert_path(expert)
        try:
            if expert.kind == "model":
                return self._load_model(expert, path)
            return self._load_lora(expert, path)
        except MixdiffError:
            raise
        except (ValueError, KeyError, RuntimeError, TypeError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExpertLoadError(
                f"could not load expert {expert.name} from {path}: {first[:300]}",
                "check that it fits the base model ('mixdiff experts show NAME') and that the file is intact ('mixdiff experts verify')",
            ) from exc

    def _adapter_name(self, expert: Expert) -> tuple[str, bool]:
        """The UNet adapter name for `expert`, and whether to hotswap into it (compile mode)."""
        if not self.compile:
            return expert.name, False
        if None in self._slots:
            i = self._slots.index(None)
            self._slots[i] = f"slot{i}"
            return self._slots[i], f"slot{i}" in self.adapters
        self._slots.append(f"slot{len(self._slots)}")
        return self._slots[-1], False

    def _load_lora(self, expert: Expert, path: Path) -> _Loaded:
        from mixdiff_cli.catalog.formats import inspect_source, lora_for_diffusers

        adapter, hotswap = self._adapter_name(expert)
        folder = path if path.is_dir() else path.parent
        if (folder / "adapter_config.json").is_file() and (path.is_dir() or expert.format == "peft"):
            self._load_peft_folder(path, adapter, hotswap)
        else:
            file = path
            if path.is_dir():
                files = sorted(path.glob("*.safetensors"))
                if len(files) != 1:
                    raise ExpertLoadError(f"expert {expert.name}: {path} holds {len(files)} .safetensors files", "point 'source:' at the LoRA file itself")
                file = files[0]
            elif path.suffix != ".safetensors":
                raise ExpertLoadError(f"expert {expert.name}: {path} is not a .safetensors file", "mixdiff never unpickles; convert it to safetensors")
            # the path where diffusers reads the layout as it is; else the state dict catalog.convert makes exact
            try:
                weights = lora_for_diffusers(inspect_source(file, checksum=False))
            except MixdiffError as exc:  # a file changed or edited in since add-expert checked it
                raise ExpertLoadError(f"expert {expert.name}: {exc.message}", "run 'mixdiff experts verify', then fix or re-add it") from exc
            kwargs: dict[str, Any] = {"use_safetensors": True, "local_files_only": True} if isinstance(weights, str) else {}
            self.pipe.load_lora_weights(weights, adapter_name=adapter, hotswap=hotswap, **kwargs)
        text_encoder = any(
            adapter in (getattr(te, "peft_config", None) or {})
            for te in (getattr(self.pipe, "text_encoder", None), getattr(self.pipe, "text_encoder_2", None))
            if te is not None
        )
        if adapter not in self.adapters and not text_encoder:
            raise ExpertLoadError(f"expert {expert.name}: no layer of the base model matched the LoRA in {path}", "it was made for another architecture; check 'arch:' in the catalog")
        if self.compile:
            self._pin_unit_scaling(adapter)
            if not self._compiled:
                self.unet.compile()  # after the first load, so later hotswaps do not recompile
                self._compiled = True
        return _Loaded(expert, adapter=adapter, text_encoder=text_encoder, nbytes=_nbytes(path))

    def _pin_unit_scaling(self, adapter: str) -> None:
        """After a hotswap PEFT updates each layer's `scaling` but not `lora_alpha`/`r` (and rank padding
        changes `r`), so a later `set_adapters(weights)` would scale from stale values. Make
        lora_alpha / r (or / sqrt(r) under rsLoRA) equal the scaling the load produced."""
        from peft.tuners.lora.layer import LoraLayer

        for module in self.unet.modules():
            if isinstance(module, LoraLayer) and adapter in module.scaling:
                unit = float(module.scaling[adapter])
                r = module.r[adapter]
                module.lora_alpha[adapter] = unit * (r**0.5 if module.use_rslora.get(adapter, False) else r)

    def _load_peft_folder(self, path: Path, adapter: str, hotswap: bool) -> None:
        """A PEFT adapter for the UNet: its folder (adapter_config.json + adapter_model.safetensors) or that file."""
        from safetensors.torch import load_file

        weights = path / "adapter_model.safetensors" if path.is_dir() else path
        if not weights.is_file() or weights.suffix != ".safetensors":
            raise ExpertLoadError(f"{path} has no adapter_model.safetensors", "mixdiff never unpickles; save the adapter with safe_serialization=True")
        config = json.loads((weights.parent / "adapter_config.json").read_text())
        state = {k.removeprefix("base_model.model."): v for k, v in load_file(weights).items()}
        lora_keys = {"r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora", "use_rslora",
                     "lora_bias", "init_lora_weights", "lora_dropout", "fan_in_fan_out", "bias"}
        metadata = {k: v for k, v in config.items() if k in lora_keys}
        if config.get("modules_to_save"):  # whole saved modules: exact full-rank deltas on the base UNet's layers
            from mixdiff_cli.catalog.convert import with_saved_modules

            def base_layer(name: str) -> Any:
                module = self.unet.get_submodule(name)
                return module.get_base_layer() if hasattr(module, "get_base_layer") else module

            state, metadata = with_saved_modules(state, metadata, base_layer)
        with warnings.catch_warnings():  # PEFT warns of lora_bias on bias-less layers; drop_unused_lora_bias fixes them
            warnings.filterwarnings("ignore", message=".*lora_bias=True.*")
            self.unet.load_lora_adapter(
                state, prefix=None, adapter_name=adapter, metadata=metadata, _pipeline=self.pipe, hotswap=hotswap
            )
        if metadata.get("lora_bias"):
            from mixdiff_cli.catalog.convert import drop_unused_lora_bias

            drop_unused_lora_bias(self.unet, adapter)

    def _load_model(self, expert: Expert, path: Path) -> _Loaded:
        from diffusers import UNet2DConditionModel

        if expert.name in self._parked:
            unet = self._parked.pop(expert.name)
        elif path.is_dir():
            sub = "unet" if (path / "unet" / "config.json").is_file() else None
            folder = path / sub if sub else path
            # a folder holding only the fp16 variant (diffusion_pytorch_model.fp16.safetensors) loads as that variant
            plain = any((folder / f"diffusion_pytorch_model.{ext}").is_file() for ext in ("safetensors", "safetensors.index.json"))
            unet = UNet2DConditionModel.from_pretrained(
                path, subfolder=sub, dtype=self.dtype, use_safetensors=True, local_files_only=True, variant=None if plain else "fp16"
            )
        else:
            unet = self._unet_from_file(path)
        mine, theirs = dict(self.unet.config), dict(unet.config)
        for key in ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type", "projection_class_embeddings_input_dim"):
            if mine.get(key) != theirs.get(key):
                raise ExpertLoadError(f"expert {expert.name}: its UNet has {key}={theirs.get(key)}, the base has {mine.get(key)}", "a model expert must share the base's architecture")
        if unet.dtype != self.dtype:
            unet = unet.to(dtype=self.dtype)
        unet = unet.to(self.device).eval()
        unet.requires_grad_(False)
        self.mixture.models[expert.name] = unet
        return _Loaded(expert, unet=unet, nbytes=sum(p.numel() * p.element_size() for p in unet.parameters()))

    def _unet_from_file(self, path: Path) -> Any:
        """A UNet from one .safetensors file: diffusers key names load directly, original SD names convert."""
        import torch
        from diffusers import UNet2DConditionModel
        from safetensors import safe_open

        if path.suffix != ".safetensors":
            raise ExpertLoadError(f"{path} is not a .safetensors file", "mixdiff never unpickles; convert it to safetensors")
        with safe_open(str(path), "pt") as fh:
            keys = set(fh.keys())
            if keys <= set(self.unet.state_dict()):
                with torch.device("meta"):  # no float32 UNet first: each tensor goes straight into the engine's dtype
                    unet = UNet2DConditionModel.from_config(self.unet.config)
                unet.load_state_dict({k: fh.get_tensor(k).to(self.dtype) for k in keys}, strict=True, assign=True)
                return unet
        import tempfile

        with tempfile.TemporaryDirectory() as folder:  # from_single_file wants the config as a folder
            self.unet.save_config(Path(folder) / "unet")
            return UNet2DConditionModel.from_single_file(
                str(path), config=folder, subfolder="unet", dtype=self.dtype, local_files_only=True
            )

    # ------------------------------------------------------------------------------------ prompts

    def encode(self, prompts: Sequence[str], negatives: Sequence[str | None] | None = None) -> Encoded:
        """Prompt embeds (and negatives) plus the router vector, in one pass of the bare text encoders."""
        from mixdiff_cli.models.text import bare_text_encoders, encode

        with bare_text_encoders(self.pipe):
            return encode(self.pipe, prompts, negatives, device=self.device)

    def _adapted_encode(self, prompts: Sequence[str], negatives: Sequence[str | None], adapters: list[str], weights: list[float]) -> Encoded:
        """Encode with the text encoders' LoRA layers of `adapters` active (as plain diffusers would)."""
        from mixdiff_cli.models.text import encode

        self.unfuse()  # enable_lora would turn the fused layers back on
        self._active_key = None  # the adapter state changes here
        self.pipe.enable_lora()
        self._lora_on = True
        self.pipe.set_adapters(adapters, adapter_weights=weights)
        return encode(self.pipe, prompts, negatives, device=self.device)

    # --------------------------------------------------------------------------------- generation

    def _native_size(self) -> int:
        size = self.unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        return int(size * self.pipe.vae_scale_factor)

    def default_guidance(self) -> float:
        """The catalog base's `guidance`, else the pipeline's own default."""
        import inspect

        if self.catalog.base is not None and self.catalog.base.guidance is not None:
            return float(self.catalog.base.guidance)
        return inspect.signature(type(self.pipe).__call__).parameters["guidance_scale"].default

    def _normalise(self, requests: Iterable[Request]) -> list[Request]:
        out = []
        for req in requests:
            width, height = req.width or self._native_size(), req.height or self._native_size()
            check_image(steps=req.steps, guidance=req.guidance, width=width, height=height, scheduler=req.scheduler, seed=req.seed)
            seed = req.seed if req.seed is not None else random.randint(0, MAX_SEED)
            guidance = float(req.guidance if req.guidance is not None else self.default_guidance())
            out.append(Request(req.prompt, req.negative, seed, req.steps, guidance, width, height, req.scheduler))
        return out

    def plan(self, members: list[Active], mode: BlendMode) -> tuple[list[str | None], list[str], list[float], str, list[str]]:
        """Activate adapters for `members`; return the base slices, models, weights, a label and the
        adapters to fuse for the run (merge of several LoRAs: one forward, no per-layer LoRA cost). A fused
        route is unfused first: the caller runs the UNet with these adapters as set."""
        self.unfuse()
        return self._apply(members, mode)

    def _apply(self, members: list[Active], mode: BlendMode) -> tuple[list[str | None], list[str], list[float], str, list[str]]:
        """`plan` for a run of the engine's own, which keeps a fused route fused when the route stays."""
        value, active = self._plan(members, mode)
        self._activate(active)
        return value

    def _plan(self, members: list[Active], mode: BlendMode) -> tuple[tuple[list[str | None], list[str], list[float], str, list[str]], tuple | None]:
        """`plan`'s value, and the adapter state it needs ((adapters, weights); None: LoRA layers off),
        without setting it."""
        from mixdiff_cli.sampling.mixture import ACTIVE

        loras = [m for m in members if m.expert.kind == "lora"]
        models = [m for m in members if m.expert.kind == "model"]
        adapter = {m.name: self._loaded[m.name].adapter for m in loras}
        if not loras:
            slices: list[str | None] = [] if models else [ACTIVE]
            weights = [m.weight for m in models] if models else [1.0]
            return (slices, [m.name for m in models], weights, "model" if models else "base", []), None
        names = tuple(adapter[m.name] for m in loras)
        if len(loras) == 1 or mode == "merge":
            group = sum(m.weight for m in loras)
            active = (names, tuple(m.weight / group * m.expert.default_weight for m in loras))
            label = "single" if len(members) == 1 else "merge" if not models else "merge+noise"
            fuse = [] if self.compile else list(names)  # _fuse decides whether it pays
            return ([ACTIVE], [m.name for m in models], [group] + [m.weight for m in models], label, fuse), active
        # noise blend: each adapter at its own strength, one batched forward with per-sample adapters
        active = (names, tuple(m.expert.default_weight for m in loras))
        return (list(names), [m.name for m in models], [m.weight for m in loras] + [m.weight for m in models], "noise", []), active

    def _activate(self, active: tuple | None) -> None:
        """Set the adapter state `_plan` asked for, unless it is set already (a batch after a batch of the
        same route, or a band stage after the same stage)."""
        key = (active, tuple(self.adapters))
        if key == self._active_key:
            return
        self.unfuse()  # fused weights hold the old state's adapters
        if active is None:
            if self.adapters:
                self.pipe.disable_lora()
                self._lora_on = False
        else:
            if not self._lora_on:  # a pass over every module: only when they may be off
                self.pipe.enable_lora()
                self._lora_on = True
            self.pipe.set_adapters(list(active[0]), adapter_weights=list(active[1]))
        self._active_key = key

    def _adapters_changed(self) -> None:
        """An adapter is loaded or deleted: the fused weights, the adapter state and the LoRA layer list are stale."""
        self.unfuse()
        self._active_key = None
        self._lora_layers = None
        self._lora_on = None

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

        prompts, negatives = [r.prompt for r in reqs], [r.negative for r in reqs]
        if encoded is not None and (encoded.negative_prompt_embeds is None or len(encoded) != len(reqs)):
            encoded = None  # routing-only encodings lack the negatives
        bare: list[Encoded] = [encoded] if encoded is not None else []

        def base_encoding() -> Encoded:  # the bare text encoders' pass, once
            if not bare:
                bare.append(self.encode(prompts, negatives))
            return bare[0]

        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault((r.steps, r.width, r.height, r.scheduler, r.guidance), []).append(i)
        layouts = {key[0]: _layout(members, key[0]) for key in groups}  # steps -> [(first step, members)]
        stages: dict[tuple[str, ...], _Stage] = {}
        for layout in layouts.values():
            for _, active in layout:
                key = tuple(m.name for m in active)
                if key not in stages:
                    stages[key] = self._stage(active, mode, prompts, negatives, base_encoding)
        # several stages, one of them encoding through a text-encoder LoRA: every stage passes its own
        explicit = len(stages) > 1 and any(s.adapted for s in stages.values())
        only = next(iter(stages.values())) if len(stages) == 1 else None
        banded = any(m.band is not None for m in members)
        plan = self._apply(only.members, mode) if only is not None else None
        label = plan[3] if plan is not None and not banded else _bands_label(list(layouts.values()), mode)

        results: list[Any] = [None] * len(reqs)
        total = sum(reqs[idx[0]].steps for idx in groups.values())
        done = 0
        for (steps, width, height, scheduler, guidance), idx in groups.items():
            cfg = guidance > 1 and self.unet.config.time_cond_proj_dim is None
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

    def _stage(self, members: list[Active], mode: BlendMode, prompts: list[str], negatives: list[str | None],
               base_encoding: Callable[[], Encoded]) -> _Stage:
        """The text conditioning of `members` (weights renormalised among themselves)."""
        if members and abs(sum(m.weight for m in members) - 1.0) > 1e-12:
            pairs = renormalise([(m.name, m.weight) for m in members])
            members = [Active(m.expert, w, m.band) for m, (_, w) in zip(members, pairs)]
        # LoRAs that also adapt a text encoder: encode through them, as plain diffusers does. In a noise
        # blend each member gets its own conditioning (Blend.conditioning).
        loras = [m for m in members if m.expert.kind == "lora"]
        models = [m for m in members if m.expert.kind == "model"]
        if not any(self._loaded[m.name].text_encoder for m in loras):
            return _Stage(members, mode, base_encoding(), None)
        names = [self._loaded[m.name].adapter for m in loras]
        if len(loras) > 1 and mode == "noise":
            per_member: list[Encoded | None] = [
                self._adapted_encode(prompts, negatives, [n], [m.expert.default_weight]) for n, m in zip(names, loras)
            ]
        else:
            group = sum(m.weight for m in loras)
            weights = [m.weight / group * m.expert.default_weight for m in loras]
            per_member = [self._adapted_encode(prompts, negatives, names, weights)]
        per_member += [base_encoding()] * len(models)
        return _Stage(members, mode, per_member[0], per_member if len(per_member) > 1 else None, adapted=True)

    def _blend(self, stage: _Stage, idx: list[int], cfg: bool, explicit: bool) -> Blend:
        """The mixture's view of a stage for the requests `idx`; `explicit`: pass the stage's own text
        conditioning even when the pipeline's is the same."""
        from mixdiff_cli.sampling.mixture import Blend

        slices, model_names, weights, _, _ = self._plan(stage.members, stage.mode)[0]
        if stage.per_member is not None:
            conditioning = [_conditioning(e.take(idx), cfg) if e is not None else None for e in stage.per_member]
        elif explicit:
            conditioning = [_conditioning(stage.encoded.take(idx), cfg)] * (len(slices) + len(model_names))
        else:
            conditioning = None
        return Blend(slices=slices, models=model_names, weights=weights, conditioning=conditioning)

    def _fuse(self, adapters: list[str], tokens: int | None = None) -> None:
        """Fuse `adapters` (at their set_adapters weights) into the base UNet where that pays (`_fuse_pays`),
        and keep them fused after the run: the next run of the same route (the next image of a prompt file,
        the next batch) starts fused and pays nothing. `unfuse` gives the base weights back bit for bit
        before the adapter state changes (another route, an adapter loaded or evicted, `plan`).

        Where `fuse_lora` adds in place (W += get_delta_weight, PEFT's merge), this swaps each targeted W
        for a buffer holding W + scale * B @ A (one addmm: a single pass over W) while those LoRA layers are off, and
        keeps W itself: no float drift ((W + dW) - dW != W), and an unfuse is a pointer swap. The price is
        one copy of the targeted weights, made at the first fuse and reused by every later one
        (`_fuse_buffer`; `unfuse(release=True)` frees it)."""
        import torch
        from peft.tuners.lora.layer import LoraLayer

        key = (tuple(adapters), self._active_key, self.fuse)
        if self._fusion is not None and self._fusion[0] == key:
            return
        self.unfuse()
        if not adapters:
            return
        if self._lora_layers is None:
            self._lora_layers = [m for m in self.unet.modules() if isinstance(m, LoraLayer)]
        layers = [m for m in self._lora_layers if any(a in m.lora_A for a in adapters)]
        vanilla = all(not getattr(m, "lora_variant", {}).get(a) and not m.lora_bias.get(a) for m in layers for a in adapters)
        if not layers or not vanilla or not self._fuse_pays(layers, adapters, tokens):  # DoRA and LoRA biases: run unfused
            return
        saved: list[tuple[Any, Any]] = []
        self._fusion = (key, saved, layers)
        try:
            with torch.no_grad():
                for module in layers:
                    weight = module.get_base_layer().weight
                    buffer = self._fuse_buffer(weight)
                    fused = None
                    for adapter in adapters:  # ((W + d1) + d2): the order fuse_lora adds in
                        if adapter in module.lora_A:
                            fused = _plus_delta(module, adapter, weight.data, out=buffer) if fused is None else _plus_delta(module, adapter, fused)
                    saved.append((weight, weight.data))
                    weight.data = fused
                    module.enable_adapters(False)  # only the fused layers (what unet.disable_adapters does, on fewer)
        except BaseException:  # out of memory half way: the base as it was
            self.unfuse()
            raise

    def _fuse_buffer(self, weight: Any) -> Any:
        """The tensor `weight`'s fused copies are written into, made once: a fresh allocation per fuse costs
        more than the fuse (page faults on ~1 GB for SD 1.5 in float32: 1.7-9 s on this CPU, against ~0.4 s
        into a reused buffer; benchmarks/bench_scale.py)."""
        import torch

        buffer = self._fuse_buffers.get(weight)
        if buffer is None or buffer.shape != weight.shape or buffer.dtype != weight.dtype or buffer.device != weight.device:
            buffer = self._fuse_buffers[weight] = torch.empty_like(weight.data, memory_format=torch.contiguous_format)
        return buffer

    def unfuse(self, release: bool = False) -> None:
        """The base UNet's own weights back (bit for bit) and its LoRA layers on, if a route is fused;
        `release`: also free the buffers fuses write into (one copy of the targeted weights)."""
        if release:
            self.unfuse()
            self._fuse_buffers.clear()
            return
        if self._fusion is None:
            return
        _, saved, layers = self._fusion
        self._fusion = None
        for weight, original in saved:
            weight.data = original
        for module in layers:
            module.enable_adapters(True)

    @property
    def fused(self) -> tuple[str, ...]:
        """The adapters fused into the base UNet now (empty: none)."""
        return self._fusion[0][0] if self._fusion is not None else ()

    def _fuse_pays(self, layers: list[Any], adapters: Sequence[str] = (), tokens: int | None = None) -> bool:
        """Whether fusing `adapters` beats running their LoRA `layers` unfused (`self.fuse`: auto, always,
        never) for a run of `tokens` latent tokens through the UNet (samples x calls x latent pixels; None:
        not known).

        auto: never in bfloat16 (its 8-bit mantissa rounds W + dW: 4-9/255 off the unfused image, against
        < 1/255 in float16 and ~1e-6 in float32). On an accelerator always (a fuse is milliseconds there). On
        CPU a fuse is one addmm over the targeted weights (0.40 s for SD 1.5's 267M on one thread), against
        ~60 us per LoRA layer per UNet call unfused at 64 px, growing with the tokens (0.22 s a call for
        SD 1.5's rank-32 LoRA at 256 px with CFG; constants above): small layers (the tiny test models)
        always pay; SD 1.5 pays at 256 px from 2 steps on, not at 64 px for one 10-step image (there the
        fuse is ~30 steps of what this model puts on the LoRA layers). A fused route stays fused for its next images, which then run
        at the bare UNet's speed."""
        import torch

        if self.fuse != "auto":
            return self.fuse == "always"
        if self.dtype == torch.bfloat16:
            return False
        if self.device.type != "cpu":
            return True
        weights = sum(m.get_base_layer().weight.numel() for m in layers)
        if weights <= _CPU_FUSE_MAX_PER_LAYER * len(layers):
            return True
        lora = sum(m.lora_A[a].weight.numel() + m.lora_B[a].weight.numel() for m in layers for a in adapters if a in m.lora_A)
        return tokens is not None and tokens * lora * _CPU_LORA_S_PER_PARAM_TOKEN >= weights * _CPU_FUSE_S_PER_WEIGHT

    @contextlib.contextmanager
    def _installed(self):
        """The mixture as the pipeline's denoiser for one run (adapter calls need the plain UNet there)."""
        self.pipe.unet = self.mixture
        try:
            yield
        finally:
            self.pipe.unet = self.unet

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

        cfg = guidance > 1 and self.unet.config.time_cond_proj_dim is None
        scale = self.pipe.vae_scale_factor
        tokens = len(reqs) * (2 if cfg else 1) * steps * (height // scale) * (width // scale)  # through the UNet

        def activate(stage: _Stage) -> None:  # each one-LoRA (or merged) stage fused while it runs, where that pays
            self._fuse(self._apply(stage.members, stage.mode)[4], tokens)

        kwargs: dict[str, Any] = {}
        if tick is not None or starts:
            def on_step(pipe: Any, i: int, t: Any, tensors: dict) -> dict:
                if i + 1 in starts:
                    stage, blend = starts[i + 1]
                    pipe.unet = self.unet  # adapter calls need the plain UNet in the pipeline
                    try:
                        activate(stage)
                    finally:
                        pipe.unet = self.mixture
                    self.mixture.switch(blend)
                if tick is not None:
                    tick(done + i + 1, total)
                return tensors

            kwargs["callback_on_step_end"] = on_step
        _, stage, blend = spans[0]
        activate(stage)
        with self._installed(), self.mixture.routed(blend):
            out = self.pipe(
                **enc.pipeline_kwargs(),
                num_inference_steps=steps,
                guidance_scale=guidance,
                width=width,
                height=height,
                generator=generators,
                output_type=output_type,
                **kwargs,
            )
        images = out.images
        return list(images) if output_type == "pil" else [images[i] for i in range(len(reqs))]

    # ----------------------------------------------------------------------------------- metadata

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


def _conditioning(enc: Encoded, cfg: bool) -> dict[str, Any]:
    """Per-member UNet conditioning in the pipeline's layout: [uncond..., cond...] under guidance."""
    import torch

    cat = (lambda neg, pos: torch.cat([neg, pos])) if cfg else (lambda neg, pos: pos)
    cond = {"encoder_hidden_states": cat(enc.negative_prompt_embeds, enc.prompt_embeds)}
    if enc.pooled_prompt_embeds is not None:
        cond["text_embeds"] = cat(enc.negative_pooled_prompt_embeds, enc.pooled_prompt_embeds)
    return cond


def _nbytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _module_nbytes(module: Any) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _adapter_nbytes(models: Iterable[Any], adapter: str) -> int:
    """Bytes of LoRA adapter `adapter` in `models` (PEFT names its tensors `...lora_A.<adapter>.weight`)."""
    total = 0
    for model in models:
        for name, tensor in model.named_parameters():
            parts = name.split(".")
            if any(p.startswith("lora_") and q == adapter for p, q in zip(parts, parts[1:])):
                total += tensor.numel() * tensor.element_size()
    return total


def _layout(members: list[Active], steps: int) -> list[tuple[int, list[Active]]]:
    """[(first step, members that run)] for an n-step run: step i runs the members whose band holds
    i/n (Member grammar: START <= i/n < END). A step no band holds runs the bare base (warned)."""
    for m in members:
        if m.band is not None and not band_steps(m.band, steps):
            raise UsageError(
                f"expert {m.name}'s band {format_band(m.band)} holds no step of the {steps}-step run",
                f"widen it to at least 1/{steps} of the run, or raise --steps",
            )
    spans: list[tuple[int, list[Active]]] = []
    for i in range(steps):
        active = [m for m in members if m.band is None or m.band[0] <= i / steps < m.band[1]]
        if not spans or [m.name for m in spans[-1][1]] != [m.name for m in active]:
            spans.append((i, active))
    bare = [f"{start + 1}-{spans[k + 1][0] if k + 1 < len(spans) else steps}" for k, (start, active) in enumerate(spans) if members and not active]
    if bare:
        warnings.warn(f"steps {', '.join(bare)} of {steps} run the bare base: no expert's band holds them", MixdiffWarning, stacklevel=3)
    return spans


def _bands_label(layouts: list[list[tuple[int, list[Active]]]], mode: BlendMode) -> str:
    """The record's blend label of a banded route: "bands", or "bands+noise" / "bands+merge" when some
    step blends several experts."""
    overlap = any(len(active) > 1 for layout in layouts for _, active in layout)
    return f"bands+{mode}" if overlap else "bands"
