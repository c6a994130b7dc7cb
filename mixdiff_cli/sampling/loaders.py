"""Loading an expert into the base: LoRA files of every layout, PEFT folders, whole-model denoisers."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixdiff_cli.catalog import sources
from mixdiff_cli.catalog.model import Expert
from mixdiff_cli.core.errors import MixdiffError
from mixdiff_cli.sampling.requests import ExpertLoadError, _Loaded
from mixdiff_cli.sampling.residency import _nbytes

if TYPE_CHECKING:

    pass


class Loaders:
    """Expert loading (a part of `Engine`): adapters into the base denoiser, model experts beside it."""

    def _expert_path(self, expert: Expert) -> Path:
        path = Path(sources.resolve(self.catalog, expert.source))
        if not path.exists():
            raise ExpertLoadError(f"expert {expert.name}: {path} does not exist", "run 'mixdiff experts verify' and fix or re-add it")
        return path

    def _load(self, expert: Expert) -> _Loaded:
        path = self._expert_path(expert)
        self._check_hash(expert, path)
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

    def _check_hash(self, expert: Expert, path: Path) -> None:
        """The file is the one the catalog recorded: a swapped file would be used silently, and every PNG
        would record the old hash."""
        if not expert.sha256 or expert.source.startswith("hf://"):
            return
        from mixdiff_cli.catalog.formats import inspect_source
        from mixdiff_cli.catalog.headers import known_sha256

        file = path if path.is_file() else inspect_source(path, checksum=False).file
        if file is not None and known_sha256(file) != expert.sha256:
            raise ExpertLoadError(f"expert {expert.name}: {file} is not the file the catalog recorded (sha256 differs)",
                                  f"run 'mixdiff experts verify'; if the change is yours, 'mixdiff experts remove {expert.name}' and add it again")

    def _adapter_name(self, expert: Expert) -> tuple[str, bool]:
        """The adapter name for `expert`, and whether to hotswap into it (compile mode)."""
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
                weights = lora_for_diffusers(inspect_source(file, checksum=False), self._weight_shape)
            except MixdiffError as exc:  # a file changed or edited in since add-expert checked it
                raise ExpertLoadError(f"expert {expert.name}: {exc.message}", "run 'mixdiff experts verify', then fix or re-add it") from exc
            kwargs: dict[str, Any] = {"use_safetensors": True, "local_files_only": True} if isinstance(weights, str) else {}
            self.pipe.load_lora_weights(weights, adapter_name=adapter, hotswap=hotswap, **kwargs)
        text_encoder = any(adapter in (getattr(te, "peft_config", None) or {}) for te in self.family.encoders(self.pipe))
        if adapter not in self.adapters and not text_encoder:
            raise ExpertLoadError(f"expert {expert.name}: no layer of the base model matched the LoRA in {path}", "it was made for another architecture; check 'arch:' in the catalog")
        if self.compile:
            self._pin_unit_scaling(adapter)
            if not self._compiled:
                self.denoiser.compile()  # after the first load, so later hotswaps do not recompile
                self._compiled = True
        return _Loaded(expert, adapter=adapter, text_encoder=text_encoder, nbytes=_nbytes(path))

    def _weight_shape(self, stem: str) -> tuple[int, ...] | None:
        """The base weight shape of the module a kohya stem (``lora_unet_...``, ``lora_te1_...``) names; None
        when the base has no such module (LyCORIS modules are rewritten to the shape of what they adapt)."""
        from mixdiff_cli import families
        from mixdiff_cli.catalog.lora_keys import kohya_to_dotted

        for prefix, component in families.kohya_prefixes():
            if stem.startswith(prefix) and (model := getattr(self.pipe, component, None)) is not None:
                path = kohya_to_dotted(stem[len(prefix) :])
                if component == "unet":
                    from mixdiff_cli.families.unet_geometry import sgm_to_diffusers

                    path = sgm_to_diffusers(path, dict(model.config)) or path
                return _module_weight_shape(model, path)
        return None

    def _pin_unit_scaling(self, adapter: str) -> None:
        """After a hotswap PEFT updates each layer's `scaling` but not `lora_alpha`/`r` (and rank padding
        changes `r`), so a later `set_adapters(weights)` would scale from stale values. Make
        lora_alpha / r (or / sqrt(r) under rsLoRA) equal the scaling the load produced."""
        from peft.tuners.lora.layer import LoraLayer

        for module in self.denoiser.modules():
            if isinstance(module, LoraLayer) and adapter in module.scaling:
                unit = float(module.scaling[adapter])
                r = module.r[adapter]
                module.lora_alpha[adapter] = unit * (r**0.5 if module.use_rslora.get(adapter, False) else r)

    def _load_peft_folder(self, path: Path, adapter: str, hotswap: bool) -> None:
        """A PEFT adapter for the denoiser: its folder (adapter_config.json + adapter_model.safetensors) or that file."""
        from safetensors.torch import load_file

        weights = path / "adapter_model.safetensors" if path.is_dir() else path
        if not weights.is_file() or weights.suffix != ".safetensors":
            raise ExpertLoadError(f"{path} has no adapter_model.safetensors", "mixdiff never unpickles; save the adapter with safe_serialization=True")
        config = json.loads((weights.parent / "adapter_config.json").read_text())
        if str(config.get("peft_type", "LORA")).upper() in ("LOHA", "LOKR"):  # rewritten as an exact LoRA (catalog.lycoris)
            from mixdiff_cli.catalog.lycoris import peft_as_lora

            state = peft_as_lora(load_file(weights), config, lambda module: _module_weight_shape(self.denoiser, module))
            self.denoiser.load_lora_adapter(state, prefix=None, adapter_name=adapter, _pipeline=self.pipe, hotswap=hotswap)
            return
        state = {k.removeprefix("base_model.model."): v for k, v in load_file(weights).items()}
        lora_keys = {"r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora", "use_rslora",
                     "lora_bias", "init_lora_weights", "lora_dropout", "fan_in_fan_out", "bias"}
        metadata = {k: v for k, v in config.items() if k in lora_keys}
        if config.get("modules_to_save"):  # whole saved modules: exact full-rank deltas on the base denoiser's layers
            from mixdiff_cli.catalog.convert import with_saved_modules

            def base_layer(name: str) -> Any:
                module = self.denoiser.get_submodule(name)
                return module.get_base_layer() if hasattr(module, "get_base_layer") else module

            state, metadata = with_saved_modules(state, metadata, base_layer)
        with warnings.catch_warnings():  # PEFT warns of lora_bias on bias-less layers; drop_unused_lora_bias fixes them
            warnings.filterwarnings("ignore", message=".*lora_bias=True.*")
            self.denoiser.load_lora_adapter(
                state, prefix=None, adapter_name=adapter, metadata=metadata, _pipeline=self.pipe, hotswap=hotswap
            )
        if metadata.get("lora_bias"):
            from mixdiff_cli.catalog.convert import drop_unused_lora_bias

            drop_unused_lora_bias(self.denoiser, adapter)

    def _load_model(self, expert: Expert, path: Path) -> _Loaded:
        if expert.name in self._parked:
            model = self._parked.pop(expert.name)
        else:
            if not path.is_dir() and path.suffix != ".safetensors":
                raise ExpertLoadError(f"{path} is not a .safetensors file", "mixdiff never unpickles; convert it to safetensors")
            model = self.family.load_denoiser(path, self.denoiser, self.dtype)
        mismatch = self.family.denoiser_mismatch(dict(self.denoiser.config), dict(model.config))
        if mismatch:
            raise ExpertLoadError(f"expert {expert.name}: {mismatch}", "a model expert must share the base's architecture")
        if model.dtype != self.dtype:
            model = model.to(dtype=self.dtype)
        model = model.to(self.device).eval()
        model.requires_grad_(False)
        if self._invariance is not None:
            self._invariance.add(model)
        self.mixture.models[expert.name] = model
        return _Loaded(expert, model=model, nbytes=sum(p.numel() * p.element_size() for p in model.parameters()))


def _module_weight_shape(model: Any, path: str) -> tuple[int, ...] | None:
    """The weight shape of `model`'s module at `path`; None when there is no such module."""
    try:
        return tuple(model.get_submodule(path).weight.shape)
    except AttributeError:
        return None
