"""The engine's residency: an LRU of loaded experts under `max_loaded` and `max_memory`, and what each takes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mixdiff_cli.catalog import sources
from mixdiff_cli.catalog.model import Expert
from mixdiff_cli.core.errors import MixdiffError, OverMemory
from mixdiff_cli.sampling.requests import _Loaded


class Residency:
    """Which experts are loaded (LRU), how many bytes they take, and eviction (a part of `Engine`)."""

    @property
    def adapters(self) -> list[str]:
        """LoRA adapters present in the base denoiser."""
        return list(getattr(self.denoiser, "peft_config", {}) or {})

    @property
    def loaded(self) -> list[str]:
        """Loaded experts, least recently used first."""
        return list(self._loaded)

    def ensure_loaded(self, names: Sequence[str]) -> None:
        """Load the experts `names` (others stay as they are), evicting least recently used ones. A route
        whose experts pass `max_memory` by themselves is refused (`OverMemory`) unless `allow_over_memory`."""
        loaded_now: list[str] = []
        for name in names:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                continue
            hint = self._size_hint(self.catalog.expert(name))
            self._make_room(keep=set(names), incoming=hint)
            self._keep_promise(names, loaded_now, name, hint)  # before the load, from the file's headers
            self._adapters_changed()
            item = self._load(self.catalog.expert(name))
            item.nbytes = self._resident(item)
            self._loaded[name] = item
            self.loads.append(name)
            loaded_now.append(name)
        self._make_room(keep=set(names), adding=0)  # real sizes known now (a hint may fall short)
        self._keep_promise(names, loaded_now)

    def _keep_promise(self, names: Sequence[str], loaded_now: list[str], incoming: str | None = None, nbytes: int = 0) -> None:
        """Raise `OverMemory` when the route `names` (with `incoming`, `nbytes` more) passes `max_memory` with
        nothing left to evict; the experts this call loaded are unloaded first, so the budget still holds."""
        if self.max_memory is None or self.allow_over_memory or self.resident_bytes + nbytes <= self.max_memory:
            return
        sizes = {n: self._loaded[n].nbytes for n in names if n in self._loaded}
        if incoming is not None:
            sizes[incoming] = nbytes
        for name in loaded_now:
            self.evict(name)
        mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
        what = ", ".join(f"{n} {mib(b)}" for n, b in sizes.items())
        raise OverMemory(
            f"the route's experts take {mib(sum(sizes.values()))} ({what}), more than --max-memory {mib(self.max_memory)}",
            "raise --max-memory, route fewer experts (--top-k 1), or pass --allow-over-memory",
        )

    @property
    def resident_bytes(self) -> int:
        """Bytes the loaded experts take where they run (LoRA tensors in the base; model experts' denoisers)."""
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
                return  # everything loaded is needed now: `_keep_promise` decides
            self.evict(victim)

    def _size_hint(self, expert: Expert) -> int:
        """Bytes `expert` will take once loaded, from its safetensors headers (a parked model: its own size);
        0 when unknown (the real size is checked after the load)."""
        import math

        from mixdiff_cli.catalog.headers import read_header

        if expert.name in self._parked:
            return _module_nbytes(self._parked[expert.name])
        try:
            path = Path(sources.resolve(self.catalog, expert.source))
            sub = self.family.denoiser
            folder = path / sub if (path / sub).is_dir() else path
            headers = [read_header(f)[0] for f in (sorted(folder.glob("*.safetensors")) if path.is_dir() else [path])]
        except (MixdiffError, OSError):
            return 0
        shapes = {k: t.get("shape") or [] for h in headers for k, t in h.items()}
        from mixdiff_cli.catalog.lycoris import loaded_elements

        if (rewritten := loaded_elements(shapes)) is not None:  # LoHa / LoKr: the size of the LoRA they become
            return rewritten * self.dtype.itemsize
        own = {k: v for k, v in shapes.items() if k.startswith(self.family.checkpoint_prefix)}  # a whole original checkpoint
        return sum(math.prod(v) for v in (own or shapes).values() if len(v) > 1) * self.dtype.itemsize  # kohya alphas are scalars

    def _resident(self, item: _Loaded) -> int:
        """The bytes `item` really takes: its LoRA tensors in the denoiser and text encoders, or its denoiser."""
        if item.model is not None:
            return _module_nbytes(item.model)
        models = [self.denoiser, *self.family.encoders(self.pipe)]
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
        if item.model is not None:
            del self.mixture.models[name]
            if self.device.type != "cpu":
                self._parked[name] = item.model.to("cpu")
                while len(self._parked) > self.max_loaded:
                    self._parked.popitem(last=False)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand freed blocks back, so that memory_fraction sees them
        self.evictions.append(name)


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

