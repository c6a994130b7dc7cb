"""Planning a route: members and their weights, the adapter state a blend needs, band stages and their conditioning."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from mixdiff_cli.core.errors import MixdiffWarning, UsageError
from mixdiff_cli.routing.route import band_steps, check_known, format_band, parse_members, renormalise
from mixdiff_cli.sampling.options import BlendMode
from mixdiff_cli.sampling.requests import Active, _Stage

if TYPE_CHECKING:

    from mixdiff_cli.families.base import Family
    from mixdiff_cli.models.text import Encoded
    from mixdiff_cli.sampling.mixture import Blend


class Planning:
    """Route plans (a part of `Engine`): which slices, models and weights a blend runs, and the adapter state it sets."""

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

    def plan(self, members: list[Active], mode: BlendMode) -> tuple[list[str | None], list[str], list[float], str, list[str]]:
        """Activate adapters for `members`; return the base slices, models, weights, a label and the
        adapters to fuse for the run (merge of several LoRAs: one forward, no per-layer LoRA cost). A fused
        route is unfused first: the caller runs the denoiser with these adapters as set."""
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

    def _adapted_encode(self, prompts: Sequence[str], negatives: Sequence[str | None], adapters: list[str], weights: list[float]) -> Encoded:
        """Encode with the text encoders' LoRA layers of `adapters` active (as plain diffusers would)."""
        from mixdiff_cli.models.text import encode

        self.unfuse()  # enable_lora would turn the fused layers back on
        self._active_key = None  # the adapter state changes here
        self.pipe.enable_lora()
        self._lora_on = True
        self.pipe.set_adapters(adapters, adapter_weights=weights)
        return encode(self.pipe, prompts, negatives, device=self.device)

    def _stages(self, members: list[Active], mode: BlendMode, reqs: list[Any], run_steps: list[int],
                encoded: Encoded | None) -> tuple[dict[int, list[tuple[int, list[Active]]]], dict[tuple[str, ...], _Stage], bool, str]:
        """For runs of `run_steps` steps: each one's band layout, the stages they use (text conditioning
        encoded once per stage), whether every stage passes its own conditioning, and the blend label."""
        prompts, negatives = [r.prompt for r in reqs], [r.negative for r in reqs]
        if encoded is not None and (encoded.negatives is None or len(encoded) != len(reqs)):
            encoded = None  # routing-only encodings lack the negatives
        bare: list[Encoded] = [encoded] if encoded is not None else []

        def base_encoding() -> Encoded:  # the bare text encoders' pass, once
            if not bare:
                bare.append(self.encode(prompts, negatives))
            return bare[0]

        layouts = {n: _layout(members, n) for n in run_steps}  # steps -> [(first step, members)]
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
        return layouts, stages, explicit, label

    def _blend(self, stage: _Stage, idx: list[int], cfg: bool, explicit: bool) -> Blend:
        """The mixture's view of a stage for the requests `idx`; `explicit`: pass the stage's own text
        conditioning even when the pipeline's is the same."""
        from mixdiff_cli.sampling.mixture import Blend

        slices, model_names, weights, _, _ = self._plan(stage.members, stage.mode)[0]
        if stage.per_member is not None:
            conditioning = [_conditioning(self.family, e.take(idx), cfg) if e is not None else None for e in stage.per_member]
        elif explicit:
            conditioning = [_conditioning(self.family, stage.encoded.take(idx), cfg)] * (len(slices) + len(model_names))
        else:
            conditioning = None
        return Blend(slices=slices, models=model_names, weights=weights, conditioning=conditioning)


def _conditioning(family: Family, enc: Encoded, cfg: bool) -> dict[str, Any]:
    """Per-member denoiser conditioning in the pipeline's layout: [uncond..., cond...] under guidance."""
    import torch

    fields = {k: torch.cat([enc.negatives[k], v]) if cfg else v for k, v in enc.fields.items()}
    return family.denoiser_cond(fields)


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

