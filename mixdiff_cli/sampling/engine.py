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
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from mixdiff_cli.catalog import sources
from mixdiff_cli.catalog.schema import Catalog, Expert, load_catalog
from mixdiff_cli.core.errors import MixdiffError, UsageError
from mixdiff_cli.core.runtime import pick_device, pick_dtype, versions
from mixdiff_cli.routing.route import check_known, parse_members, renormalise
from mixdiff_cli.sampling.options import BLEND_MODES, MAX_SEED, SCHEDULERS, BlendMode, SchedulerName, check_image
from mixdiff_cli.catalog.formats import sha256_file as file_sha256

if TYPE_CHECKING:
    import torch

    from mixdiff_cli.models.text import Encoded
    from mixdiff_cli.sampling.mixture import Blend



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

    @property
    def name(self) -> str:
        return self.expert.name


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
    """Loads the base once; loads experts on demand into an LRU of at most `max_loaded`."""

    def __init__(
        self,
        catalog: Catalog | str | Path,
        device: str | None = None,
        dtype: str | None = None,
        max_loaded: int = 4,
        compile: bool = False,
        memory_fraction: float = 0.9,
    ):
        from mixdiff_cli.models.pipeline import load_base
        from mixdiff_cli.sampling.mixture import MixtureUNet

        if max_loaded < 1:
            raise UsageError("--max-loaded must be at least 1", "pass --max-loaded 1 or more")
        self.catalog = catalog if isinstance(catalog, Catalog) else load_catalog(catalog)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.max_loaded = max_loaded
        self.memory_fraction = memory_fraction
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
        self._plan_key: tuple | None = None  # the route whose adapter state is set (set_adapters once per route)
        self._plan_value: Any = None
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
        """A Route, Members, (name, weight) pairs or names -> the experts with weights summing to 1."""
        chosen = route.chosen if hasattr(route, "chosen") else route
        members = parse_members(chosen or ())
        check_known(members, self.catalog.names)
        pairs = renormalise([(m.expert, m.weight) for m in members]) if members else []
        return [Active(self.catalog.expert(n), w) for n, w in pairs]

    def ensure_loaded(self, names: Sequence[str]) -> None:
        """Load the experts `names` (others stay as they are), evicting least recently used ones."""
        for name in names:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                continue
            self._make_room(keep=set(names))
            self._plan_key = None
            self._loaded[name] = self._load(self.catalog.expert(name))
            self.loads.append(name)

    def _over_budget(self) -> bool:
        import torch

        if self.device.type != "cuda":
            return False
        free, total = torch.cuda.mem_get_info(self.device)
        return (total - free) > self.memory_fraction * total

    def _make_room(self, keep: set[str]) -> None:
        while self._loaded and (len(self._loaded) >= self.max_loaded or self._over_budget()):
            victim = next((n for n in self._loaded if n not in keep), None)
            if victim is None:
                return  # everything loaded is needed now: the cap bends to the route's k
            self.evict(victim)

    def evict(self, name: str) -> None:
        """Unload an expert (LoRA: delete_adapters; model: park in CPU memory or free)."""
        import torch

        item = self._loaded.pop(name)
        self._plan_key = None
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
                torch.cuda.empty_cache()
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
        adapter, hotswap = self._adapter_name(expert)
        if expert.format == "peft" or (path.is_dir() and (path / "adapter_config.json").is_file()):
            self._load_peft_folder(path, adapter, hotswap)
        else:
            kwargs: dict[str, Any] = {"use_safetensors": True, "local_files_only": True}
            if path.is_dir():
                files = sorted(path.glob("*.safetensors"))
                if len(files) != 1:
                    raise ExpertLoadError(f"expert {expert.name}: {path} holds {len(files)} .safetensors files", "point 'source:' at the LoRA file itself")
                kwargs["weight_name"] = files[0].name
            elif path.suffix != ".safetensors":
                raise ExpertLoadError(f"expert {expert.name}: {path} is not a .safetensors file", "mixdiff never unpickles; convert it to safetensors")
            self.pipe.load_lora_weights(str(path), adapter_name=adapter, hotswap=hotswap, **kwargs)
        if adapter not in self.adapters:
            raise ExpertLoadError(f"expert {expert.name}: no layer of the base UNet matched the LoRA in {path}", "it was made for another architecture; check 'arch:' in the catalog")
        text_encoder = any(
            adapter in (getattr(te, "peft_config", None) or {})
            for te in (getattr(self.pipe, "text_encoder", None), getattr(self.pipe, "text_encoder_2", None))
            if te is not None
        )
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
        """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) for the UNet."""
        from safetensors.torch import load_file

        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            raise ExpertLoadError(f"{path} has no adapter_model.safetensors", "mixdiff never unpickles; save the adapter with safe_serialization=True")
        config = json.loads((path / "adapter_config.json").read_text())
        state = {k.removeprefix("base_model.model."): v for k, v in load_file(weights).items()}
        lora_keys = {"r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora", "use_rslora",
                     "lora_bias", "init_lora_weights", "lora_dropout", "fan_in_fan_out", "bias"}
        metadata = {k: v for k, v in config.items() if k in lora_keys}
        self.unet.load_lora_adapter(
            state, prefix=None, adapter_name=adapter, metadata=metadata, _pipeline=self.pipe, hotswap=hotswap
        )

    def _load_model(self, expert: Expert, path: Path) -> _Loaded:
        from diffusers import UNet2DConditionModel

        if expert.name in self._parked:
            unet = self._parked.pop(expert.name)
        elif path.is_dir():
            sub = "unet" if (path / "unet" / "config.json").is_file() else None
            unet = UNet2DConditionModel.from_pretrained(
                path, subfolder=sub, dtype=self.dtype, use_safetensors=True, local_files_only=True
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
        from diffusers import UNet2DConditionModel
        from safetensors import safe_open
        from safetensors.torch import load_file

        if path.suffix != ".safetensors":
            raise ExpertLoadError(f"{path} is not a .safetensors file", "mixdiff never unpickles; convert it to safetensors")
        with safe_open(str(path), "pt") as fh:
            keys = set(fh.keys())
        if keys <= set(self.unet.state_dict()):
            unet = UNet2DConditionModel.from_config(self.unet.config)
            unet.load_state_dict(load_file(str(path)), strict=True)
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

        self._plan_key = None  # the adapter state changes here
        self.pipe.enable_lora()
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
        adapters to fuse for the run (merge of several LoRAs: one forward, no per-layer LoRA cost)."""
        key = (mode, tuple((m.name, m.weight) for m in members), tuple(self.adapters))
        if key == self._plan_key:  # adapter state already set by the previous batch
            return self._plan_value
        self._plan_value = self._plan(members, mode)
        self._plan_key = key
        return self._plan_value

    def _plan(self, members: list[Active], mode: BlendMode) -> tuple[list[str | None], list[str], list[float], str, list[str]]:
        from mixdiff_cli.sampling.mixture import ACTIVE

        loras = [m for m in members if m.expert.kind == "lora"]
        models = [m for m in members if m.expert.kind == "model"]
        adapter = {m.name: self._loaded[m.name].adapter for m in loras}
        has_adapters = bool(self.adapters)
        if not loras:
            if has_adapters:
                self.pipe.disable_lora()
            slices: list[str | None] = [] if models else [ACTIVE]
            weights = [m.weight for m in models] if models else [1.0]
            return slices, [m.name for m in models], weights, "model" if models else "base", []
        self.pipe.enable_lora()
        if len(loras) == 1 or mode == "merge":
            group = sum(m.weight for m in loras)
            self.pipe.set_adapters(
                [adapter[m.name] for m in loras],
                adapter_weights=[m.weight / group * m.expert.default_weight for m in loras],
            )
            label = "single" if len(members) == 1 else "merge" if not models else "merge+noise"
            fuse = [adapter[m.name] for m in loras] if len(loras) > 1 and not self.compile else []
            return [ACTIVE], [m.name for m in models], [group] + [m.weight for m in models], label, fuse
        # noise blend: each adapter at its own strength, one batched forward with per-sample adapters
        self.pipe.set_adapters([adapter[m.name] for m in loras], adapter_weights=[m.expert.default_weight for m in loras])
        return (
            [adapter[m.name] for m in loras],
            [m.name for m in models],
            [m.weight for m in loras] + [m.weight for m in models],
            "noise",
            [],
        )

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
        # LoRAs that also adapt a text encoder: encode through them, as plain diffusers does. In a noise
        # blend each member gets its own conditioning (Blend.conditioning).
        per_member: list[Encoded | None] | None = None
        loras = [m for m in members if m.expert.kind == "lora"]
        models = [m for m in members if m.expert.kind == "model"]
        if any(self._loaded[m.name].text_encoder for m in loras):
            names = [self._loaded[m.name].adapter for m in loras]
            if len(loras) > 1 and mode == "noise":
                per_member = [
                    self._adapted_encode(prompts, negatives, [n], [m.expert.default_weight]) for n, m in zip(names, loras)
                ]
            else:
                group = sum(m.weight for m in loras)
                weights = [m.weight / group * m.expert.default_weight for m in loras]
                per_member = [self._adapted_encode(prompts, negatives, names, weights)]
            if models:
                per_member += [self.encode(prompts, negatives)] * len(models)
            encoded = per_member[0]
            if len(per_member) == 1:
                per_member = None
        elif encoded is None:
            encoded = self.encode(prompts, negatives)
        slices, model_names, weights, label, fuse = self.plan(members, mode)

        results: list[Any] = [None] * len(reqs)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault((r.steps, r.width, r.height, r.scheduler, r.guidance), []).append(i)
        total = sum(reqs[idx[0]].steps for idx in groups.values())
        with self._fused(fuse):
            self._run_groups(groups, reqs, encoded, per_member, slices, model_names, weights, output_type, progress, total, results)
        if output_type == "pil":
            for req, image in zip(reqs, results):
                record = self.record(req, members, label, route_info)
                image.info["mixdiff"] = record
                image.info["parameters"] = a1111_parameters(record)
        return results

    def _run_groups(self, groups, reqs, encoded, per_member, slices, model_names, weights, output_type, progress, total, results) -> None:
        """Sample each group of requests that share steps, size, scheduler and guidance."""
        from mixdiff_cli.sampling.mixture import Blend

        done = 0
        for (steps, width, height, scheduler, guidance), idx in groups.items():
            cfg = guidance > 1 and self.unet.config.time_cond_proj_dim is None
            conditioning = None
            if per_member is not None:
                conditioning = [_conditioning(e.take(idx), cfg) if e is not None else None for e in per_member]
            mix = Blend(slices=slices, models=model_names, weights=weights, conditioning=conditioning)
            images = self._sample(
                encoded.take(idx), [reqs[i] for i in idx], mix, steps, width, height, scheduler, guidance,
                output_type, progress, done, total,
            )
            done += steps
            for i, image in zip(idx, images):
                results[i] = image

    @contextlib.contextmanager
    def _fused(self, adapters: list[str]):
        """Fuse `adapters` (at their set_adapters weights) into the base UNet for one run, then restore
        the base weights bit for bit (unfusing alone leaves float drift: (W + dW) - dW != W)."""
        if not adapters:
            yield
            return
        from peft.tuners.lora.layer import LoraLayer

        saved = []
        for module in self.unet.modules():
            if isinstance(module, LoraLayer) and any(a in module.lora_A for a in adapters):
                base = module.get_base_layer()
                saved.append((base.weight, base.weight.detach().clone()))
        self.pipe.fuse_lora(components=["unet"], adapter_names=adapters)
        try:
            yield
        finally:
            self.pipe.unfuse_lora(components=["unet"])
            for weight, original in saved:
                weight.data.copy_(original)

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

    def _sample(self, enc: Encoded, reqs: list[Request], mix: Blend, steps: int, width: int, height: int,
                scheduler: str, guidance: float, output_type: str, progress: Any, done: int, total: int) -> list[Any]:
        import torch

        generators = [torch.Generator(device=self.device).manual_seed(r.seed) for r in reqs]  # one per image
        self.pipe.scheduler = self._scheduler(scheduler)
        kwargs: dict[str, Any] = {}
        if progress is not None:
            def on_step(pipe: Any, i: int, t: Any, tensors: dict) -> dict:
                progress(done + i + 1, total)
                return tensors

            kwargs["callback_on_step_end"] = on_step
        with self._installed(), self.mixture.routed(mix):
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
                 "format": m.expert.format, "sha256": m.expert.sha256, "source": m.expert.source}
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
